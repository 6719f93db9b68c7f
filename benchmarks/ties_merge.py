"""TIES merges of M models of one (rows × cols) fp32 tensor, density 0.2: fast paths against the references.

Row 5 of issue 9. The floor is a `torch.sum` over the M models' bytes (what any merge must read). Cases:
`projects.mats.merging.ties` with exact thresholds (variants mats: global top-k; mergekit and peft: per
tensor) and with sampled thresholds; the sort-based references (the previous code: MaTS's kthvalue over
the stacked (M, D) task vectors, mergekit's argsort `magnitude` + GTA election, and peft's `ties`, the
peer itself). Peak RSS above the inputs is measured per case in one extra run (VmHWM reset).
Default shape 2048×2048 to stay light on a shared machine; the issue's 4096×4096: --rows 4096 --cols 4096.
Usage: python benchmarks/ties_merge.py [--models 8 --rows 4096 --cols 4096 --top-k 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment, peak_rss_of, print_table, ratios, time_cases

from common.io import write_json
from projects.mats.merging import _ties_reference, ties

RESULTS = Path(__file__).parent / "results" / "ties_merge.json"


def inputs(n_models: int, rows: int, cols: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(rows, cols, generator=g)}
    models = [{"w": base["w"] + 0.01 * torch.randn(rows, cols, generator=g)} for _ in range(n_models)]
    return base, models


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--top-k", type=float, default=20.0, help="percentage kept (density 0.2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    base, models = inputs(args.models, args.rows, args.cols)
    w = torch.ones(args.models)
    floor = "floor: torch.sum over the models"
    cases = {floor: lambda: [m["w"].sum() for m in models]}
    for variant in ("mats", "mergekit", "peft"):
        cases[f"ties {variant}, exact (fast)"] = lambda v=variant: ties(
            base, models, top_k=args.top_k, variant=v
        )
    for variant in ("mats", "mergekit"):
        cases[f"ties {variant}, sampled threshold (fast)"] = lambda v=variant: ties(
            base, models, top_k=args.top_k, variant=v, threshold="sample"
        )
    refs = {
        "reference mats (kthvalue over stack)": "mats",
        "reference mergekit algorithm (argsort)": "mergekit",
        "peft ties (peer)": "peft",
    }
    for name, variant in refs.items():
        cases[name] = lambda v=variant: _ties_reference(base, models, args.top_k, v, "mean", w)
    reps = {n: args.reference_repeats if n in refs else args.repeats for n in cases}
    warm = {n: 0 if n in refs else 1 for n in cases}
    times = time_cases(cases, reps, warm)
    memory = {name: peak_rss_of(fn) for name, fn in cases.items()}
    vs_floor = ratios(times, floor)

    # kept fraction of the sampled threshold against the exact one
    kept = {}
    for variant in ("mats", "mergekit"):
        for mode in ("exact", "sample"):
            out = ties(base, models[:1], top_k=args.top_k, variant=variant, threshold=mode)
            kept[f"{variant} {mode}"] = ((out["w"] - base["w"]) != 0).double().mean().item()

    speedups = {
        "mats exact vs reference": times["reference mats (kthvalue over stack)"]["median_ms"]
        / times["ties mats, exact (fast)"]["median_ms"],
        "mergekit exact vs mergekit algorithm": times["reference mergekit algorithm (argsort)"]["median_ms"]
        / times["ties mergekit, exact (fast)"]["median_ms"],
        "peft exact vs peft": times["peft ties (peer)"]["median_ms"]
        / times["ties peft, exact (fast)"]["median_ms"],
    }
    print_table(
        f"TIES, {args.models} x ({args.rows}x{args.cols}) fp32, top_k {args.top_k:g}%, torch {torch.__version__}, "
        "1 thread",
        times,
        floor,
        {"peak MB": {n: f"{m:.0f}" for n, m in memory.items()}},
    )
    print("speed-ups: " + ", ".join(f"{k} {v:.1f}x" for k, v in speedups.items()))
    print("kept fraction (one model): " + ", ".join(f"{k} {v:.5f}" for k, v in kept.items()))
    result = {
        **environment(),
        "shapes": {"models": args.models, "rows": args.rows, "cols": args.cols, "top_k": args.top_k},
        "input_mb": 4 * args.rows * args.cols * (args.models + 1) / 2**20,
        "times": times,
        "ratio_vs_floor": vs_floor,
        "speedups": speedups,
        "peak_rss_mb_above_inputs": memory,
        "kept_fraction_one_model": kept,
        "targets": {"exact_speedup_vs_mergekit": 10.0, "sampled_vs_floor": 5.0},
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
