"""Choosing the tiny experts' training budget on VALIDATION data (never test): train one expert per
(dataset, steps, lr, rank, batch) and score it on its own task's validation split (`--diagnostic` tasks' validation splits can be scored
too, for diagnosis only: they never pick a setting; the held-out tasks are left out by default).

    python -m projects.phatgoose.tune_tiny --datasets TWEET_SENTIMENT_AIRLINE \
        --configs 80:5e-3:4:8 200:5e-3:4:8 400:1e-2:8:8 --out runs/phatgoose/tune/results.jsonl

Each line of the output is one trained expert: its settings, the training and evaluation wall times,
and accuracy / class-balanced accuracy per validation set. Settings already in the file are skipped.

The gate budget (`--gate_configs steps:lr:batch`): with the frozen experts of one table seed, train the
gates of every library expert at that budget, build the PHATGOOSE library (gates as router keys) and
score it on the held-out tasks' VALIDATION splits (P/EVALUATE/VALIDATION), with the share of top-k picks
each expert gets (mean over modules, as `analyze.routing_summary`):

    python -m projects.phatgoose.tune_tiny --experts_dir runs/phatgoose/tiny/seed_0/exp_out \
        --gate_configs 40:5e-3:8 200:5e-3:8 --out runs/phatgoose/tune/gates.jsonl
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from common.cli import run_main
from projects.phatgoose import configurables as C
from projects.phatgoose import library as L
from projects.phatgoose.evaluate import evaluate_rows, routing_distribution, start_routing_record
from projects.phatgoose.experts import CHECKPOINT, TrainSettings, load_base, train_lora_expert
from projects.phatgoose.gates import train_gate
from projects.phatgoose.library import read_expert
from projects.phatgoose.moe import attach_experts, set_mode
from projects.phatgoose.pipeline import Timer
from projects.phatgoose.tasks import SETTINGS, dataset_name, load_task, subsample

TINY_GIN = "projects/phatgoose/configs/tiny.gin"


def _times(timer: Timer) -> dict[str, float]:
    """`<phase>_s` (wall) and `<phase>_cpu_s` (this process's CPU) seconds of each timed phase."""
    out = {}
    for phase, wall in timer.seconds.items():
        out |= {f"{phase}_s": wall, f"{phase}_cpu_s": timer.cpu_seconds[phase]}
    return out


def _parse(config: str) -> dict:
    steps, lr, rank, batch = config.split(":")
    return {"steps": int(steps), "lr": float(lr), "rank": int(rank), "batch_size": int(batch)}


def run_one(
    dataset: str, cfg: dict, seed: int, n_val: int, eval_batch: int, diagnostic: tuple[str, ...] = ()
) -> dict:
    """Train one expert with `cfg` and score it on the validation split of its task (and `diagnostic`)."""
    settings = C.scoped("P/TRAIN", C.trainer_settings)
    settings.num_steps, settings.lr, settings.batch_size = cfg["steps"], cfg["lr"], cfg["batch_size"]
    moe = C.scoped("M/MODEL", C.moe_settings)
    base = C.scoped("M/MODEL", C.model_name)
    tmp, timer = Path(tempfile.mkdtemp(prefix="phatgoose_tune_")), Timer()
    try:
        with timer("train"):
            ckpt = train_lora_expert(
                base,
                load_task(dataset)["train"],
                tmp,
                settings,
                rank=cfg["rank"],
                init_scale=moe.init_scale,
                target_modules=moe.target_modules,
                name=dataset,
                seed=seed,
            )
        model, tok = load_base(base)
        attach_experts(model, [read_expert(ckpt)])
        set_mode(model, "fixed", 0)
        scores = {}
        with timer("eval"):
            for task in (dataset, *diagnostic):
                rows = list(subsample(load_task(task)["validation"], n_val))
                res = evaluate_rows(model, tok, rows, generation=False, batch_size=eval_batch)
                counts: dict[str, int] = {}
                for p in res["predictions"]:
                    counts[p] = counts.get(p, 0) + 1
                scores[task] = {
                    "accuracy": res["accuracy"],
                    "balanced_accuracy": res["balanced_accuracy"],
                    "predicted": counts,
                }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"dataset": dataset, **cfg, "seed": seed, **_times(timer), "validation": scores}


def _parse_gate(config: str) -> dict:
    steps, lr, batch = config.split(":")
    return {"steps": int(steps), "lr": float(lr), "batch_size": int(batch)}


def gate_settings(cfg: dict) -> TrainSettings:
    """P/TRAIN/GATE's trainer settings (the expert optimizer, §3) with `cfg`'s steps, lr and batch."""
    settings = C.scoped("P/TRAIN/GATE", C.trainer_settings)
    settings.num_steps, settings.lr, settings.batch_size = cfg["steps"], cfg["lr"], cfg["batch_size"]
    return settings


