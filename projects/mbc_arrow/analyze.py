"""Tables and plots of the notebook runs: mean ± std over seeds of in-distribution Rouge-L and held-out accuracy.

python -m projects.mbc_arrow.analyze --runs runs/mbc_arrow/tiny --out runs/mbc_arrow/tiny/table [--routing]

`--routing` adds Arrow's routing distribution on the validation split, recomputed from each seed's saved
libraries (`routing_analysis`): the fraction of tokens sent to their own expert (task, or MBC cluster)
against chance, and a task × expert heatmap.

python -m projects.mbc_arrow.analyze --real [--leaderboard results/leaderboard] [--out runs/mbc_arrow/real] [--routing]

The real arm (the zoo): `seed_<s>/results.json` and `table.md` from the leaderboard's entries; `--routing`
adds each seed's Arrow routing per layer depth (`real.routing_report`) and the heat maps
`routing_real_{own_expert,own_cluster,mbc_own_cluster}.png` (+ JSON).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.cli import UserError, run_main
from common.io import read_json, write_json, write_text
from common.rundir import SCHEMA, RunDir, markdown_table
from common.seed_stats import format_pm, seed_summary
from projects.mbc_arrow.notebook import DOWNSTREAM, IN_DISTRIBUTION, plot_bars


def notebook_results(runs: Path) -> list[dict[str, Any]]:
    """Each seed's results.json, with the folder it was read from as `run_dir`."""
    found = [{**read_json(p), "run_dir": p.parent} for p in sorted(runs.glob("*/results.json"))]
    return [r for r in found if r.get("project") == "mbc_arrow" and r.get("experiment") == "notebook"]


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    out: dict[str, dict[str, tuple[float, float]]] = {"rouge": {}, "loss": {}, "downstream": {}}
    for group, names in (("rouge", IN_DISTRIBUTION), ("loss", IN_DISTRIBUTION), ("downstream", DOWNSTREAM)):
        for n in names:
            values = [r["metrics"][group][n] for r in records if n in r["metrics"].get(group, {})]
            stat = seed_summary(values)
            out[group][n] = stat[:2] if stat else (float("nan"), float("nan"))
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
        rows.append(
            {
                "library": lib,
                "experts": len(found[0]["experts"]),
                "tokens routed to their own expert (%)": format_pm(
                    [f["own_expert_rate"]["mean"] for f in found], 100
                ),
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


# --- the real arm (the zoo): the leaderboard's results and Arrow's routing per layer depth -------------

REAL_ENTRIES = ("base", "oracle", "uniform", "arrow", "arrow_gks", "mbc_oracle", "mbc_uniform", "mbc_arrow")
ROUTING_MAPS = {  # heat map name -> (library, share)
    "routing_real_own_expert": ("private", "own_expert"),
    "routing_real_own_cluster": ("private", "own_cluster"),
    "routing_real_mbc_own_cluster": ("mbc", "own_cluster"),
}


def gap_closed(arrow: float, uniform: float, oracle: float) -> float | None:
    """(arrow - uniform) / (oracle - uniform): the share of the uniform-to-oracle gap Arrow closes."""
    return (arrow - uniform) / (oracle - uniform) if oracle != uniform else None


def routing_summary(report: Mapping[str, Any]) -> dict[str, float]:
    """Mean over tasks and layer depths of each own share in a `real.routing_report`, with its chance."""
    out = {}
    for lib, share in ROUTING_MAPS.values():
        tasks = report["libraries"][lib]["tasks"].values()
        out[f"{lib}_{share}"] = statistics.fmean(statistics.fmean(t[share]) for t in tasks)
        out[f"{lib}_{share}_chance"] = statistics.fmean(t[f"chance_{share}"] for t in tasks)
    return out


def seed_routing(
    out: Path, seed: int, settings: Any, tasks: Sequence[str], gks: str = "none"
) -> dict[str, Any]:
    """`out/seed_<s>/routing.json`: `real.routing_report` of the seed, reused while the experts are the same."""
    from projects.mbc_arrow import real

    key = {
        "experts": {t: p.name for t, p in real.library_experts(seed, settings, tasks).items()},
        "zoo_settings": settings.key(),
        "gks": gks,
        "mbc": {**real.MBC, "experts_per_cluster": real.EXPERTS_PER_CLUSTER},
    }
    path = out / f"seed_{seed}" / ("routing.json" if gks == "none" else f"routing_gks_{gks}.json")
    if path.is_file() and read_json(path).get("key") == key:
        return read_json(path)
    report = {"key": key, **real.routing_report(seed, settings, tasks, gks=gks)}
    write_json(path, report)
    return report


def real_results(leaderboard: Path, out: Path, routing: Mapping[int, Mapping[str, Any]] | None = None) -> str:
    """Per seed, `out/seed_<s>/results.json` (experiment `zoo`, scale real) from the leaderboard's
    `seed_<s>/<entry>.json` (and the routing reports); returns the table, x100, mean ± std over seeds."""
    by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for entry in REAL_ENTRIES:
        for f in sorted(leaderboard.glob(f"seed_*/{entry}.json")):
            r = read_json(f)
            by_seed.setdefault(r["seed"], {})[entry] = r
    if not by_seed:
        raise UserError(
            f"no leaderboard results under {leaderboard}: run `python -m leaderboard.run --entries "
            f"{' '.join(REAL_ENTRIES)} --seeds 0 1` first"
        )
    metrics_by_seed = {}
    for seed, rs in sorted(by_seed.items()):
        metrics: dict[str, Any] = {
            e: {k: r[k] for k in ("in_distribution", "held_out") if r[k] is not None} for e, r in rs.items()
        }
        if {"arrow", "uniform", "oracle"} <= set(rs):
            closed = gap_closed(*(rs[e]["in_distribution"] for e in ("arrow", "uniform", "oracle")))
            if closed is not None:
                metrics["arrow"]["gap_closed"] = closed
        if routing and seed in routing:
            metrics["routing"] = routing_summary(routing[seed])
        metrics_by_seed[seed] = metrics
        write_json(
            out / f"seed_{seed}" / "results.json",
            {
                "schema": SCHEMA,
                "project": "mbc_arrow",
                "experiment": "zoo",
                "scale": "real",
                "seed": seed,
                "metrics": metrics,
                "config": {
                    e: {"hparams": r["hparams"], "zoo_settings": r["zoo_settings"]} for e, r in rs.items()
                },
                "provenance": {e: r["provenance"] for e, r in rs.items()},
            },
        )
    rows = []
    for entry in REAL_ENTRIES:
        rs = [by_seed[s][entry] for s in sorted(by_seed) if entry in by_seed[s]]
        if rs:
            rows.append(
                {
                    "method": entry,
                    "seeds": len(rs),
                    "in-distribution": format_pm([r["in_distribution"] for r in rs], 100),
                    "held-out": format_pm([r["held_out"] for r in rs], 100),
                    "params / base": f"{statistics.fmean(r['params_vs_base'] for r in rs):.3f}",
                    "chosen": "; ".join(str(r["hparams"]) for r in rs if r["hparams"]) or "—",
                }
            )
    text = (
        "In-distribution (13 library tasks) and held-out (4 tasks) test scores (accuracy or Rouge-L F), x100, "
        f"mean ± std over seeds {sorted(by_seed)}:\n\n" + markdown_table(rows) + "\n"
    )
    closed = [m["arrow"].get("gap_closed") for m in metrics_by_seed.values() if "arrow" in m]
    text += (
        f"\nShare of the uniform-to-oracle gap Arrow closes (in distribution): {format_pm(closed, 100)} %\n"
    )
    summaries = [m["routing"] for m in metrics_by_seed.values() if "routing" in m]
    return text + (routing_table(summaries) if summaries else "")


def routing_table(summaries: Sequence[Mapping[str, float]], title: str = "Arrow") -> str:
    """The own-expert / own-cluster shares of `routing_summary`s, mean ± std over seeds, beside chance."""
    rows = [
        {
            "library": lib,
            "tokens routed to their own": share.replace("own_", ""),
            "share (%)": format_pm([s[f"{lib}_{share}"] for s in summaries], 100),
            "chance (%)": f"{100 * summaries[0][f'{lib}_{share}_chance']:.1f}",
        }
        for lib, share in ROUTING_MAPS.values()
    ]
    return (
        f"\n{title} top-1 routing of the library tasks' validation tokens (all adapted linears), mean over "
        "tasks and layers, mean ± std over seeds:\n\n" + markdown_table(rows) + "\n"
    )


def plot_real_routing(out: Path, reports: Sequence[Mapping[str, Any]], suffix: str = "") -> list[Path]:
    """One heat map per own share (`ROUTING_MAPS`): tasks x layer depth, mean over seeds; data beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    for name, (lib, share) in ROUTING_MAPS.items():
        tasks = list(reports[0]["libraries"][lib]["tasks"])
        grid = np.mean([[r["libraries"][lib]["tasks"][t][share] for t in tasks] for r in reports], axis=0)
        chance = [reports[0]["libraries"][lib]["tasks"][t][f"chance_{share}"] for t in tasks]
        fig, ax = plt.subplots(figsize=(1.5 + 0.25 * grid.shape[1], 1.0 + 0.35 * len(tasks)))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_yticks(
            range(len(tasks)), [f"{t} (chance {100 * c:.0f}%)" for t, c in zip(tasks, chance)], fontsize=7
        )
        ax.set_xticks(range(grid.shape[1]), [str(d) for d in range(grid.shape[1])], fontsize=6)
        ax.set_xlabel("layer depth")
        label = {"own_expert": "own expert", "own_cluster": "own cluster"}[share]
        ax.set_title(
            f"Arrow top-1: share of tokens to the {label} ({lib} library, {len(reports)} seeds)", fontsize=8
        )
        fig.colorbar(im, ax=ax, label="share of tokens")
        path = out / f"{name}{suffix}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        write_json(
            out / f"{name}{suffix}.json",
            {
                "tasks": tasks,
                "layers": list(range(grid.shape[1])),
                "share": grid.tolist(),
                "chance": chance,
                "seeds": [r["seed"] for r in reports],
            },
        )
        written.append(path)
    return written


def main_real(
    out: Path,
    leaderboard: Path,
    *,
    routing: bool = False,
    seeds: Sequence[int] = (0, 1),
    gks: str = "none",
    settings: Any = None,
    tasks: Sequence[str] | None = None,
) -> str:
    """The real arm's table (and with `routing`, each seed's routing report and the heat maps)."""
    from common import zoo
    from common.zoo_tasks import LIBRARY

    settings = settings or zoo.DEFAULT
    if gks != "none":  # the GenKnowSub probe: its routing beside the plain run's, never in results.json
        reports = [seed_routing(out, s, settings, tasks or LIBRARY, gks) for s in seeds]
        plot_real_routing(out, reports, f"_gks_{gks}")
        text = routing_table([routing_summary(r) for r in reports], f"Arrow after GenKnowSub ({gks})")
        write_text(out / f"routing_gks_{gks}.md", text)
        return text
    reports = {s: seed_routing(out, s, settings, tasks or LIBRARY) for s in seeds} if routing else {}
    text = real_results(leaderboard, out, reports)
    if reports:
        plot_real_routing(out, list(reports.values()))
    write_text(out / "table.md", text)
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", help="folder whose sub-folders hold notebook results.json")
    p.add_argument("--out", help="output folder (with --real: default runs/mbc_arrow/real)")
    p.add_argument(
        "--routing", action="store_true", help="add Arrow's routing distribution (validation split)"
    )
    p.add_argument("--real", action="store_true", help="the zoo's table from the leaderboard's results")
    p.add_argument(
        "--leaderboard", default="results/leaderboard", help="with --real: the leaderboard's folder"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="with --real --routing: zoo seeds")
    p.add_argument(
        "--gks",
        default="none",
        choices=["none", "mean", "multitask"],
        help="with --real: only the routing probe after GenKnowSub (routing_gks_<gks>.md and heat maps)",
    )
    args = p.parse_args(argv)
    if args.real:
        out = Path(args.out or "runs/mbc_arrow/real")
        print(main_real(out, Path(args.leaderboard), routing=args.routing, seeds=args.seeds, gks=args.gks))
        return
    if not args.runs or not args.out:
        p.error("--runs and --out are required (or --real)")
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
