"""The real arm (SMILE over the SmolLM2-135M expert zoo): the table, the claims' metrics, the
params-vs-accuracy plot and the per-layer routing heat map, from what the leaderboard wrote.

Inputs (nothing is computed on a model here): `<leaderboard>/seed_<s>/<entry>.json` of
`python -m leaderboard.run` (fields: in_distribution, held_out, params_vs_base, hparams, search, test) and
`<leaderboard>/smile_routing/seed_<s>.json` of `python -m leaderboard.smile_routing` (own_share_by_layer, chance).
Per seed a `summary/results.json` (experiment `real_zoo`, read by RESULTS.md and `paper.yaml`'s claims):

    <entry>.in_distribution, <entry>.held_out, <entry>.params_vs_base
    smile.gap_to_individual = oracle.in_distribution − smile.in_distribution
    top_k_<t>_validation   = smile's validation score at (gate_k 8, k 8, top_k t); t = 8 from `smile_top8`
    routing.own_share      = the own expert's share of a library task's tokens, mean over tasks and layers
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.io import read_json
from common.rundir import RunDir
from common.seed_stats import format_pm, seed_summary

ENTRY_ORDER = ("base", "oracle", "multitask", "smile", "smile_top8", "uniform", "task_arithmetic")
ROUTING = "smile_routing"  # <leaderboard>/smile_routing/seed_<s>.json
TOP_K_POINT = {"gate_k": 8, "k": 8}  # where the top_k ablation is read (the paper's LLM point, cut at rank 8)


def leaderboard_results(root: str | Path) -> dict[int, dict[str, dict[str, Any]]]:
    """{seed: {entry: its result}} under `root` (seed_<s>/<entry>.json; the routing files left out)."""
    found: dict[int, dict[str, dict[str, Any]]] = {}
    for path in sorted(Path(root).glob("seed_*/*.json")):
        record = read_json(path)
        if "entry" in record and "params_vs_base" in record:
            found.setdefault(int(path.parent.name.removeprefix("seed_")), {})[record["entry"]] = record
    return found


def routing_results(root: str | Path) -> list[dict[str, Any]]:
    return [read_json(p) for p in sorted((Path(root) / ROUTING).glob("seed_*.json"))]


def _validation_at(result: Mapping[str, Any], hparams: Mapping[str, Any]) -> float | None:
    for point in result.get("search", []):
        if all(point["hparams"].get(k) == v for k, v in hparams.items()):
            return float(point["validation"])
    return None


def seed_metrics(
    entries: Mapping[str, Mapping[str, Any]], routing: Mapping[str, Any] | None
) -> dict[str, float]:
    """One seed's metrics for `paper.yaml`'s `real_zoo` claims (absent inputs leave their metrics out)."""
    metrics: dict[str, float] = {}
    for name, r in entries.items():
        for field in ("in_distribution", "held_out", "params_vs_base"):
            if r.get(field) is not None:
                metrics[f"{name}.{field}"] = float(r[field])
    if "smile.in_distribution" in metrics and "oracle.in_distribution" in metrics:
        metrics["smile.gap_to_individual"] = (
            metrics["oracle.in_distribution"] - metrics["smile.in_distribution"]
        )
    if "smile" in entries:
        for t in (1, 2, 4):
            v = _validation_at(entries["smile"], TOP_K_POINT | {"top_k": t})
            if v is not None:
                metrics[f"top_k_{t}_validation"] = v
    if "smile_top8" in entries and (v := _validation_at(entries["smile_top8"], TOP_K_POINT)) is not None:
        metrics["top_k_8_validation"] = v
    if routing:
        shares = [s for per_layer in routing["own_share_by_layer"].values() for s in per_layer]
        metrics["routing.own_share"] = statistics.fmean(shares)
        metrics["routing.chance"] = float(routing["chance"])
    return metrics


def write_summaries(leaderboard: str | Path, runs: str | Path) -> list[Path]:
    """`<runs>/seed_<s>/summary/results.json` (project smile, experiment real_zoo, scale real) per seed."""
    routing = {r["seed"]: r for r in routing_results(leaderboard)}
    written = []
    for seed, entries in leaderboard_results(leaderboard).items():
        rd = RunDir(
            Path(runs) / f"seed_{seed}" / "summary",
            project="smile",
            experiment="real_zoo",
            scale="real",
            seed=seed,
            config={"leaderboard": str(leaderboard), "entries": sorted(entries)},
        )
        written.append(rd.write_results(seed_metrics(entries, routing.get(seed))))
    return written


def table(results: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per entry: in-distribution / held-out test score (x100) and size, mean ± std over seeds."""
    names = sorted({n for entries in results.values() for n in entries}, key=_order)
    rows = []
    for name in names:
        rs = [entries[name] for entries in results.values() if name in entries]
        rows.append(
            {
                "method": name,
                "seeds": len(rs),
                "in-distribution": format_pm([r["in_distribution"] for r in rs], 100),
                "held-out": format_pm([r["held_out"] for r in rs], 100),
                "params (x base)": format_pm([r["params_vs_base"] for r in rs], 1, 3),
                "chosen": "; ".join(str(r["hparams"]) for r in rs if r["hparams"]) or "—",
            }
        )
    return rows