def run_gates(experts_dir: str | Path, cfg: dict, seed: int, eval_batch: int) -> dict:
    """Gates of every library expert at budget `cfg`; PHATGOOSE scored on the held-out validation splits.

    Reads the frozen experts `<experts_dir>/datasets_concatenated/<NAME>_t5_lora/checkpoint` (a table
    seed's, after put_index_to_lora); trains only the gates (`gates.train_gate`), uses them as router
    keys (`use_input_gate_as_router`), concatenates in the library order and evaluates with
    P/EVALUATE/VALIDATION's datasets, split and example count, recording the routing.
    """
    settings = gate_settings(cfg)
    base = C.scoped("M/MODEL", C.model_name)
    moe = C.scoped("M/MODEL", C.moe_settings)
    ev = C.scoped("P/EVALUATE/VALIDATION", C.eval_settings)
    names = list(C.dataset_setting() or SETTINGS["Full"])
    tmp, timer = Path(tempfile.mkdtemp(prefix="phatgoose_gates_")), Timer()
    try:
        paths = []
        with timer("gate_train"):
            for n in names:
                expert = Path(experts_dir) / "datasets_concatenated" / f"{n}_t5_lora" / CHECKPOINT
                if not expert.is_dir():
                    raise FileNotFoundError(f"no trained expert {n} at {expert}: run the table for this seed")
                ckpt = train_gate(base, expert, load_task(n)["train"], tmp / n, settings, seed=seed)
                paths.append(L.use_input_gate_as_router(ckpt))
        L.run_concatenate(paths, tmp / "library", names)
        model, tok = load_base(base)
        attach_experts(
            model,
            L.read_library(tmp / "library"),
            topk_value=moe.topk_value,
            normalize_topk=moe.normalize_topk,
        )
        scores = {}
        with timer("eval"):
            for d in ev.datasets:
                rows = list(subsample(load_task(d)[ev.split], ev.num_examples))
                start_routing_record(model)
                res = evaluate_rows(model, tok, rows, generation=False, batch_size=eval_batch)
                dist = routing_distribution(model)
                share = {n: sum(p[i] for p in dist.values()) / len(dist) for i, n in enumerate(names)}
                scores[dataset_name(d)] = {
                    "accuracy": res["accuracy"],
                    "balanced_accuracy": res["balanced_accuracy"],
                    "routing_share": share,
                }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "experts_dir": str(experts_dir),
        **cfg,
        "seed": seed,
        "split": ev.split,
        **_times(timer),
        "validation": scores,
    }


def _sweep_gates(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["experts_dir"], r["steps"], r["lr"], r["batch_size"], r["seed"]))
    for config in args.gate_configs:
        cfg = _parse_gate(config)
        if (args.experts_dir, cfg["steps"], cfg["lr"], cfg["batch_size"], args.seed) in done:
            continue
        rec = run_gates(args.experts_dir, cfg, args.seed, args.eval_batch)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        parts = []
        for task, r in rec["validation"].items():
            top = max(r["routing_share"], key=r["routing_share"].get)
            parts.append(
                f"{task.lower()} acc {100 * r['accuracy']:.1f} bal {100 * r['balanced_accuracy']:.1f}"
                f" (top {top} {100 * r['routing_share'][top]:.1f}%)"
            )
        print(
            f"gates {config}: " + " | ".join(parts) + f" | gates {rec['gate_train_s']:.0f}s"
            f" ({rec['gate_train_cpu_s']:.0f}s CPU) eval {rec['eval_s']:.0f}s ({rec['eval_cpu_s']:.0f}s CPU)",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["TWEET_SENTIMENT_AIRLINE"])
    p.add_argument("--configs", nargs="+", default=[], help="steps:lr:rank:batch")
    p.add_argument("--gate_configs", nargs="+", default=[], help="gate budgets steps:lr:batch")
    p.add_argument("--experts_dir", help="a table seed's exp_out, whose experts the gate sweep reuses")
    p.add_argument("--gin_files", nargs="+", default=[TINY_GIN])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_val", type=int, default=200)
    p.add_argument("--eval_batch", type=int, default=64)
    p.add_argument("--diagnostic", nargs="*", default=[], help="other tasks to score (never to choose)")
    p.add_argument("--out", default="runs/phatgoose/tune/results.jsonl")
    args = p.parse_args(argv)
    if bool(args.configs) == bool(args.gate_configs):
        p.error("give either --configs (expert budgets) or --gate_configs (gate budgets)")
    if args.gate_configs and not args.experts_dir:
        p.error("--gate_configs needs --experts_dir (a table seed's exp_out)")
    C.parse(args.gin_files)
    if args.gate_configs:
        _sweep_gates(args)
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["dataset"], r["steps"], r["lr"], r["rank"], r["batch_size"], r["seed"]))
    for dataset in args.datasets:
        for config in args.configs:
            cfg = _parse(config)
            key = (dataset, cfg["steps"], cfg["lr"], cfg["rank"], cfg["batch_size"], args.seed)
            if key in done:
                continue
            rec = run_one(dataset, cfg, args.seed, args.n_val, args.eval_batch, tuple(args.diagnostic))
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            own = rec["validation"][dataset]
            diag = " ".join(
                f"{t.lower()}={100 * rec['validation'][t]['balanced_accuracy']:.1f}" for t in args.diagnostic
            )
            print(
                f"{dataset} {config}: own acc {100 * own['accuracy']:.1f} bal {100 * own['balanced_accuracy']:.1f}"
                f" | {diag} | train {rec['train_s']:.0f}s ({rec['train_cpu_s']:.0f}s CPU)"
                f" eval {rec['eval_s']:.0f}s ({rec['eval_cpu_s']:.0f}s CPU)",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(run_main(main))
