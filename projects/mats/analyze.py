"""The paper's multitask table from the per-seed results of `reproduce.py`: test accuracy (rank
classification, mean over the mixture's tasks) as mean ± std over seeds, full fine-tuning and (IA)^3;
and the paper's figures: per-task test accuracy by method (`per_task_<format>.png`) and validation accuracy
against the merge's λ (`lambda_<format>.png`: model_lambda for RegMean, Fisher and MaTS, the scaling
factor for task arithmetic and TIES), each with its data as JSON beside it.

At `--scale real` the per-seed results come from the leaderboard on the SmolLM2 zoos
(`--leaderboard ia3=results/leaderboard/ia3 full_model=results/leaderboard/full`): `from_leaderboard` turns
each `seed_<s>/<entry>.json` into `<runs>/real/<format>/seed<s>/results.json` (the mean test score over
the library tasks: accuracy, or Rouge-L F for generative tasks) before the table is made."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from common.cli import UserError, run_main
from common.io import read_json, write_json, write_text
from common.rundir import SCHEMA, markdown_table, provenance
from common.seed_stats import format_pm

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
# Rows shown only where some column has them (the real scale's extra leaderboard entries).
EXTRA_ROWS = (
    ("base", "Pretrained"),
    ("diagonal_fisherMerging_true", "Fisher (true)"),
    ("cg_regmean", "CG, RegMean objective"),
    ("cg_diagonal_fisher", "CG, diagonal Fisher objective"),
    ("cg_average", "CG, average objective"),
    ("mats_from_regmean", "MaTS from RegMean (ablation)"),
)
# leaderboard entry -> table row (leaderboard/baselines.py, leaderboard/mats.py)
LEADERBOARD_ROWS = {
    "base": "base",
    "oracle": "individual",
    "multitask": "multitask",
    "uniform": "average",
    "task_arithmetic": "task_vectors",
    "ties": "ties",
    "fisher_diag": "diagonal_fisherMerging",
    "fisher_diag_true": "diagonal_fisherMerging_true",
    "regmean": "regmean",
    "mats_cg": "mats",
    "cg_regmean": "cg_regmean",
    "cg_diagonal_fisher": "cg_diagonal_fisher",
    "cg_average": "cg_average",
    "mats_cg_from_regmean": "mats_from_regmean",
}


def table(runs: Path, scale: str) -> str:
    """Markdown table: one row per method, one column per format."""
    columns = {}
    for fmt in ("full_model", "ia3"):
        records = [read_json(p) for p in sorted((runs / scale / fmt).glob("seed*/results.json"))]
        columns[fmt] = {
            key: [r["metrics"][key] for r in records if key in r["metrics"]]
            for key, _ in (*ROWS, *EXTRA_ROWS)
        }
    shown = [*ROWS, *((k, label) for k, label in EXTRA_ROWS if any(c[k] for c in columns.values()))]
    rows = [
        {
            "method": label,
            "full fine-tuning": format_pm(columns["full_model"][key], 100, show_n=True),
            "(IA)^3": format_pm(columns["ia3"][key], 100, show_n=True),
        }
        for key, label in shown
    ]
    return markdown_table(rows)


def from_leaderboard(leaderboard: Path, fmt: str, runs: Path, scale: str = "real") -> list[Path]:
    """Write `<runs>/<scale>/<fmt>/seed<s>/results.json` ({"metrics": {row: mean library test score},
    "per_task": {row: {task: score}}}) from a leaderboard folder's `seed_<s>/<entry>.json`; entries that
    are not MaTS rows (LEADERBOARD_ROWS) are left out. Returns the files written."""
    from common.zoo_tasks import HELD_OUT

    if fmt not in FORMATS:
        raise UserError(f"--leaderboard format {fmt!r}: choose one of {list(FORMATS)}")
    seeds = sorted(leaderboard.glob("seed_*"))
    if not seeds:
        raise UserError(
            f"{leaderboard} holds no seed_<s>/ results: run `python -m leaderboard.run --adapter ...` first"
        )
    written = []
    for folder in seeds:
        metrics: dict[str, float] = {}
        tasks: dict[str, dict[str, float]] = {}
        for path in sorted(folder.glob("*.json")):
            result = read_json(path)
            row = LEADERBOARD_ROWS.get(result.get("entry", ""))
            if row is None or result.get("in_distribution") is None:
                continue
            metrics[row] = result["in_distribution"]
            tasks[row] = {t: v for t, v in result["test"].items() if t not in HELD_OUT}
        seed = int(folder.name.removeprefix("seed_"))
        out = runs / scale / fmt / f"seed{seed}" / "results.json"
        # our results schema (common.rundir), so that `common.results_md --scale real` grades paper.yaml's
        # real_<format> claims; written directly, as RunDir's scales are the tiny reproduction's
        record = {
            "schema": SCHEMA,
            "project": "mats",
            "experiment": f"{scale}_{fmt}",
            "scale": scale,
            "seed": seed,
            "metrics": metrics,
            "config": {"leaderboard": str(folder), "format": fmt},
            "provenance": provenance(seed, time.time()),
            "per_task": tasks,
        }
        write_json(out, record)
        written.append(out)
    return written


FORMATS = {"full_model": "full fine-tuning", "ia3": "(IA)^3"}


def per_task(runs: Path, scale: str, fmt: str) -> dict[str, dict[str, list[float]]]:
    """{method: {task: [test accuracy per seed]}} from each seed's `per_task`."""
    out: dict[str, dict[str, list[float]]] = {}
    for path in sorted((runs / scale / fmt).glob("seed*/results.json")):
        for method, scores in read_json(path).get("per_task", {}).items():
            for task, value in scores.items():
                if task != "average":
                    out.setdefault(method, {}).setdefault(task, []).append(value)
    return out


