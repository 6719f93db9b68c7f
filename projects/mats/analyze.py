"""The paper's multitask table from the per-seed results of `reproduce.py`: test accuracy (rank
classification, mean over the mixture's tasks) as mean ± std over seeds, full fine-tuning and (IA)^3."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from common.cli import run_main
from common.io import read_json, write_text
from common.rundir import markdown_table

ROWS = (
    ("individual", "Individual"),
    ("multitask", "Multitask"),
    ("average", "Average"),
    ("task_vectors", "Task arithmetic"),
    ("ties", "TIES"),
    ("diagonal_fisherMerging", "Fisher"),
    ("regmean", "RegMean"),
    ("mats", "MaTS"),
)


def _cell(values: list[float]) -> str:
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * std:.1f} (n={len(values)})"


def table(runs: Path, scale: str) -> str:
    """Markdown table: one row per method, one column per format."""
    columns = {}
    for fmt in ("full_model", "ia3"):
        records = [read_json(p) for p in sorted((runs / scale / fmt).glob("seed*/results.json"))]
        columns[fmt] = {key: [r["metrics"][key] for r in records if key in r["metrics"]] for key, _ in ROWS}
    rows = [
        {
            "method": label,
            "full fine-tuning": _cell(columns["full_model"][key]),
            "(IA)^3": _cell(columns["ia3"][key]),
        }
        for key, label in ROWS
    ]
    return markdown_table(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/mats"))
    ap.add_argument("--scale", default="tiny")
    a = ap.parse_args(argv)
    text = table(a.runs, a.scale)
    write_text(a.runs / a.scale / "table.md", f"## MaTS, {a.scale} scale: test accuracy (%)\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    sys.exit(run_main(main))
