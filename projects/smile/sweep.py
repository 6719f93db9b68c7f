"""One seed's tiny table, in one process (pools loaded once): the seed README's loops of `main.py` runs
(single models, SMILE over the (gate_k, k) grid, the top_k ablation, projection merging) plus the merging
baselines, for any model pool and task pool (tiny CLIP; tiny T5, full or LoRA). Each run writes a
fusion_bench-shaped report; the seed's summary goes to `<out>/summary/results.json` (read by analyze.py).

    python -m projects.smile.sweep --config projects/smile/configs/tiny_sweep.yaml seed=0 \
        expert_root=runs/smile/tiny/experts/seed_0 out=runs/smile/tiny/seed_0

Hyperparameters are chosen on validation (TA's λ, SMILE's (gate_k, k) within a parameter budget);
each candidate's test accuracy is also reported, as the paper's grid tables do.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import transformers
from tqdm.auto import tqdm

from common.cli import run_main
from common.config import load_config
from common.io import write_json
from common.rundir import RunDir, seed_everything
from projects.smile.main import group_file
from projects.smile.methods import METHODS, model_info
from projects.smile.pools import build_taskpool, load_modelpool

DEFAULTS: dict[str, Any] = {
    "modelpool": "CLIPVisionModelPool/tiny_clip_TA8",
    "taskpool": "CLIPVisionModelTaskPool/tiny_clip_TA8",
    "expert_root": "runs/smile/tiny/experts/seed_0",
    "out": "runs/smile/tiny/seed_0",
    "experiment": "tiny_clip",  # the summary's experiment name (paper.yaml, RESULTS.md)
    "seed": 0,
    "scale": "tiny",
    "max_examples": None,  # per task and split (null: all)
    "grid": {"gate_k": [1, 2, 4, 8, 16], "k": [4, 8, 16, 32, -1]},
    "max_params_ratio": 2.0,  # the selected SMILE config: best validation accuracy within this size
    "top_k": {"gate_k": 4, "k": 16, "values": [1, 2, 4, 8]},  # null: no top_k ablation
    "task_arithmetic_lambdas": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0],
    "projection": {"k": 8},  # null: no singular projection merging
    "smile": {"full_matrices": True},  # for every SMILE run, over method/smile_upscaling/smile_upscaling.yaml
}


def _smile_cfg(overrides: dict[str, Any], **kw: Any) -> dict[str, Any]:
    from common.config import read_config_file

    return read_config_file(group_file("method", "smile_upscaling/smile_upscaling")) | overrides | kw


class Sweep:
    """One seed's pools (loaded once) and the reports it writes."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from common.config import read_config_file

        self.cfg, self.out = cfg, Path(cfg["out"])
        pool = read_config_file(group_file("modelpool", cfg["modelpool"])) | {
            "expert_root": cfg["expert_root"]
        }
        self.pretrained, self.models = load_modelpool(pool)
        task_cfg = read_config_file(group_file("taskpool", cfg["taskpool"])) | {
            "max_examples": cfg["max_examples"]
        }
        self.tasks = list(task_cfg["tasks"])
        self.pools = {split: build_taskpool(task_cfg | {"split": split}) for split in ("validation", "test")}

    def run(
        self,
        name: str,
        method_cfg: dict[str, Any],
        models: dict | None = None,
        splits: tuple[str, ...] = ("validation", "test"),
        only: str | None = None,
    ) -> dict[str, Any]:
        """Run a method, evaluate on `splits` (validation only where a choice is made on it) and on every
        task or `only` one, write reports/[validation/]<name>.json; return the reports by split. `dummy`
        with one model evaluates that model (the pretrained one with none)."""
        models = self.models if models is None else models
        base = None if method_cfg["name"] == "dummy" and models else self.pretrained
        model, extra = METHODS[method_cfg["name"]](method_cfg, base, models)
        report = {"model_info": model_info(model, self.pretrained) | extra}
        out = {split: report | self._pool(split, only).evaluate(model) for split in splits}
        for split, r in out.items():
            folder = self.out / "reports" / ("" if split == "test" else split)
            write_json(folder / f"{name}.json", {"method": method_cfg, **r})
        return out

    def _pool(self, split: str, only: str | None) -> Any:
        """The split's task pool, or a shallow copy holding only task `only`'s data."""
        pool = self.pools[split]
        if only is None:
            return pool
        one = copy.copy(pool)
        one.data = {only: pool.data[only]}
        return one