def lambda_curves(runs: Path, scale: str, fmt: str) -> dict[str, dict[float, list[float]]]:
    """{merge: {λ: [validation average per seed]}} from the merges' `sweep` (those that swept λ)."""
    out: dict[str, dict[float, list[float]]] = {}
    merging = f"seed*/exp_out/merging/*/*/*/{fmt}"
    for path in sorted((runs / scale).glob(f"{merging}/*/results.json")) + sorted(
        (runs / scale).glob(f"{merging}/conjugate_gradients/*/results.json")
    ):
        record = read_json(path)
        sweep = record.get("sweep") or []
        if len(sweep) < 2:
            continue
        method = record.get("merge", {}).get("method", path.parent.name)
        for point in sweep:
            out.setdefault(method, {}).setdefault(float(point["model_lambda"]), []).append(point["average"])
    return out


def _plot_per_task(data: dict[str, dict[str, list[float]]], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [key for key, _ in ROWS if key in data]
    tasks = sorted({t for m in methods for t in data[m]})
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks)), 3.5))
    labels = dict(ROWS)
    for i, m in enumerate(methods):
        means = [100 * statistics.fmean(data[m][t]) if data[m].get(t) else 0.0 for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], means, width, label=labels[m])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plot_lambda(data: dict[str, dict[float, list[float]]], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, curve in sorted(data.items()):
        xs = sorted(curve)
        ax.plot(xs, [100 * statistics.fmean(curve[x]) for x in xs], marker="o", label=method)
    ax.set_xlabel("λ")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def figures(runs: Path, scale: str) -> list[Path]:
    """Write per_task_<fmt>.png and lambda_<fmt>.png (+ .json with the means and the per-seed values)."""
    written = []
    for fmt, name in FORMATS.items():
        bars = per_task(runs, scale, fmt)
        if bars:
            out = runs / scale / f"per_task_{fmt}.png"
            _plot_per_task(bars, f"MaTS {scale}, {name}: test accuracy per task", out)
            means = {m: {t: statistics.fmean(v) for t, v in tasks.items()} for m, tasks in bars.items()}
            write_json(out.with_suffix(".json"), {"mean": means, "per_seed": bars})
            written.append(out)
        curves = lambda_curves(runs, scale, fmt)
        if curves:
            out = runs / scale / f"lambda_{fmt}.png"
            _plot_lambda(curves, f"MaTS {scale}, {name}: validation accuracy against λ", out)
            means = {m: {str(x): statistics.fmean(v) for x, v in c.items()} for m, c in curves.items()}
            per_seed = {m: {str(x): v for x, v in c.items()} for m, c in curves.items()}
            write_json(out.with_suffix(".json"), {"mean": means, "per_seed": per_seed})
            written.append(out)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/mats"))
    ap.add_argument("--scale", default="tiny")
    ap.add_argument(
        "--leaderboard",
        nargs="+",
        default=[],
        metavar="FORMAT=DIR",
        help="read each format's results from a leaderboard folder first (real scale), e.g. ia3=results/leaderboard/ia3",
    )
    a = ap.parse_args(argv)
    for item in a.leaderboard:
        fmt, sep, folder = item.partition("=")
        if not sep:
            raise UserError(f"--leaderboard {item!r}: write FORMAT=DIR, e.g. ia3=results/leaderboard/ia3")
        from_leaderboard(Path(folder), fmt, a.runs, a.scale)
    metric = (
        "test score (%; accuracy, Rouge-L F for generative tasks)" if a.leaderboard else "test accuracy (%)"
    )
    text = table(a.runs, a.scale)
    write_text(a.runs / a.scale / "table.md", f"## MaTS, {a.scale} scale: {metric}\n\n{text}\n")
    print(text)
    for path in figures(a.runs, a.scale):
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(run_main(main))
