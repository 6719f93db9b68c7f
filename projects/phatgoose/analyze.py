"""The tiny table (Table 1's layout: methods × held-out tasks, mean ± std over seeds) and the routing
analysis (which experts PHATGOOSE and Average Activation pick on each held-out task, §5.2 / Fig. 3).

    python -m projects.phatgoose.analyze runs/phatgoose/tiny   -> <dir>/table.md, <dir>/routing.png
    python -m projects.phatgoose.analyze --real runs/phatgoose/real [--leaderboard results/leaderboard]
        -> <dir>/seed_<s>/results.json, <dir>/table.md, <dir>/routing_real.png + .json (the zoo)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from common.cli import run_main
from common.io import read_json, write_json, write_text
from common.rundir import SCHEMA, markdown_table
from common.seed_stats import format_pm

ROW_NAMES = {
    "base": "Base model (no expert)",
    "multitask": "Multitask",
    "best_single_expert": "Best individual (picked on validation)",
    "merged_experts": "Merged Experts",
    "average_activation": "Average Activation",
    "retrieval": "Retrieval",
    "phatgoose": "PHATGOOSE",
}


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
                row[h.lower()] = format_pm([m[f"{h}/balanced"] for m in ms if f"{h}/balanced" in m], 100)
            row["mean balanced acc"] = format_pm(
                [m["mean_balanced_accuracy"] for m in ms if "mean_balanced_accuracy" in m], 100
            )
        else:
            for h in heldout:
                row[h.lower()] = format_pm([m[h] for m in ms], 100)
            row["mean acc"] = format_pm([m["mean_accuracy"] for m in ms], 100)
            row["mean EM (generation)"] = format_pm(
                [m["mean_exact_match"] for m in ms if "mean_exact_match" in m], 100
            )
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


# --- the real arm (the zoo): the leaderboard's results of the paper's comparison ------------------------

REAL_METHODS = (
    "base",
    "multitask",
    "oracle",
    "best_single_expert",
    "merged_experts",
    "average_activation",
    "retrieval",
    "phatgoose",
)


def real_results(leaderboard: Path, out: Path) -> str:
    """Per seed, `out/seed_<s>/results.json` (experiment `zoo_heldout`, scale real) from the leaderboard's
    `seed_<s>/<entry>.json`; returns the table: held-out test score per task (accuracy, Rouge-L for
    translation) and means, x100, mean ± std over seeds."""
    by_seed: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for method in REAL_METHODS:
        for f in sorted(leaderboard.glob(f"seed_*/{method}.json")):
            r = read_json(f)
            by_seed[r["seed"]][method] = r
    if not by_seed:
        raise FileNotFoundError(
            f"no leaderboard results under {leaderboard}: run `python -m leaderboard.run --entries "
            f"{' '.join(REAL_METHODS[1:])} --seeds 0 1` first"
        )
    held_out = sorted(
        {t for rs in by_seed.values() for r in rs.values() for t in r["test"] if _is_held_out(t)}
    )
    for seed, rs in sorted(by_seed.items()):
        metrics = {
            m: {"held_out": r["held_out"], "in_distribution": r["in_distribution"]}
            | {t: r["test"][t] for t in held_out if t in r["test"]}
            for m, r in rs.items()
        }
        write_json(
            out / f"seed_{seed}" / "results.json",
            {
                "schema": SCHEMA,
                "project": "phatgoose",
                "experiment": "zoo_heldout",
                "scale": "real",
                "seed": seed,
                "metrics": {m: {k: v for k, v in ms.items() if v is not None} for m, ms in metrics.items()},
                "config": {
                    m: {"hparams": r["hparams"], "zoo_settings": r["zoo_settings"]} for m, r in rs.items()
                },
                "provenance": {m: r["provenance"] for m, r in rs.items()},
            },
        )
    rows = []
    for method in REAL_METHODS:
        rs = [by_seed[s][method] for s in sorted(by_seed) if method in by_seed[s]]
        if not rs:
            continue
        row = {"method": ROW_NAMES.get(method, method) if method != "oracle" else "Oracle (own expert)"}
        for t in held_out:
            row[t] = format_pm([r["test"][t] for r in rs if t in r["test"]], 100)
        row["held-out mean"] = format_pm([r["held_out"] for r in rs], 100)
        row["in-distribution mean"] = format_pm([r["in_distribution"] for r in rs], 100)
        row["chosen"] = "; ".join(str(r["hparams"]) for r in rs if r["hparams"]) or "—"
        rows.append(row)
    return markdown_table(rows)


def _is_held_out(task: str) -> bool:
    from common.zoo_tasks import HELD_OUT

    return task in HELD_OUT


def plot_real_routing(root: Path) -> Path | None:
    """Heat map per held-out task: share of its tokens' top-k picks per expert (columns) and layer (rows),
    mean over seeds' `routing_probe.json`; the data beside it in routing_real.json."""
    probes = [read_json(f) for f in sorted(root.glob("seed_*/routing_probe.json"))]
    if not probes:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(probes[0]["tasks"])
    data = {}
    for t in tasks:
        runs = [p["tasks"][t] for p in probes if t in p["tasks"]]
        first = runs[0]
        share = [
            [statistics.fmean(r["share"][i][j] for r in runs) for j in range(len(first["experts"]))]
            for i in range(len(first["layers"]))
        ]
        data[t] = {
            "experts": first["experts"],
            "layers": first["layers"],
            "share": share,
            "skills": first["skills"],
            "skill_share": [statistics.fmean(r["skill_share"][i] for r in runs) for i in range(len(share))],
            "skill_share_uniform": first["skill_share_uniform"],
            "seeds": [p["seed"] for p in probes if t in p["tasks"]],
        }
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4.8), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        d = data[t]
        im = ax.imshow(d["share"], aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_xticks(range(len(d["experts"])), d["experts"], rotation=90, fontsize=6)
        ax.set_yticks(range(len(d["layers"])), d["layers"], fontsize=6)
        ax.set_xlabel("expert (skill experts in red)", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
        for label in ax.get_xticklabels():
            if label.get_text() in d["skills"]:
                label.set_color("red")
        ax.set_title(f"{t}: share of token picks", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(
        f"PHATGOOSE routing on the zoo's held-out tasks (top-{probes[0]['top_k']}, {probes[0]['split']} split, "
        f"mean over {len(probes)} seeds)",
        fontsize=9,
    )
    fig.tight_layout()
    out = root / "routing_real.png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_json(root / "routing_real.json", data)
    return out


def main_real(root: Path, leaderboard: Path) -> str:
    text = (
        "Held-out zoo tasks, test split (accuracy; Rouge-L F for translate_unseen), x100, mean ± std over "
        "seeds; oracle: library tasks only.\n\n" + real_results(leaderboard, root) + "\n"
    )
    write_text(root / "table.md", text)
    plot_real_routing(root)
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "root", nargs="?", default=None, help="runs folder (default runs/phatgoose/tiny, or /real)"
    )
    p.add_argument("--real", action="store_true", help="the zoo's table, results.json and routing heat map")
    p.add_argument(
        "--leaderboard", default="results/leaderboard", help="with --real: the leaderboard's results"
    )
    args = p.parse_args(argv)
    if args.real:
        print(main_real(Path(args.root or "runs/phatgoose/real"), Path(args.leaderboard)))
        return
    root = Path(args.root or "runs/phatgoose/tiny")
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