def _order(name: str) -> tuple[int, str]:
    return (ENTRY_ORDER.index(name) if name in ENTRY_ORDER else len(ENTRY_ORDER), name)


def plot_params_vs_accuracy(results: Mapping[int, Mapping[str, Mapping[str, Any]]], rd: RunDir) -> Path:
    """In-distribution test score against parameters stored (x base), one point per entry (mean over
    seeds, bars: std), as the paper's accuracy-vs-size figure; the data beside it as JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for row in table(results):
        rs = [e[row["method"]] for e in results.values() if row["method"] in e]
        stat = seed_summary(r["in_distribution"] for r in rs)
        if stat:
            points.append(
                {
                    "entry": row["method"],
                    "params_vs_base": statistics.fmean(r["params_vs_base"] for r in rs),
                    "in_distribution": stat[0],
                    "std": stat[1],
                    "seeds": stat[2],
                }
            )
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, p in enumerate(points):
        ax.errorbar(
            p["params_vs_base"], 100 * p["in_distribution"], yerr=100 * p["std"], fmt="o", color=f"C{i}"
        )
        ax.annotate(
            p["entry"],
            (p["params_vs_base"], 100 * p["in_distribution"]),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax.set_xlabel("parameters stored to serve every task (x base)")
    ax.set_ylabel("library tasks, test score (x100)")
    ax.set_title("SmolLM2-135M expert zoo", fontsize=9)
    path = rd.save_plot(fig, "real_params_vs_accuracy", {"points": points})
    plt.close(fig)
    return path


def own_share_matrix(routings: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """{"tasks", "layers", "share": [task][layer] own-expert share (mean over seeds), "chance", "seeds"}."""
    if not routings:
        raise ValueError(
            "no smile_routing/seed_*.json: run `python -m leaderboard.smile_routing` after the leaderboard"
        )
    tasks = list(routings[0]["own_share_by_layer"])
    n_layers = len(routings[0]["own_share_by_layer"][tasks[0]])
    share = [
        [statistics.fmean(r["own_share_by_layer"][t][i] for r in routings) for i in range(n_layers)]
        for t in tasks
    ]
    return {
        "tasks": tasks,
        "layers": list(range(n_layers)),
        "share": share,
        "chance": routings[0]["chance"],
        "seeds": [r["seed"] for r in routings],
        "hparams": [r["hparams"] for r in routings],
    }


def plot_routing(routings: Sequence[Mapping[str, Any]], rd: RunDir) -> Path:
    """Heat map: per library task (rows) and decoder layer (columns), the share of the task's tokens that the
    layer's routers send to the task's own expert (chance 1/T marked in the colour bar)."""
    data = own_share_matrix(routings)
    title = f"SMILE: own-expert share of each task's tokens (chance {data['chance']:.2f})"
    return plot_own_share(data, rd, "real_routing_own_share", title, "decoder layer")


def plot_own_share(data: Mapping[str, Any], rd: RunDir, name: str, title: str, xlabel: str) -> Path:
    """`own_share_matrix`'s data (or a superset) as a task × layer heat map, saved as `name`.png + .json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * len(data["layers"]) + 2), 0.3 * len(data["tasks"]) + 1.5))
    image = ax.imshow(data["share"], vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(data["tasks"])), data["tasks"], fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers, not 0.5 steps (a 3-layer tower)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    bar = fig.colorbar(image, ax=ax)
    bar.ax.axhline(data["chance"], color="w", lw=1)
    path = rd.save_plot(fig, name, data)
    plt.close(fig)
    return path


def write(leaderboard: str | Path, runs: str | Path, out: str | Path, config: Mapping[str, Any]) -> str:
    """The real arm's summaries, plots and markdown section (empty when the leaderboard has no results)."""
    from common.rundir import markdown_table

    results = leaderboard_results(leaderboard)
    if not results:
        return ""
    write_summaries(leaderboard, runs)
    rd = RunDir(  # its own folder: `out` itself is the tiny tables' run folder
        Path(out) / "real_zoo",
        project="smile",
        experiment="real_zoo_table",
        scale="real",
        seed=None,
        config=dict(config),
    )
    plot_params_vs_accuracy(results, rd)
    parts = [
        f"# SMILE on the SmolLM2-135M expert zoo, {len(results)} seeds (mean ± std; `{leaderboard}`)\n",
        markdown_table(table(results)) + "\n",
    ]
    routings = routing_results(leaderboard)
    if routings:
        plot_routing(routings, rd)
        data = own_share_matrix(routings)
        rows = [
            {
                "task": t,
                "own expert, all layers (%)": f"{100 * statistics.fmean(s):.1f}",
                "min layer (%)": f"{100 * min(s):.1f}",
                "max layer (%)": f"{100 * max(s):.1f}",
            }
            for t, s in zip(data["tasks"], data["share"])
        ]
        parts.append(
            f"## Routing: own-expert share per task (chance {100 * data['chance']:.1f}%)\n\n{markdown_table(rows)}\n"
        )
    return "\n".join(parts)
