"""Choosing the tiny experts' training budget on VALIDATION data (never test): train one expert per
(dataset, steps, lr, rank, batch) and score it on its own task's validation split (`--diagnostic` tasks' validation splits can be scored
too, for diagnosis only: they never pick a setting; the held-out tasks are left out by default).

    python -m projects.phatgoose.tune_tiny --datasets TWEET_SENTIMENT_AIRLINE \
        --configs 80:5e-3:4:8 200:5e-3:4:8 400:1e-2:8:8 --out runs/phatgoose/tune/results.jsonl

Each line of the output is one trained expert: its settings, the training and evaluation wall times,
and accuracy / class-balanced accuracy per validation set. Settings already in the file are skipped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import gin

from projects.phatgoose import configurables as C
from projects.phatgoose.evaluate import evaluate_rows
from projects.phatgoose.experts import load_base, train_lora_expert
from projects.phatgoose.library import read_expert
from projects.phatgoose.moe import attach_experts, set_mode
from projects.phatgoose.tasks import load_task, subsample

TINY_GIN = "projects/phatgoose/configs/tiny.gin"


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
    tmp = Path(tempfile.mkdtemp(prefix="phatgoose_tune_"))
    try:
        t0, c0 = time.time(), time.process_time()
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
        train_s, train_cpu_s = time.time() - t0, time.process_time() - c0
        model, tok = load_base(base)
        attach_experts(model, [read_expert(ckpt)])
        set_mode(model, "fixed", 0)
        scores = {}
        t0, c0 = time.time(), time.process_time()
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
        eval_s, eval_cpu_s = time.time() - t0, time.process_time() - c0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "dataset": dataset,
        **cfg,
        "seed": seed,
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "eval_s": eval_s,
        "eval_cpu_s": eval_cpu_s,
        "validation": scores,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["TWEET_SENTIMENT_AIRLINE"])
    p.add_argument("--configs", nargs="+", required=True, help="steps:lr:rank:batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_val", type=int, default=200)
    p.add_argument("--eval_batch", type=int, default=64)
    p.add_argument("--diagnostic", nargs="*", default=[], help="other tasks to score (never to choose)")
    p.add_argument("--out", default="runs/phatgoose/tune/results.jsonl")
    args = p.parse_args(argv)
    gin.parse_config_files_and_bindings([TINY_GIN], [])
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
    main()
