"""Activation interpolation (`--router_ckpts CODE MATH --analyze`, the original's analyze.py), CKA over
fine-tuning (`--cka CODE_RUN MATH_RUN`) and the tiny table from the pipeline's runs (`--table DIR`).

    python -m projects.compatible_specialization.analyze --arch gpt2 --pretrained --datasets gsm-hard \
        --eval_sep gsm-hard --router_ckpts CODE MATH --analyze
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from common.cli import run_main
from common.io import read_json, write_json, write_text
from common.rundir import RunDir, markdown_table, seed_everything
from common.seed_stats import format_pm
from projects.compatible_specialization import experiments
from projects.compatible_specialization.checkpoints import load_base, load_specialist
from projects.compatible_specialization.config import SCALES, resolve
from projects.compatible_specialization.data import domain_of

PROJECT = "compatible_specialization"
# The README's figures (§e of the spec): interpolation curves on gsm-hard, routed and multi-layer losses.
PAPER = {
    "early": [2.0, 1.867, 1.758, 1.680, 1.633, 1.625, 1.648, 1.711, 1.789, 1.891, 2.0],
    "later": [2.734, 2.406, 2.125, 1.914, 1.781, 1.727, 1.719, 1.766, 1.828, 1.922, 2.031],
    "routed": {"early": 1.328, "later": 1.344},
    "multi_layer": {1: 1.3125, 2: 1.2031, 3: 1.1719, 4: 1.1641},
}


def interpolation(cfg: dict[str, Any], router_ckpts: list[str], dataset: str, out: Path) -> dict[str, Any]:
    """Loss of α·MLP_code + (1−α)·MLP_math on the dataset's held-out splits; α=1 is the first checkpoint."""
    if len(router_ckpts) != 2:
        raise ValueError(
            f"interpolation needs exactly two --router_ckpts (code, math), got {len(router_ckpts)}"
        )
    base, tokenizer = load_base(cfg["model"], cfg["scale"], cfg["device"])
    experiments.check_context(cfg, base)
    corpus = experiments.Corpus(cfg, tokenizer)
    domain = domain_of(dataset)
    data = cfg["data"]
    splits = list(dict.fromkeys([data["select_split"], data["test_split"]]))
    code, math = (load_specialist(p, base, cfg["arch"]) for p in router_ckpts)
    curves = experiments.interpolation_sweep(
        cfg, base, code, math, {s: corpus.windows(domain, s) for s in splits}
    )
    best = experiments.best_alpha(curves, data["select_split"], data["test_split"])
    run = RunDir(
        out, project=PROJECT, experiment="interpolation_cli", scale=cfg["scale"], seed=cfg["seed"], config=cfg
    )
    test_curve = curves[data["test_split"]]
    run.write_results(
        {"best_alpha": best["alpha"], "best": best["test_loss"], "min": best["test_min"]},
        curves={s: {str(a): v for a, v in c.items()} for s, c in curves.items()},
        router_ckpts=router_ckpts,
    )
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(list(test_curve), list(test_curve.values()), marker="o")
    ax.set(xlabel="α (1 = code model, 0 = math model)", ylabel=f"{dataset} {data['test_split']} loss")
    run.save_plot(fig, "activation", {s: {str(a): v for a, v in c.items()} for s, c in curves.items()})
    plt.close(fig)
    print({(round(a, 1), dataset): v for a, v in test_curve.items()})
    return {"curves": curves, **best}


def cka(cfg: dict[str, Any], runs: list[str], dataset: str, out: Path) -> dict[int, float]:
    """CKA between two fine-tuning runs' snapshots (`<run>/snapshots/step_<N>.safetensors`) at each step."""
    snaps = []
    for run_dir in runs:
        found = {int(p.stem.split("_")[1]): p for p in Path(run_dir).glob("snapshots/step_*.safetensors")}
        if not found:
            raise FileNotFoundError(f"no snapshots/step_<N>.safetensors under {run_dir}")
        snaps.append(found)
    base, tokenizer = load_base(cfg["model"], cfg["scale"], cfg["device"])
    experiments.check_context(cfg, base)
    windows = experiments.Corpus(cfg, tokenizer).windows(domain_of(dataset), cfg["data"]["select_split"])
    curve = experiments.cka_curve(cfg, base, snaps[0], snaps[1], windows)
    run = RunDir(out, project=PROJECT, experiment="cka_cli", scale=cfg["scale"], seed=cfg["seed"], config=cfg)
    run.write_results({"cka_last": curve[max(curve)]}, curve={str(s): v for s, v in curve.items()}, runs=runs)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(list(curve), list(curve.values()), marker="o")
    ax.set(xlabel="fine-tuning step", ylabel=f"CKA, block {cfg['cka']['layer']}")
    run.save_plot(fig, "cka", {str(s): v for s, v in curve.items()})
    plt.close(fig)
    print({s: round(v, 4) for s, v in curve.items()})
    return curve


