"""Run one method on a model pool and evaluate it on a task pool, as fusion_bench's CLI does (no Hydra).

    python -m projects.smile.main method=smile_upscaling/smile_upscaling method.gate_k=16 method.k=32 \
        modelpool=CLIPVisionModelPool/tiny_clip_TA8 taskpool=CLIPVisionModelTaskPool/tiny_clip_TA8 \
        report_save_path=outputs/gate_k=16_k=32.json

`group=name` picks configs/<group>/<name>.yaml (a bare name is found in any subfolder, so the seed's
`modelpool=Seq2SeqLMPool/clip-vit-base-patch32_TA8` still resolves); `a.b.0.c=value` overrides a key
(list items by index); `+a.b=value` adds one. The report (`report_save_path`) has fusion_bench's shape:
{"model_info": {...}, "<task>": {"accuracy", "loss"}, ..., "average": {...}}; `run_dir` (default: the
report path without `.json`) gets `results.json` with provenance.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from common.cli import run_main
from common.config import ConfigError, load_config, merge, read_config_file
from common.io import atomic_dir, check_writable, write_json
from common.registry import close_matches, lookup
from common.rundir import RunDir, seed_everything
from projects.smile.methods import METHODS, model_info
from projects.smile.pools import build_taskpool, load_modelpool

CONFIGS = Path(__file__).parent / "configs"
GROUPS = ("method", "modelpool", "taskpool")
DEFAULTS: dict[str, Any] = {
    "method": {},
    "modelpool": {},
    "taskpool": {"type": "DummyTaskPool"},
    "report_save_path": None,
    "merged_model_save_path": None,
    "run_dir": None,
    "experiment": None,  # the results.json experiment name; default: the method's name
    "scale": "tiny",
    "seed": 0,
    "dry_run": False,
}


def group_file(group: str, name: str) -> Path:
    """configs/<group>/<name>.yaml, or the one file called <basename>.yaml anywhere under configs/<group>/."""
    root = CONFIGS / group
    exact = root / f"{name}.yaml"
    if exact.is_file():
        return exact
    found = sorted(root.rglob(f"{Path(name).name}.yaml"))
    if len(found) == 1:
        return found[0]
    choices = [str(p.relative_to(root).with_suffix("")) for p in sorted(root.rglob("*.yaml"))]
    if len(found) > 1:
        raise ConfigError(f"{group}={name} is ambiguous: {[str(p.relative_to(root)) for p in found]}")
    raise ConfigError(f"no {group} config {name!r} under {root}.{close_matches(name, choices)}")


def resolve(argv: list[str], files: list[str] = ()) -> dict[str, Any]:
    """Compose the config: defaults < group files < `--config` files < key=value overrides.

    A `--config` file may name its groups in a Hydra-style `defaults: {method: ..., modelpool: ...}`
    mapping; `group=name` on the command line beats it.
    """
    choices: dict[str, str] = {}
    bodies = []
    for f in files:
        body = read_config_file(f)
        choices |= body.pop("defaults", None) or {}
        bodies.append(body)
    overrides = []
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"argument {item!r} must look like key=value")
        if key in GROUPS:
            choices[key] = value
        else:
            overrides.append(item)
    defaults = dict(DEFAULTS)
    for group, name in choices.items():
        if group not in GROUPS:
            raise ConfigError(f"unknown config group {group!r} in defaults; choose from {GROUPS}")
        defaults[group] = read_config_file(group_file(group, name))
    cfg = defaults
    for f, body in zip(files, bodies):
        cfg = merge(cfg, body, strict=True, where=str(f))
    return load_config(cfg, overrides=overrides)


def dry_run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Build the upscaled model on `meta` from the pool's base config: parameter counts, no weights."""
    from transformers import AutoConfig

    from common.models import build_meta, count_parameters, paper_config
    from projects.smile.pools import POOL_FAMILIES, pool_models
    from projects.smile.upscale import added_parameters, linear_layers, smile_shell

    method = cfg["method"]
    paths = pool_models(cfg["modelpool"])
    base_id = paths.get("_pretrained_") or next(iter(paths.values()))
    family = POOL_FAMILIES[cfg["modelpool"]["type"]]
    try:
        config = paper_config(base_id)
    except KeyError:
        config = AutoConfig.from_pretrained(base_id)
    n_experts = len(paths) - ("_pretrained_" in paths)
    model = build_meta(config, family)
    base = count_parameters(model)
    if method.get("name") == "smile_mistral_upscaling":
        from projects.smile.mistral import TARGETS

        method = {
            "gate_k": method["rank_of_router"],
            "k": method["rank_of_expert"],
            "top_k": method["num_experts_per_tok"],
            "targets": TARGETS,
        }
    elif method.get("name") != "smile_upscaling":
        return {"model_info": {"all_params": base}}
    targets = method.get("targets")
    layers = [
        (
            model.get_submodule(n).in_features,
            model.get_submodule(n).out_features,
            model.get_submodule(n).bias is not None,
        )
        for n in linear_layers(model, targets)
    ]
    gate_k, k, top_k = int(method["gate_k"]), int(method["k"]), int(method["top_k"])
    smile_shell(model, n_experts, gate_k, k, top_k, targets)
    total = count_parameters(model)
    return {
        "model_info": {
            "all_params": total,
            "pretrained_params": base,
            "added_params": total - base,
            "added_params_formula": added_parameters(layers, n_experts, gate_k, k),
            "params_ratio": total / base,
            "upscaled_layers": len(layers),
            "experts": n_experts,
        }
    }


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Load the pool, run the method, evaluate; returns the fusion_bench-shaped report."""
    seed_everything(int(cfg["seed"]))
    if cfg["dry_run"]:
        return dry_run(cfg)
    method = lookup(METHODS, cfg["method"].get("name", ""), "method")
    pretrained, models = load_modelpool(cfg["modelpool"])
    model, extra = method(cfg["method"], pretrained, models)
    if cfg["merged_model_save_path"]:
        with atomic_dir(cfg["merged_model_save_path"]) as tmp:
            model.save_pretrained(tmp)
    report: dict[str, Any] = {"model_info": model_info(model, pretrained) | extra}
    with torch.no_grad():
        report |= build_taskpool(cfg["taskpool"]).evaluate(model)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", action="append", default=[], help="a run config (YAML) with a defaults list"
    )
    parser.add_argument("--dry_run", action="store_true", help="build on meta and count parameters only")
    parser.add_argument("args", nargs="*", help="group=name choices and key=value overrides")
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    transformers.logging.set_verbosity_error()  # loading a tower from a full CLIP folder lists the other's keys
    cfg = resolve(ns.args + (["dry_run=true"] if ns.dry_run else []), ns.config)
    for key in ("report_save_path", "merged_model_save_path", "run_dir"):
        if cfg[key]:  # before the run, not after it: a run's report is never lost to a read-only folder
            check_writable(cfg[key], key)
    if cfg["method"].get("model_path"):
        check_writable(cfg["method"]["model_path"], "method.model_path")
    started = time.time()
    report = run(cfg)
    if cfg["report_save_path"]:
        write_json(cfg["report_save_path"], report)
    run_dir = cfg["run_dir"] or (
        Path(cfg["report_save_path"]).with_suffix("") if cfg["report_save_path"] else None
    )
    if run_dir:
        experiment = cfg["experiment"] or cfg["method"].get("name", "run")
        rd = RunDir(
            run_dir, project="smile", experiment=experiment, scale=cfg["scale"], seed=cfg["seed"], config=cfg
        )
        rd.started = started
        rd.write_results(report)
    summary = {k: v for k, v in report.get("average", {}).items()}
    print({"model_info": report["model_info"], "average": summary})
    return report


if __name__ == "__main__":
    sys.exit(run_main(main))