def sweep(cfg: dict[str, Any]) -> dict[str, Any]:
    s = Sweep(cfg)
    acc = lambda r, t="average": r[t]["accuracy"]  # noqa: E731
    m: dict[str, Any] = {}
    test = ("test",)  # nothing is chosen on these runs' validation scores
    m["pretrained"] = acc(s.run("pretrained", {"name": "dummy"}, {}, test)["test"])
    own = {}
    for task, expert in s.models.items():
        r = s.run(f"individual_{task}", {"name": "dummy"}, {task: expert}, test, only=task)
        own[task] = acc(r["test"], task)
    m["individual"] = sum(own.values()) / len(own)
    m["individual_per_task"] = own
    average = s.run("simple_average", {"name": "simple_average", "device": "cpu"}, splits=test)
    m["simple_average"] = acc(average["test"])
    ta = {
        lam: s.run(
            f"task_arithmetic_{lam}", {"name": "task_arithmetic", "device": "cpu", "scaling_factor": lam}
        )
        for lam in tqdm(cfg["task_arithmetic_lambdas"], desc="task arithmetic λ", disable=None)
    }
    best = max(ta, key=lambda lam: acc(ta[lam]["validation"]))
    m["task_arithmetic"], m["task_arithmetic_lambda"] = acc(ta[best]["test"]), best

    grid = {}
    for gate_k in tqdm(cfg["grid"]["gate_k"], desc="SMILE grid", disable=None):
        for k in cfg["grid"]["k"]:
            r = s.run(f"smile_gate_k={gate_k}_k={k}", _smile_cfg(cfg["smile"], gate_k=gate_k, k=k))
            grid[(gate_k, k)] = r
            m[f"smile_g{gate_k}_k{k}"] = acc(r["test"])
            m[f"smile_g{gate_k}_k{k}_params_ratio"] = r["test"]["model_info"]["params_ratio"]
    budget = [
        key for key, r in grid.items() if r["test"]["model_info"]["params_ratio"] <= cfg["max_params_ratio"]
    ]
    chosen = max(budget, key=lambda key: acc(grid[key]["validation"]))
    m["smile_selected"] = acc(grid[chosen]["test"])
    m["smile_selected_params_ratio"] = grid[chosen]["test"]["model_info"]["params_ratio"]
    m["smile_selected_config"] = {"gate_k": chosen[0], "k": chosen[1]}

    tk = cfg["top_k"] or {"values": []}
    for top_k in tk["values"]:
        if top_k > len(s.models):
            continue
        r = s.run(
            f"smile_top_k={top_k}",
            _smile_cfg(cfg["smile"], gate_k=tk["gate_k"], k=tk["k"], top_k=top_k),
            splits=test,
        )
        m[f"top_k_{top_k}"] = acc(r["test"])

    if not cfg["projection"]:
        return m
    spaces = {"space_I": ("low", False), "space_II": ("high", False), "space_II_III": ("high", True)}
    proj: dict[str, dict[str, float]] = {"ft": own}
    for space, (rank, full) in spaces.items():
        proj[space] = {}
        for task, expert in s.models.items():
            method = {"name": "singular_projection_merging", "device": "cpu", "k": cfg["projection"]["k"]}
            method |= {"rank": rank, "full_matrices": full}
            r = s.run(f"projection_{space}_{task}", method, {task: copy.deepcopy(expert)}, test)
            proj[space][task] = acc(r["test"], task)
    m["projection"] = {sp: {**v, "average": sum(v.values()) / len(v)} for sp, v in proj.items()}
    return m


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()  # loading a tower from a full CLIP folder lists the other's keys
    cfg = load_config(DEFAULTS, args.config, args.overrides)
    seed_everything(cfg["seed"])
    run = RunDir(
        Path(cfg["out"]) / "summary",
        project="smile",
        experiment=cfg["experiment"],
        scale=cfg["scale"],
        seed=cfg["seed"],
        config=cfg,
    )
    metrics = sweep(cfg)
    run.write_results(metrics)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, default=str))
    return metrics


if __name__ == "__main__":
    sys.exit(run_main(main))