def _seeds(root: Path) -> dict[str, list[dict[str, Any]]]:
    """{experiment: [results.json of each seed]} under `root/seed_<s>/<experiment>/`."""
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(root.glob("seed_*/*/results.json")):
        record = read_json(path)
        found[record["experiment"]].append(record)
    if not found:
        raise FileNotFoundError(f"no seed_<s>/<experiment>/results.json under {root}: run pipeline.py first")
    return found


def table(root: Path) -> str:
    """The tiny table (mean ± std over seeds beside the paper's numbers) and its figures, in `root`."""
    runs = _seeds(root)
    n = len(runs["routing"])

    def col(exp: str, key: str) -> list[float]:
        return [r["metrics"][key] for r in runs[exp] if key in r["metrics"]]

    rows = []
    for stage in ("early", "later"):
        for domain in ("code", "math"):
            rows.append(
                {
                    "experiment": f"{domain} specialist, {stage}, own test",
                    "ours": format_pm(col("specialists", f"{domain}_{stage}"), 1, 3),
                    "paper": {
                        "code": {"early": 0.876, "later": 0.684},
                        "math": {"early": 0.846, "later": 0.610},
                    }[domain][stage],
                }
            )
    for stage in ("early", "later"):
        paper = PAPER[stage]
        rows += [
            {
                "experiment": f"interpolation {stage}: α=0 (math)",
                "ours": format_pm(col("interpolation", f"{stage}_alpha_0.0"), 1, 3),
                "paper": paper[0],
            },
            {
                "experiment": f"interpolation {stage}: α=1 (code)",
                "ours": format_pm(col("interpolation", f"{stage}_alpha_1.0"), 1, 3),
                "paper": paper[-1],
            },
            {
                "experiment": f"interpolation {stage}: best α (on validation)",
                "ours": format_pm(col("interpolation", f"{stage}_best_alpha"), 1, 3),
                "paper": 0.1 * paper.index(min(paper)),
            },
            {
                "experiment": f"interpolation {stage}: loss at best α",
                "ours": format_pm(col("interpolation", f"{stage}_best"), 1, 3),
                "paper": min(paper),
            },
            {
                "experiment": f"interpolation {stage}: sharpness (ends − min)",
                "ours": format_pm(col("interpolation", f"{stage}_sharpness"), 1, 3),
                "paper": round((paper[0] + paper[-1]) / 2 - min(paper), 3),
            },
            {
                "experiment": f"MoE routing {stage} (k=2 of 2)",
                "ours": format_pm(col("routing", f"routed_{stage}"), 1, 3),
                "paper": PAPER["routed"][stage],
            },
        ]
    for L, paper in PAPER["multi_layer"].items():
        if col("multi_layer", f"L{L}"):
            rows.append(
                {
                    "experiment": f"multi-layer routing L={L} (k={2 * L})",
                    "ours": format_pm(col("multi_layer", f"L{L}"), 1, 3),
                    "paper": paper,
                }
            )
    rows += [
        {
            "experiment": "CKA code vs math, first snapshot",
            "ours": format_pm(col("cka", "cka_first"), 1, 3),
            "paper": "decreases",
        },
        {
            "experiment": "CKA code vs math, last snapshot",
            "ours": format_pm(col("cka", "cka_last"), 1, 3),
            "paper": "decreases",
        },
    ]
    text = (
        f"Test losses (nats/token) on the gsm-hard-style target, the specialists' rows on their own domain; mean ± std over {n} seeds.\n\n"
        + markdown_table(rows)
        + "\n"
    )
    write_text(root / "table.md", text)
    _figures(root, runs)
    return text


def _mean_curve(records: list[Mapping[str, Any]], key: str, split: str) -> tuple[list[float], list[float]]:
    curves = [r[key][split] for r in records]
    xs = sorted(curves[0], key=float)
    return [float(x) for x in xs], [statistics.mean(c[x] for c in curves) for x in xs]


