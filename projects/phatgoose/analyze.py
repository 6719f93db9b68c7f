"""The tiny table (Table 1's layout: methods × held-out tasks, mean ± std over seeds) and the routing
analysis (which experts PHATGOOSE and Average Activation pick on each held-out task, §5.2 / Fig. 3).

    python -m projects.phatgoose.analyze runs/phatgoose/tiny   -> <dir>/table.md, <dir>/routing.png
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from common.cli import run_main
from common.io import read_json, write_text
from common.rundir import markdown_table

ROW_NAMES = {
    "base": "Base model (no expert)",
    "multitask": "Multitask",
    "best_single_expert": "Best individual (picked on validation)",
    "merged_experts": "Merged Experts",
    "average_activation": "Average Activation",
    "retrieval": "Retrieval",
    "phatgoose": "PHATGOOSE",
}


def _pm(values: list[float]) -> str:
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * std:.1f}"


def seed_results(root: Path) -> list[dict[str, Any]]:
    found = [read_json(p) for p in sorted(root.glob("seed_*/results.json"))]
    if not found:
        raise FileNotFoundError(f"no seed_*/results.json under {root}: run `main.py table -seed S` first")
    return found


def table(records: list[dict[str, Any]], balanced: bool = False) -> str:
    """Accuracy (%) per held-out task and on average, and the mean exact match of greedy generations;
    with `balanced`, class-balanced accuracy (mean recall over classes: a constant answer scores
    100/#classes whatever the class prior)."""
    heldout = records[0]["config"]["heldout"]
    rows = []
    for method, label in ROW_NAMES.items():
        if method not in records[0]["metrics"]:
            continue
        ms = [r["metrics"][method] for r in records]
        row = {"method": label}
        if balanced:
            for h in heldout:
                row[h.lower()] = _pm([m[f"{h}/balanced"] for m in ms if f"{h}/balanced" in m])
            row["mean balanced acc"] = _pm(
                [m["mean_balanced_accuracy"] for m in ms if "mean_balanced_accuracy" in m]
            )
        else:
            for h in heldout:
                row[h.lower()] = _pm([m[h] for m in ms])
            row["mean acc"] = _pm([m["mean_accuracy"] for m in ms])
            row["mean EM (generation)"] = _pm([m["mean_exact_match"] for m in ms if "mean_exact_match" in m])
        rows.append(row)
    return markdown_table(rows)


def timing(records: list[dict[str, Any]]) -> str:
    """Wall time per seed and by phase, and CPU time of the process (minutes), from each seed's results."""
    rows = []
    for r in records:
        row = {
            "seed": r["seed"],
            "total (min)": f"{r['provenance'].get('wall_time_s', float('nan')) / 60:.1f}",
            "CPU total (min)": f"{r.get('cpu_time_s', float('nan')) / 60:.1f}",
        }
        for phase, sec in r.get("seconds_by_phase", {}).items():
            cpu = r.get("cpu_seconds_by_phase", {}).get(phase, float("nan"))
            row[phase] = f"{sec / 60:.1f} ({cpu / 60:.1f})"
        rows.append(row)
    return markdown_table(rows)


def routing_summary(root: Path, method: str) -> dict[str, dict[str, float]]:
    """Held-out task -> expert -> share of top-k picks over all modules and seeds."""
    shares: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for f in sorted(root.glob(f"seed_*/{method}/routing_distribution/*.json")):
        data = read_json(f)
        experts, dist = data["experts"], data["distribution"]
        for i, e in enumerate(experts):
            shares[f.stem][e].append(statistics.fmean(d[i] for d in dist.values()))
    return {t: {e: statistics.fmean(v) for e, v in es.items()} for t, es in shares.items()}


def plot_routing(root: Path, summaries: dict[str, dict[str, dict[str, float]]]) -> Path | None:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m, s in summaries.items() if s]
    if not methods:
        return None
    tasks = sorted(next(iter(summaries[methods[0]].values())) and summaries[methods[0]])
    fig, axes = plt.subplots(len(methods), 1, figsize=(8, 3.6 * len(methods)), squeeze=False)
    for ax, method in zip(axes[:, 0], methods):
        experts = list(next(iter(summaries[method].values())))
        width = 0.8 / len(tasks)
        for j, t in enumerate(tasks):
            ax.bar(
                [i + j * width for i in range(len(experts))],
                [summaries[method][t][e] for e in experts],
                width,
                label=t.lower(),
            )
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(experts))],
            [e.lower() for e in experts],
            rotation=30,
            ha="right",
            fontsize=7,
        )
        ax.set_ylabel("share of picks")
        ax.set_title(
            f"{ROW_NAMES[method]}: experts picked on held-out tasks (all modules, mean over seeds)",
            fontsize=9,
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = root / "routing.png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_text(root / "routing.json", json.dumps(summaries, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", nargs="?", default="runs/phatgoose/tiny")
    args = p.parse_args(argv)
    root = Path(args.root)
    records = seed_results(root)
    seeds = f"mean ± std over {len(records)} seeds (seeds {[r['seed'] for r in records]})"
    text = (
        f"Held-out zero-shot accuracy (%), rank classification (length-normalised), {seeds}.\n\n"
        + table(records)
        + f"\n\nHeld-out class-balanced accuracy (%, mean recall over the gold classes: a constant answer "
        f"scores 100/k on a task whose test split has k gold classes), {seeds}.\n\n"
        + table(records, balanced=True)
        + "\n\nWall time per seed and by phase, minutes (in parentheses: the process's CPU time).\n\n"
        + timing(records)
        + "\n"
    )
    write_text(root / "table.md", text)
    plot_routing(root, {m: routing_summary(root, m) for m in ("phatgoose", "average_activation")})
    print(text)


if __name__ == "__main__":
    sys.exit(run_main(main))
