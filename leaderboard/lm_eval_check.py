"""The leaderboard's held-out classification scores read again through lm-eval (`common.zoo_lm_eval`).

For each (seed, entry) already run, the entry's model is rebuilt with the hyperparameters it chose on
validation (from its result JSON), each held-out classification task's test split is scored by lm-eval's
`acc`, and both numbers are written side by side. The two paths share the records, not the scoring code:

    python -m leaderboard.lm_eval_check --seeds 0 --entries base uniform arrow

writes `<out>/lm_eval/seed_<s>.json` (default out: results/leaderboard), adding to what is there:
{"seed", "entries": {entry: {"tasks": {task: {"ours", "lm_eval", "difference"}}, "provenance"}},
"max_abs_difference"}.
Held-out generation tasks are not re-read: lm-eval has no Rouge-L metric.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common import zoo
from common.io import read_json, write_json
from common.rundir import provenance
from common.zoo_lm_eval import classification_tasks, lm_eval_accuracy
from common.zoo_tasks import HELD_OUT, LIBRARY
from leaderboard.entries import ENTRIES, Context
from leaderboard.run import LEADERBOARD, context, fingerprint, models_record


def check_entry(ctx: Context, result: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """{task: {"ours", "lm_eval", "difference"}} for one entry's result on `tasks` (test split)."""
    candidate = ENTRIES[result["entry"]][0](ctx, **result["hparams"])
    rows = {}
    for task in tasks:
        model = candidate.model_for(task)
        if model is None:  # the method has no answer for this task (the oracle on a held-out one)
            continue
        with tempfile.TemporaryDirectory() as workdir:
            theirs = lm_eval_accuracy(model, ctx.tokenizer, [task], "test", workdir, ctx.settings)[task]
        ours = float(result["test"][task])
        rows[task] = {"ours": ours, "lm_eval": theirs, "difference": theirs - ours}
    return rows


def run_checks(
    seeds: Sequence[int],
    names: Sequence[str],
    out: Path,
    held_out: Sequence[str],
    settings: zoo.ZooSettings = zoo.DEFAULT,
    library: Sequence[str] = LIBRARY,
) -> dict[int, dict[str, Any]]:
    """Check every (seed, entry); each seed's file is rewritten after each entry (a killed run keeps them)."""
    tasks = classification_tasks(held_out, settings)
    written = {}
    for seed in seeds:
        results = {}
        for name in names:
            path = out / f"seed_{seed}" / f"{name}.json"
            if not path.is_file():
                raise SystemExit(
                    f"no leaderboard result {path}: run `python -m leaderboard.run --seeds {seed} --entries {name}` first"
                )
            results[name] = read_json(path)
            if results[name].get("zoo_settings") != settings.key():
                raise SystemExit(f"{path} was made with other zoo settings than these; rerun the leaderboard")
        ctx = context(seed, settings, library)
        current = models_record(ctx.experts, ctx.multitask)["fingerprint"]
        stale = [name for name in names if fingerprint(results[name]) != current]
        if stale:  # lm-eval would score other models than those the results were computed on
            raise SystemExit(
                f"seed {seed}'s results for {stale} were not computed on the cached experts: rerun "
                f"`python -m leaderboard.run --seeds {seed} --entries {' '.join(stale)}` first"
            )
        target = out / "lm_eval" / f"seed_{seed}.json"
        record = read_json(target) if target.is_file() else {"seed": seed, "entries": {}}
        for name in names:
            print(f"lm_eval_check: seed {seed} {name}", flush=True)
            started = time.time()
            rows = check_entry(ctx, results[name], tasks)
            record["entries"][name] = {"tasks": rows, "provenance": provenance(seed, started)}
            record["max_abs_difference"] = max(
                (abs(r["difference"]) for e in record["entries"].values() for r in e["tasks"].values()),
                default=0.0,
            )
            write_json(target, record)
        written[seed] = record
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m leaderboard.lm_eval_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--entries", nargs="+", required=True, choices=list(ENTRIES))
    parser.add_argument(
        "--out", type=Path, default=LEADERBOARD, help="the leaderboard folder (default %(default)s)"
    )
    args = parser.parse_args(argv)
    for seed, record in run_checks(args.seeds, args.entries, args.out, HELD_OUT).items():
        for name, entry in record["entries"].items():
            cells = ", ".join(f"{t} {r['ours']:.3f} vs {r['lm_eval']:.3f}" for t, r in entry["tasks"].items())
            print(f"seed {seed} {name}: {cells}")
        print(f"seed {seed}: largest |lm-eval - ours| {record['max_abs_difference']:.4f}")


if __name__ == "__main__":
    main()
