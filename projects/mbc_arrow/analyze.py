"""Tables and plots of the notebook runs: mean ± std over seeds of in-distribution Rouge-L and held-out accuracy.

python -m projects.mbc_arrow.analyze --runs runs/mbc_arrow/tiny --out runs/mbc_arrow/tiny/table [--routing]

`--routing` adds Arrow's routing distribution on the validation split, recomputed from each seed's saved
libraries (`routing_analysis`): the fraction of tokens sent to their own expert (task, or MBC cluster)
against chance, and a task × expert heatmap.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from common.cli import run_main
from common.io import read_json, write_json, write_text
from common.rundir import RunDir, markdown_table
from projects.mbc_arrow.notebook import DOWNSTREAM, IN_DISTRIBUTION, plot_bars


def notebook_results(runs: Path) -> list[dict[str, Any]]:
    """Each seed's results.json, with the folder it was read from as `run_dir`."""
    found = [{**read_json(p), "run_dir": p.parent} for p in sorted(runs.glob("*/results.json"))]
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


def routing(records: list[dict[str, Any]], rd: RunDir) -> str:
    """Arrow's own-expert routing rate per library (mean ± std over seeds) and the seed-mean heatmaps."""
    from projects.mbc_arrow.routing_analysis import arrow_routing
    from projects.mbc_arrow.tasks import task_data

    per_seed: dict[str, list[dict[str, Any]]] = {"private": [], "mbc": []}
    for r in records:
        cfg, seed_dir = r["config"], r["run_dir"]
        val = task_data(cfg["tasks"], dataset=cfg["dataset"], max_eval=cfg["max_eval_examples"])["validation"]
        for lib, folder in (("private", "library"), ("mbc", "mbc_library")):
            if (seed_dir / folder).is_dir():
                per_seed[lib].append(
                    arrow_routing(
                        f"local://{seed_dir / folder}",
                        val,
                        cfg["max_input_length"],
                        cfg.get("prompt_format", "answer"),  # runs before the key had this format
                    )
                )
    write_json(rd.path / "routing.json", per_seed)
    rows = []
    for lib, found in per_seed.items():
        if not found:
            continue
        rate = mean_std([f["own_expert_rate"]["mean"] for f in found])
        rows.append(
            {
                "library": lib,
                "experts": len(found[0]["experts"]),
                "tokens routed to their own expert (%)": f"{rate[0] * 100:.1f} ± {rate[1] * 100:.1f}",
                "chance (%)": f"{found[0]['chance'] * 100:.1f}",
            }
        )
        _heatmap(rd, f"routing_{lib}", found)
    return (
        "\nArrow top-1 routing on the validation split (all layers and tokens), mean ± std over seeds:\n\n"
        + (markdown_table(rows))
    )


def _heatmap(rd: RunDir, name: str, found: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mean = np.mean([f["matrix"] for f in found], axis=0)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * mean.shape[1], 1.0 + 0.4 * mean.shape[0]))
    im = ax.imshow(mean, vmin=0, vmax=max(float(mean.max()), 1e-9), cmap="viridis")
    ax.set_xticks(range(mean.shape[1]), found[0]["experts"], rotation=60, ha="right")
    ax.set_yticks(range(mean.shape[0]), found[0]["tasks"])
    ax.set_xlabel("Arrow top-1 expert")
    fig.colorbar(im, ax=ax, label="fraction of tokens")
    rd.save_plot(
        fig, name, {"experts": found[0]["experts"], "tasks": found[0]["tasks"], "matrix": mean.tolist()}
    )
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, help="folder whose sub-folders hold notebook results.json")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--routing", action="store_true", help="add Arrow's routing distribution (validation split)"
    )
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
    if args.routing:
        table += routing(records, rd) + "\n"
    write_text(rd.path / "table.md", table)
    print(table)


if __name__ == "__main__":
    sys.exit(run_main(main))
