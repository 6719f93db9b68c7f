"""Run one method on a model pool and evaluate it on a task pool, as fusion_bench's CLI does (no Hydra).

    python -m projects.smile.main method=smile_upscaling/smile_upscaling method.gate_k=16 method.k=32 \
        modelpool=CLIPVisionModelPool/tiny_clip_TA8 taskpool=CLIPVisionModelTaskPool/tiny_clip_TA8 \
        report_save_path=outputs/gate_k=16_k=32.json

`group=name` picks configs/<group>/<name>.yaml (a bare name is found in any subfolder, so the seed's
`modelpool=Seq2SeqLMPool/clip-vit-base-patch32_TA8` still resolves); `a.b.0.c=value` overrides a key
(list items by index); `+a.b=value` adds one. As with Hydra, `${method.k}` refers to another key
(`report_save_path=outputs/k=${method.k}.json`) and `-m method.k=4,8 method.gate_k=1,2` runs every
combination in turn (one JSON line per run on stdout). The report (`report_save_path`) has fusion_bench's
shape: {"model_info": {...}, "<task>": {"accuracy", "loss"}, ..., "average": {...}}, and is also printed
as JSON; `run_dir` (default: the report path without `.json`) gets `results.json` with provenance.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from common.cli import run_main
from common.config import ConfigError, expand_sweeps, load_config, merge, read_config_file
from common.distributed import prepare_process
from common.io import atomic_dir, check_replaceable, check_writable, write_json
from common.registry import close_matches, lookup
from common.rundir import RunDir, seed_everything
from projects.smile.methods import METHODS, MODEL_KIND, model_info
from projects.smile.pools import build_taskpool, load_modelpool

CONFIGS = Path(__file__).parent / "configs"
GROUPS = ("method", "modelpool", "taskpool")
MERGED_KIND = "smile merged model"  # what merged_model_save_path holds (common.io.atomic_dir's marker)
DEFAULTS: dict[str, Any] = {
    "method": {},
    "modelpool": {},
    "taskpool": {"type": "DummyTaskPool"},
    "report_save_path": None,
    "merged_model_save_path": None,
    "overwrite": False,  # replace a non-empty merged_model_save_path / method.model_path we did not write
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
    overwrite = bool(cfg["overwrite"])
    for path, kind in (
        (cfg["merged_model_save_path"], MERGED_KIND),
        (cfg["method"].get("model_path"), MODEL_KIND),
    ):
        if path:  # before the work: a refusal costs nothing
            check_replaceable(path, kind, overwrite)
    pretrained, models = load_modelpool(cfg["modelpool"])
    model, extra = method({**cfg["method"], "overwrite": overwrite}, pretrained, models)
    if cfg["merged_model_save_path"]:
        with atomic_dir(cfg["merged_model_save_path"], kind=MERGED_KIND, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp)
    report: dict[str, Any] = {"model_info": model_info(model, pretrained) | extra}
    with torch.no_grad():
        report |= build_taskpool(cfg["taskpool"]).evaluate(model)
    return report


OUTPUTS = ("report_save_path", "run_dir", "merged_model_save_path")


def run_and_save(cfg: dict[str, Any]) -> dict[str, Any]:
    """One run: the report, written to `report_save_path` and `run_dir` when set."""
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
    return report


def check_distinct_outputs(cfgs: list[dict[str, Any]], jobs: list[list[str]]) -> None:
    """Refuse a multirun whose runs would overwrite one another's outputs."""
    for key in OUTPUTS:
        paths = [c[key] for c in cfgs if c[key]]
        if len(set(paths)) < len(paths):
            raise ConfigError(
                f"-m: the {len(jobs)} runs would all write {key}={paths[0]}; put the swept keys in it, "
                f"e.g. {key}=outputs/k=${{method.k}}.json"
            )


def main(argv: list[str] | None = None) -> dict[str, Any] | list[dict[str, Any]]:
    prepare_process()  # one report from a multi-process launch; say if the launcher ignored a request
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", action="append", default=[], help="a run config (YAML) with a defaults list"
    )
    parser.add_argument("--dry_run", action="store_true", help="build on meta and count parameters only")
    parser.add_argument(
        "-m", "--multirun", action="store_true", help="run every combination of `key=a,b` sweeps, in turn"
    )
    parser.add_argument("args", nargs="*", help="group=name choices and key=value overrides")
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    transformers.logging.set_verbosity_error()  # loading a tower from a full CLIP folder lists the other's keys
    extra = ["dry_run=true"] if ns.dry_run else []
    jobs = expand_sweeps(ns.args, multirun=ns.multirun)
    cfgs = [resolve(job + extra, ns.config) for job in jobs]  # every run's config is checked before any runs
    for cfg in cfgs:
        for key in ("report_save_path", "merged_model_save_path", "run_dir"):
            if cfg[key]:  # before the run, not after it: a run's report is never lost to a read-only folder
                check_writable(cfg[key], key)
        if cfg["method"].get("model_path"):
            check_writable(cfg["method"]["model_path"], "method.model_path")
    if not ns.multirun:
        report = run_and_save(cfgs[0])
        print(json.dumps(report, indent=2, default=str))
        return report
    check_distinct_outputs(cfgs, jobs)
    reports = []
    for i, (job, cfg) in enumerate(zip(jobs, cfgs)):
        print(f"[multirun {i + 1}/{len(jobs)}] {' '.join(job)}", file=sys.stderr, flush=True)
        reports.append(run_and_save(cfg))
        line = {
            "job": i,
            "overrides": job,
            "report_save_path": cfg["report_save_path"],
            "report": reports[-1],
        }
        print(json.dumps(line, default=str), flush=True)
    return reports


if __name__ == "__main__":
    sys.exit(run_main(main))