def _figures(root: Path, runs: Mapping[str, list[dict[str, Any]]]) -> None:
    """activation.png (interpolation early vs later), multi_layer.png and cka.png, each with its data; a
    figure whose experiment has no runs yet (a seed still running) is left out."""
    if runs.get("interpolation"):
        _activation_figure(root, runs["interpolation"])
    if runs.get("multi_layer"):
        _multi_layer_figure(root, runs["multi_layer"])
    if runs.get("cka"):
        xs, ys = _mean_curve([{"c": {"x": r["curve"]}} for r in runs["cka"]], "c", "x")
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(xs, ys, marker="o")
        ax.set(xlabel="fine-tuning step", ylabel="CKA (code vs math)")
        _save(fig, root / "cka", dict(zip(map(str, xs), ys, strict=True)))


def _activation_figure(root: Path, interpolation: list[dict[str, Any]]) -> None:
    split = interpolation[0]["config"]["data"]["test_split"]
    data: dict[str, Any] = {}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for stage in ("early", "later"):
        xs, ys = _mean_curve([{"c": r["curves"][stage]} for r in interpolation], "c", split)
        ax.plot(xs, ys, marker="o", label=stage)
        data[stage] = dict(zip(map(str, xs), ys, strict=True))
    ax.set(xlabel="α (1 = code model, 0 = math model)", ylabel=f"target {split} loss")
    ax.legend()
    _save(fig, root / "activation", data)


def _multi_layer_figure(root: Path, multi_layer: list[dict[str, Any]]) -> None:
    split = multi_layer[0]["config"]["data"]["test_split"]
    Ls = sorted(int(k[1:]) for k in multi_layer[0]["metrics"] if k.startswith("L"))
    ys = [statistics.mean(r["metrics"][f"L{L}"] for r in multi_layer) for L in Ls]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(Ls, ys, marker="o")
    ax.set(xlabel="L (layers per expert set)", ylabel=f"target {split} loss", xticks=Ls)
    _save(fig, root / "multi_layer", dict(zip(map(str, Ls), ys, strict=True)))


def _save(fig: Any, stem: Path, data: Mapping[str, Any]) -> None:
    fig.savefig(stem.with_suffix(".png"), dpi=120, bbox_inches="tight")
    write_json(stem.with_suffix(".json"), data)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Any:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="gpt2")
    p.add_argument("--datasets", nargs="+", default=["gsm-hard"])
    p.add_argument("--eval_sep", nargs="*", help="the dataset the curve is measured on (default: --datasets)")
    p.add_argument("--batch_size", type=int, help="evaluation batch size")
    p.add_argument("--context", type=int)
    p.add_argument("--name", default="interpolation", help="run folder under out_dir")
    p.add_argument(
        "--pretrained", action="store_true", help="accepted: the base is always the pretrained one"
    )
    p.add_argument("--router_ckpts", nargs="+", help="CODE MATH checkpoints to interpolate")
    p.add_argument("--analyze", action="store_true", help="activation interpolation over α = 0, 0.1, ..., 1")
    p.add_argument("--cka", nargs=2, metavar=("CODE_RUN", "MATH_RUN"), help="CKA over two fine-tuning runs")
    p.add_argument("--table", metavar="DIR", help="gather pipeline.py's seeds under DIR into the table")
    p.add_argument("--seed", type=int)
    p.add_argument("--scale", choices=SCALES)
    p.add_argument("--config")
    p.add_argument("--out_dir")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.table:
        text = table(Path(args.table))
        print(text)
        return text
    flags = {"arch": args.arch, "context": args.context, "seed": args.seed, "out_dir": args.out_dir}
    flags["eval_batch_size"] = args.batch_size
    cfg = resolve(args.scale, args.config, args.overrides, flags)
    seed_everything(cfg["seed"])
    dataset = (args.eval_sep or args.datasets)[0]
    out = Path(cfg["out_dir"]) / args.name
    if args.cka:
        return cka(cfg, args.cka, dataset, out)
    if args.analyze and args.router_ckpts:
        return interpolation(cfg, args.router_ckpts, dataset, out)
    p.error("nothing to do: pass --router_ckpts CODE MATH --analyze, --cka CODE_RUN MATH_RUN, or --table DIR")


if __name__ == "__main__":
    sys.exit(run_main(main))
