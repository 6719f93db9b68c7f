"""The paper's tables from the sweep summaries (mean ± std over seeds), beside the paper's numbers:
methods vs individual experts, the (gate_k, k) grid with parameter ratios (and a plot of accuracy against
size), the top_k ablation, and singular projection merging (Space I / II / II+III); for each arm found
under `runs` (tiny CLIP in seed_*/, tiny T5 in t5_full/seed_*/ and t5_lora/seed_*/); the routing of the tiny
T5 (t5_full/routing/) and of the distinct-domain CLIP (clip_distinct/routing/: a table and a task × encoder
layer heat map of the own-expert share, `clip_distinct_routing_own_share.png` + JSON). With `leaderboard=`,
also the real arm (SMILE over the SmolLM2 expert zoo, `real_table.py`): its table, claims' metrics,
params-vs-accuracy plot and per-layer routing heat map from the leaderboard's results.

    python -m projects.smile.analyze runs=runs/smile/tiny out=runs/smile/tiny/table
    python -m projects.smile.analyze runs=runs/smile/real out=runs/smile/real/table leaderboard=results/leaderboard
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.cli import run_main
from common.config import load_config
from common.io import read_json, write_text
from common.rundir import RunDir, markdown_table
from common.seed_stats import format_pm
from projects.smile import real_table
from projects.smile.routing import own_expert_by_layer, own_expert_share

PAPER = Path(__file__).parent / "paper.yaml"
DEFAULTS = {"runs": "runs/smile/tiny", "out": "runs/smile/tiny/table", "leaderboard": None}


@dataclass(frozen=True)
class Arm:
    """One tiny arm's sweeps: where they are, its paper.yaml experiment, how its table is labelled."""

    folder: str  # under `runs`, holding seed_*/summary/results.json
    experiment: str
    title: str
    pretrained: str  # the pretrained row's label
    paper_column: str
    paper_smile: str  # the paper's SMILE configuration, beside its number


ARMS = (
    Arm("", "tiny_clip", "tiny CLIP", "pretrained (zero-shot heads)", "paper B/32 (%)", " (16, 32), 1.61x"),
    Arm(
        "clip_distinct",
        "tiny_clip_distinct",
        "tiny CLIP, eight distinct domains",
        "pretrained (zero-shot heads)",
        "paper B/32 (%)",
        " (16, 32), 1.61x",
    ),
    Arm(
        "t5_full",
        "tiny_t5_full",
        "tiny T5, full fine-tuning",
        "pretrained",
        "paper Flan-T5-base (%)",
        " (8, 32), 1.52x",
    ),
    Arm(
        "t5_lora",
        "tiny_t5_lora",
        "tiny T5, LoRA (rank 4, q and v)",
        "pretrained",
        "paper Flan-T5-base LoRA-16 (%)",
        " (2, 4), 1.02x",
    ),
)


def summaries(runs: str | Path, folder: str = "") -> list[dict[str, Any]]:
    """Every seed's sweep summary metrics under `runs`/`folder`, by seed (none: an empty list)."""
    return [
        read_json(p)["metrics"] for p in sorted((Path(runs) / folder).glob("seed_*/summary/results.json"))
    ]


