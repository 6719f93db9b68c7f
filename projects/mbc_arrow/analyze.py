"""Tables and plots of the notebook runs: mean ± std over seeds of in-distribution Rouge-L and held-out accuracy.

python -m projects.mbc_arrow.analyze --runs runs/mbc_arrow/tiny --out runs/mbc_arrow/tiny/table
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from common.io import read_json, write_text
from common.rundir import RunDir, markdown_table
from projects.mbc_arrow.notebook import DOWNSTREAM, IN_DISTRIBUTION, plot_bars


def notebook_results(runs: Path) -> list[dict[str, Any]]:
    found = [read_json(p) for p in sorted(runs.glob("*/results.json"))]
    return [r for r in found if r.get("project") == "mbc_arrow" and r.get("experiment") == "notebook"]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    out: dict[str, dict[str, tuple[float, float]]] = {"rouge": {}, "loss": {}, "downstream": {}}
    for group, names in (("rouge", IN_DISTRIBUTION), ("loss", IN_DISTRIBUTION), ("downstream", DOWNSTREAM)):
        for n in names:
            values = [r["metrics"][group][n] for r in records if n in r["metrics"].get(group, {})]
            out[group][n] = mean_std(values) if values else (float("nan"), float("nan"))
    return out


def render(records: list[dict[str, Any]]) -> str:
    s = summarise(records)
    seeds = sorted(r["seed"] for r in records)
    fmt = lambda ms, scale=1.0: f"{ms[0] * scale:.2f} ± {ms[1] * scale:.2f}"  # noqa: E731
    rows = [
        {"selector": n, "Rouge-L (test)": fmt(s["rouge"][n]), "target loss (test)": fmt(s["loss"][n])}
        for n in IN_DISTRIBUTION
    ]
    down = [{"model": n, "held-out accuracy (%)": fmt(s["downstream"][n], 100)} for n in DOWNSTREAM]
    clusters = [r["clusters"] for r in records]
    return "\n".join(
        [
            f"In-distribution Rouge-L (×100) and target loss, {len(records)} seeds {seeds}, mean ± std:\n",
            markdown_table(rows),
            "\nHeld-out multiple choice (lm-eval, accuracy):\n",
            markdown_table(down),
            "\nMBC clusters per seed: " + "; ".join(str(c) for c in clusters),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, help="folder whose sub-folders hold notebook results.json")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    records = notebook_results(Path(args.runs))
    if not records:
        raise SystemExit(f"error: no mbc_arrow notebook results under {args.runs}")
    rd = RunDir(
        args.out,
        project="mbc_arrow",
        experiment="table",
        scale=records[0]["scale"],
        seed=None,
        config={"runs": args.runs, "seeds": [r["seed"] for r in records]},
    )
    s = summarise(records)
    plot_bars(rd, "rouge_in_distribution_mean", {k: v[0] for k, v in s["rouge"].items()}, "Rouge-L (test)")
    plot_bars(rd, "target_loss_mean", {k: v[0] for k, v in s["loss"].items()}, "target loss (test)")
    plot_bars(
        rd, "downstream_heldout_mean", {k: v[0] for k, v in s["downstream"].items()}, "held-out accuracy"
    )
    table = render(records)
    write_text(rd.path / "table.md", table)
    print(table)


if __name__ == "__main__":
    main()
