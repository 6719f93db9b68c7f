"""The expert zoo's classification tasks as lm-eval tasks, and a model's accuracy on them through lm-eval.

`write_tasks` writes a split of each task as `<out>/zoo_<task>.jsonl` with an lm-eval task YAML beside it
(multiple choice over the record's `choices`, the prompt its `source`, the answer its `label`). lm-eval
scores `" " + choice` after the prompt by summed log-likelihood (`acc`), which is what `zoo.score` computes
with our own rank classification, so the two must agree on the same model (tested). Any model then loads
into lm-eval's CLI:

    python -m common.zoo_lm_eval --tasks language_id_union sentiment_deflategate --split test --out DIR
    lm_eval --model hf --model_args pretrained=<a saved model> --include_path DIR --tasks zoo_language_id_union

Generation tasks are left out: lm-eval ships no Rouge-L metric (its tasks that report ROUGE compute it in
their own code), and the zoo scores generation by Rouge-L F.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from common import zoo
from common.io import write_text
from common.zoo_tasks import HELD_OUT, LIBRARY

PREFIX = "zoo_"


def lm_eval_name(task: str) -> str:
    """The lm-eval task name of a zoo task."""
    return PREFIX + task


def classification_tasks(tasks: Sequence[str], settings: zoo.ZooSettings = zoo.DEFAULT) -> list[str]:
    """The classification tasks among `tasks` (the ones lm-eval scores as the zoo does)."""
    return [t for t in tasks if zoo.splits(t, settings)["validation"][0]["kind"] == "classification"]


def write_tasks(
    tasks: Sequence[str], split: str, out: str | os.PathLike, settings: zoo.ZooSettings = zoo.DEFAULT
) -> list[str]:
    """Write `split` of each classification task in `tasks` (the records `zoo.score` reads at these
    settings' sizes) as an lm-eval task under `out`; returns the lm-eval task names."""
    from common.lm_eval_bridge import write_task_yaml

    out = Path(out)
    names = []
    for task in tasks:
        records = zoo.splits(task, settings)[split]
        if records[0]["kind"] != "classification":
            raise ValueError(
                f"zoo task {task!r} is scored by Rouge-L, which lm-eval does not have; pick classification tasks"
            )
        data = out / f"{lm_eval_name(task)}.jsonl"
        fields = ("source", "choices", "label")
        write_text(data, "".join(json.dumps({k: r[k] for k in fields}) + "\n" for r in records))
        write_task_yaml(
            out,
            lm_eval_name(task),
            data,
            "multiple_choice",
            doc_to_text="source",
            doc_to_choice="choices",
            doc_to_target="label",
            split=split,
        )
        names.append(lm_eval_name(task))
    return names


def lm_eval_accuracy(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    split: str,
    workdir: str | os.PathLike,
    settings: zoo.ZooSettings = zoo.DEFAULT,
    batch_size: int = 16,
) -> dict[str, float]:
    """{zoo task: lm-eval `acc`} of an in-memory model on `split` of each classification task."""
    from common.lm_eval_bridge import evaluate_in_memory

    names = write_tasks(tasks, split, workdir, settings)
    metrics = evaluate_in_memory(model, tokenizer, names, include_path=workdir, batch_size=batch_size)
    return {task: float(metrics[lm_eval_name(task)]["acc"]) for task in tasks}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m common.zoo_lm_eval", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=list(HELD_OUT),
        help="zoo tasks (default: the held-out ones); generation tasks are skipped",
    )
    parser.add_argument("--split", default="test", choices=["validation", "test"])
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for the task files (lm_eval --include_path)"
    )
    args = parser.parse_args(argv)
    unknown = [t for t in args.tasks if t not in (*LIBRARY, *HELD_OUT)]
    if unknown:
        parser.error(f"unknown zoo tasks {unknown}; choose from {[*LIBRARY, *HELD_OUT]}")
    tasks = classification_tasks(args.tasks)
    skipped = sorted(set(args.tasks) - set(tasks))
    names = write_tasks(tasks, args.split, args.out)
    print(
        f"wrote {', '.join(names)} to {args.out}"
        + (f" (generation tasks skipped: {skipped})" if skipped else "")
    )


if __name__ == "__main__":
    main()