def _get(metrics: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        metrics = metrics[part]
    return metrics


def mean_std(values: Sequence[float], percent: bool = True, digits: int = 1) -> str:
    """Mean ± std over seeds, x100 when `percent` (`common.seed_stats.format_pm`)."""
    return format_pm(values, 100 if percent else 1, digits)


def cell(runs: list[dict[str, Any]], key: str, percent: bool = True) -> str:
    try:
        return mean_std([_get(r, key) for r in runs], percent)
    except KeyError:
        return "—"


def tables(
    runs: list[dict[str, Any]], paper: dict[str, Any], arm: Arm = ARMS[0]
) -> dict[str, list[dict[str, Any]]]:
    p = paper["experiments"][arm.experiment]["paper"]
    pct = lambda key: f"{100 * p[key]:.1f}" if key in p else "—"  # noqa: E731
    selected = [r["smile_selected_config"] for r in runs]
    methods = [
        (arm.pretrained, "pretrained", "1.00"),
        ("individual experts (own task)", "individual", "8 models"),
        ("simple average", "simple_average", "1.00"),
        ("task arithmetic (λ on validation)", "task_arithmetic", "1.00"),
        (
            "SMILE (gate_k, k) on validation, ≤ 2x",
            "smile_selected",
            cell(runs, "smile_selected_params_ratio", False),
        ),
    ]
    main = [
        {
            "method": name,
            "accuracy (%)": cell(runs, key),
            "params (x base)": ratio,
            arm.paper_column: pct(key),
        }
        for name, key, ratio in methods
    ]
    main[-1][arm.paper_column] += arm.paper_smile
    main.append(
        {
            "method": "SMILE configs chosen",
            "accuracy (%)": ", ".join(f"({s['gate_k']}, {s['k']})" for s in selected),
        }
    )
    grid_keys = sorted(
        {key for r in runs for key in r if key.startswith("smile_g") and not key.endswith("ratio")}
    )
    gates = sorted({int(k.split("_")[1][1:]) for k in grid_keys})
    ks = sorted({int(k.split("_k")[-1]) for k in grid_keys}, key=lambda k: (k == -1, k))
    grid = [
        {"gate_k": g}
        | {
            f"k={k}": f"{cell(runs, f'smile_g{g}_k{k}')} ({cell(runs, f'smile_g{g}_k{k}_params_ratio', False).split(' ')[0]}x)"
            for k in ks
        }
        for g in gates
    ]
    topk = [
        {"top_k": t, "accuracy (%)": cell(runs, f"top_k_{t}"), "paper B/32 (16, 32) (%)": pct(f"top_k_{t}")}
        for t in (1, 2, 4, 8)
        if any(f"top_k_{t}" in r for r in runs)
    ]
    out = {"main": main, "grid": grid, "top_k": topk}
    if "projection" in runs[0]:
        spaces = ("ft", "space_I", "space_II", "space_II_III")
        tasks = list(runs[0]["projection"]["ft"])
        projection = [{"task": t} | {s: cell(runs, f"projection.{s}.{t}") for s in spaces} for t in tasks]
        projection.append(
            {"task": "paper B/32 average"} | {s: pct(f"projection.{s}.average") for s in spaces}
        )
        out["projection"] = projection
    else:  # the projection table already lists each expert on its own task
        out["per_task"] = [
            {"task": t, "individual expert (%)": cell(runs, f"individual_per_task.{t}")}
            for t in runs[0]["individual_per_task"]
        ]
    return out


LM_ARMS = {
    "mistral": "Tiny Mistral: math and code experts (full fine-tunes), SMILE over k (gate_k=4)",
    "smollm2": "SmolLM2-135M: math and code LoRA-16 experts merged into full deltas, SMILE over k (gate_k=8)",
}


def lm_table(runs: str | Path, arm: str = "mistral") -> list[dict[str, Any]]:
    """A causal-LM arm (`mistral`: tiny Mistral, full experts; `smollm2`: SmolLM2-135M, LoRA experts): bits per
    byte (lower is better) per domain, mean ± std over seeds, by model."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for reports in lm_runs(runs, arm).values():
        for name, record in reports.items():
            by_model.setdefault(name, []).append(record["metrics"])
    rows = []
    for name, reports in sorted(by_model.items(), key=lambda kv: _model_order(kv[0])):
        domains = [d for d in reports[0] if d not in ("model_info", "routing")]  # average last
        row = {"model": name, "params (x base)": f"{reports[0]['model_info'].get('params_ratio', 1.0):.2f}"}
        row |= {
            f"{d} (bpb)": mean_std([r[d]["bits_per_byte"] for r in reports], percent=False, digits=3)
            for d in domains
        }
        if all("routing" in r for r in reports):  # SMILE: share of a domain's tokens its own expert gets
            shares = [own_expert_share(r["routing"], r["model_info"]["smile"]["experts"]) for r in reports]
            row |= {f"{d} → {d} expert (%)": mean_std([s[d] for s in shares]) for d in shares[0]}
        rows.append(row | {"seeds": len(reports)})
    return rows


SUMMARY = "summary"


def lm_runs(runs: str | Path, arm: str) -> dict[Path, dict[str, dict[str, Any]]]:
    """{seed folder: {model run name: its results.json}} of a causal-LM arm (the summaries left out)."""
    found: dict[Path, dict[str, dict[str, Any]]] = {}
    for path in sorted(Path(runs).glob(f"{arm}/seed_*/*/results.json")):
        if path.parent.name != SUMMARY:
            found.setdefault(path.parent.parent, {})[path.parent.name] = read_json(path)
    return found


def lm_summaries(runs: str | Path, arm: str) -> list[Path]:
    """Per seed of a causal-LM arm, one `summary/results.json` (experiment `tiny_<arm>_summary`, read by
    RESULTS.md) flattening its models' reports: `<model>.<domain>` bits per byte, `<model>.params_ratio`,
    for SMILE models `<model>.own_share.<domain>` (routing) and `<model>.recovery.<domain>` = (M0 − model) /
    (M0 − M_<domain>), the fraction of the domain expert's gain over the base that the model keeps."""
    written = []
    for seed_dir, reports in lm_runs(runs, arm).items():
        metrics: dict[str, float] = {}
        for name, record in reports.items():
            report = record["metrics"]
            metrics[f"{name}.params_ratio"] = report["model_info"].get("params_ratio", 1.0)
            for domain, values in report.items():
                if isinstance(values, dict) and "bits_per_byte" in values:
                    metrics[f"{name}.{domain}"] = values["bits_per_byte"]
            if "routing" in report:
                shares = own_expert_share(report["routing"], report["model_info"]["smile"]["experts"])
                metrics |= {f"{name}.own_share.{d}": v for d, v in shares.items()}
        for name in reports:
            for domain in ("math", "code"):
                base, expert = metrics.get(f"M0.{domain}"), metrics.get(f"M_{domain}.{domain}")
                if name.startswith("smile_") and base is not None and expert is not None and base != expert:
                    metrics[f"{name}.recovery.{domain}"] = (base - metrics[f"{name}.{domain}"]) / (
                        base - expert
                    )
        first = next(iter(reports.values()))
        run = RunDir(
            seed_dir / SUMMARY,
            project="smile",
            experiment=f"tiny_{arm}_summary",
            scale=first.get("scale", "tiny"),
            seed=first.get("seed", 0),
            config={"arm": arm, "models": sorted(reports), "from": str(seed_dir)},
        )
        written.append(run.write_results(metrics))
    return written


def t5_routing_table(runs: str | Path, arm: str = "t5_full") -> list[dict[str, Any]]:
    """Where a tiny T5 SMILE model routes each task's validation sources (`<arm>/routing/*.json`, reports
    of `main.py ... +taskpool.routing=N`): per task, its accuracy and the share of its own expert in the
    encoder, in the cross-attention k/v and in the decoder's first step, and the decoder's favourite expert."""
    reports = [read_json(p) for p in sorted((Path(runs) / arm / "routing").glob("*.json"))]
    reports = [r for r in reports if "routing" in r]
    if not reports:
        return []
    experts = reports[0]["model_info"]["smile"]["experts"]
    rows = []
    for i, task in enumerate(experts):
        stacks = [r["routing"][task]["by_stack"] for r in reports]
        favourites = []
        for st in stacks:
            j = max(range(len(experts)), key=st["decoder"].__getitem__)
            favourites.append(f"{experts[j]} {100 * st['decoder'][j]:.0f}%")
        rows.append(
            {
                "task": task,
                "accuracy (%)": mean_std([r[task]["accuracy"] for r in reports]),
                "own expert, encoder (%)": mean_std([st["encoder"][i] for st in stacks]),
                "own expert, cross-attention k/v (%)": mean_std([st["cross_kv"][i] for st in stacks]),
                "own expert, decoder first step (%)": mean_std([st["decoder"][i] for st in stacks]),
                "decoder's most chosen expert, per seed": ", ".join(favourites),
            }
        )
    return rows


def clip_routings(runs: str | Path, arm: str = "clip_distinct") -> list[dict[str, Any]]:
    """Per seed, where a tiny CLIP SMILE model routes each task's validation images (`<arm>/routing/*/
    results.json`: runs of `main.py ... +taskpool.routing=N`, `image_routing`): {"seed", "hparams",
    "experts", "chance" (1/T), "accuracy" {task: validation accuracy}, "own_share" {task: all layers},
    "own_share_by_layer" {task: [per encoder layer]}, "favourite" {task: [expert, share]}}, in seed order."""
    out = []
    for path in sorted((Path(runs) / arm / "routing").glob("*/results.json")):
        record = read_json(path)
        report = record["metrics"]
        if "routing" not in report:
            continue
        smile = report["model_info"]["smile"]
        experts, routing = smile["experts"], report["routing"]
        favourite = {}
        for task, r in routing.items():
            j = max(range(len(experts)), key=r["all"].__getitem__)
            favourite[task] = [experts[j], r["all"][j]]
        out.append(
            {
                "seed": record["seed"],
                "hparams": {key: smile[key] for key in ("gate_k", "k", "top_k")},
                "experts": experts,
                "chance": 1 / len(experts),
                "accuracy": {t: report[t]["accuracy"] for t in routing if t in report},
                "own_share": own_expert_share(routing, experts),
                "own_share_by_layer": own_expert_by_layer(routing, experts),
                "favourite": favourite,
            }
        )
    return sorted(out, key=lambda r: r["seed"])


def clip_routing_table(routings: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`clip_routings` as rows: per task, its validation accuracy, its own expert's share over all layers and
    per encoder layer (mean ± std over seeds), and the expert each seed sends most of its tokens to; then
    the mean over tasks."""
    tasks = list(routings[0]["own_share"])
    n_layers = len(routings[0]["own_share_by_layer"][tasks[0]])

    def row(name: str, pick: Any) -> dict[str, Any]:
        out = {
            "task": name,
            "accuracy (%)": mean_std([pick(r["accuracy"]) for r in routings]),
            "own expert, all layers (%)": mean_std([pick(r["own_share"]) for r in routings]),
        }
        for i in range(n_layers):
            by_layer = [{t: v[i] for t, v in r["own_share_by_layer"].items()} for r in routings]
            out[f"layer {i} (%)"] = mean_std([pick(b) for b in by_layer])
        return out

    rows = []
    for task in tasks:
        favourites = ", ".join(
            f"{r['favourite'][task][0]} {100 * r['favourite'][task][1]:.0f}%" for r in routings
        )
        rows.append(row(task, lambda d, t=task: d[t]) | {"most chosen expert, per seed": favourites})
    rows.append(row("mean over tasks", lambda d: statistics.fmean(d[t] for t in tasks)))
    return rows


def _model_order(name: str) -> tuple[int, str, int]:
    # M0, M_math, M_code, then smile_<experts>_k<k> by experts and k
    if not name.startswith("smile_"):
        return (0, name, 0)
    experts, _, k = name.removeprefix("smile_").rpartition("_k")
    return (1, experts, int(k))


def readable_log_ticks(ax: Any, values: Sequence[float], nbins: int = 5) -> None:
    """Within one decade matplotlib labels every minor tick of a log axis (`1.1×10^0`, `1.2×10^0`, ...),
    which overlap; there, label a few plain values instead (1, 1.2, 1.4) and no minor ticks."""
    from matplotlib.ticker import MaxNLocator, NullFormatter

    lo, hi = min(values), max(values)
    if lo <= 0 or hi / lo >= 10:
        return  # a decade or more: the default labels (10^0, 10^1, 2×10^0 ...) do not collide
    ticks = [t for t in MaxNLocator(nbins=nbins).tick_values(lo, hi) if lo * 0.98 <= t <= hi * 1.02]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_grid(runs: list[dict[str, Any]], rd: RunDir, plot_name: str = "grid_accuracy_vs_params") -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in runs for k in r if k.startswith("smile_g") and not k.endswith("ratio")})
    points = [
        {
            "config": k,
            "params_ratio": statistics.mean(r[f"{k}_params_ratio"] for r in runs),
            "accuracy": statistics.mean(r[k] for r in runs),
        }
        for k in keys
    ]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter(
        [p["params_ratio"] for p in points], [100 * p["accuracy"] for p in points], s=12, label="SMILE grid"
    )
    for name, key in (("individual", "individual"), ("task arithmetic", "task_arithmetic")):
        ax.axhline(
            100 * statistics.mean(r[key] for r in runs),
            ls="--",
            lw=1,
            label=name,
            color="C1" if key == "individual" else "C2",
        )
    ax.set_xscale("log")
    readable_log_ticks(ax, [p["params_ratio"] for p in points])
    ax.set_xlabel("parameters (x base model)")
    ax.set_ylabel("8-task average accuracy (%)")
    ax.legend(fontsize=7)
    rd.save_plot(fig, plot_name, {"points": points})
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*")
    cfg = load_config(DEFAULTS, overrides=parser.parse_args(argv).overrides)
    paper = yaml.safe_load(PAPER.read_text())
    rd = RunDir(
        cfg["out"], project="smile", experiment="tiny_clip_table", scale="tiny", seed=None, config=cfg
    )
    found = {arm: summaries(cfg["runs"], arm.folder) for arm in ARMS}
    real = real_table.write(cfg["leaderboard"], cfg["runs"], cfg["out"], cfg) if cfg["leaderboard"] else ""
    clip_routing = clip_routings(cfg["runs"])
    if not any(found.values()) and not real and not clip_routing:
        where = f"{cfg['runs']}" + (
            f" nor leaderboard results under {cfg['leaderboard']}" if cfg["leaderboard"] else ""
        )
        raise FileNotFoundError(f"no sweep summaries (seed_*/summary/results.json) under {where}")
    titles = {
        "main": "Eight tasks: SMILE vs merging and the individual experts",
        "grid": "SMILE over (gate_k, k): accuracy (%) and parameters (x base)",
        "top_k": "Experts per token (top_k)",
        "projection": "Singular projection merging: own-task accuracy (%)",
        "per_task": "Individual experts on their own task",
    }
    out = []
    for arm, runs in found.items():
        if not runs:
            continue
        out.append(f"# SMILE, {arm.title}, {len(runs)} seeds (mean ± std)\n")
        for name, rows in tables(runs, paper, arm).items():
            if rows:
                out.append(f"## {titles[name]}\n\n{markdown_table(rows)}\n")
        plot_grid(runs, rd, "grid_accuracy_vs_params" + (f"_{arm.folder}" if arm.folder else ""))
    for arm, title in LM_ARMS.items():
        lm_summaries(cfg["runs"], arm)
        lm = lm_table(cfg["runs"], arm)
        if lm:
            out.append(f"## {title}, lm-eval bits per byte (lower is better)\n\n{markdown_table(lm)}\n")
    if clip_routing:
        chance = clip_routing[0]["chance"]
        g, k = clip_routing[0]["hparams"]["gate_k"], clip_routing[0]["hparams"]["k"]
        data = real_table.own_share_matrix(clip_routing) | {
            "own_share_by_seed": {r["seed"]: r["own_share"] for r in clip_routing}
        }
        title = f"tiny CLIP, distinct domains, SMILE ({g}, {k}): own-expert share (chance {chance:.3f})"
        real_table.plot_own_share(data, rd, "clip_distinct_routing_own_share", title, "encoder layer")
        out.append(
            f"## Tiny CLIP, eight distinct domains, SMILE (gate_k {g}, k {k}): routing of every validation image "
            f"token, {len(clip_routing)} seeds (chance {100 * chance:.1f}%)\n\n"
            f"{markdown_table(clip_routing_table(clip_routing))}\n"
        )
    routing = t5_routing_table(cfg["runs"])
    if routing:
        out.append(
            "## Tiny T5 (full experts), SMILE (gate_k 4, k -1): routing of the validation sources "
            f"(chance 12.5%)\n\n{markdown_table(routing)}\n"
        )
    if real:
        out.append(real)
    write_text(Path(cfg["out"]) / "table.md", "\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    sys.exit(run_main(main))
