"""Choosing the tiny (IA)^3 experts' budget on VALIDATION data (never test): train one expert per
(task, lr, steps) with the `train` command and read its own task's validation accuracy at the best
checkpoint (the early-stopping split, as in every tiny run).

    python -m projects.mats.tune_tiny --settings 3e-2:60 1e-1:200:10 --seed 0 \
        --out runs/mats/tiny/tune_ia3/results.jsonl

A setting is LR:STEPS[:PATIENCE] (early-stopping patience in evaluations, default the tiny config's).
Each output line is one trained expert: its settings, validation accuracy at the best checkpoint, the
validation accuracy at every evaluation (every 20 steps; a long run without early stopping thus shows
what each shorter budget reaches) and wall time. Settings already in the file are skipped, so an
interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common.cli import run_main
from common.io import read_json
from projects.mats.main import main
from projects.mats.reproduce import CONFIGS, MIXTURE, SCALE_CONFIGS
from projects.mats.tasks import tasks_of


def _parse(setting: str) -> tuple[float, int, int | None]:
    lr, steps, *patience = setting.split(":")
    return float(lr), int(steps), int(patience[0]) if patience else None


def run_one(task: str, lr: float, steps: int, patience: int | None, seed: int, root: Path) -> dict:
    """Train one (IA)^3 expert on `task`; returns its best validation accuracy and where it stopped."""
    name = f"lr{lr:g}_steps{steps}_patience{patience}_seed{seed}"
    stop = [f"early_stopping_num_checkpoints_without_improvement={patience}"] if patience else []
    t0 = time.perf_counter()
    main(["train", "-c", *(str(CONFIGS / f) for f in SCALE_CONFIGS["tiny"]), "-td", f"train_dataset={task}",
          "-ed", f"evaluation_dataset={task}", "-tr", f"lr={lr}", f"num_batches={steps}", f"seed={seed}", *stop,
          "-o", f"experiment.exp_out={root / 'exp_out'}", f"experiment.run_name={name}"])  # fmt: skip
    run = next((root / "exp_out").glob(f"*/{task}/*/ia3/{name}"))
    metrics = read_json(run / "results.json")["metrics"]
    history = [h[task] for h in read_json(run / "checkpoints.json")]
    return {"task": task, "lr": lr, "steps": steps, "patience": patience, "seed": seed,
            "validation": metrics["validation"][task], "best_checkpoint_idx": metrics["best_checkpoint_idx"],
            "history": history, "stopped_early": metrics["stopped_early"],
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def cli(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", required=True, metavar="LR:STEPS[:PATIENCE]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/mats/tiny/tune_ia3/results.jsonl"))
    a = ap.parse_args(argv)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if a.out.exists():
        rows = map(json.loads, a.out.read_text().splitlines())
        done = {(r["task"], r["lr"], r["steps"], r.get("patience"), r["seed"]) for r in rows}
    for lr, steps, patience in map(_parse, a.settings):
        for task in tasks_of(MIXTURE["tiny"]):
            if (task, lr, steps, patience, a.seed) in done:
                continue
            row = run_one(task, lr, steps, patience, a.seed, a.out.parent)
            with a.out.open("a") as f:  # one line per expert, so an interrupted sweep resumes
                f.write(json.dumps(row) + "\n")
            print(row)


if __name__ == "__main__":
    sys.exit(run_main(cli))
