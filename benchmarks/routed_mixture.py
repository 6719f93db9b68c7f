"""Forward time of the routed low-rank mixture (`common.routing.routed_lowrank`) against the base Linear.

One thread, median of repeats (the cases take turns), inference mode. Every time is also given as a ratio to the base
nn.Linear(d_in, d_out) forward on the same x, measured in the same run; "layer" is base + mixture, the
cost of a routed layer. Usage: python benchmarks/routed_mixture.py [--experts 256 --k 4 ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment, print_table, ratios, time_cases

from common.io import write_json
from common.routing import routed_lowrank, top_k_route

RESULTS = Path(__file__).parent / "results" / "routed_mixture.json"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--d-in", type=int, default=1024)
    parser.add_argument("--d-out", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8, help="E, experts in the library")
    parser.add_argument("--rank", type=int, default=4, help="r, rank of each expert")
    parser.add_argument("--k", type=int, default=2, help="experts per token")
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq, args.d_in)
    base = torch.nn.Linear(args.d_in, args.d_out)
    A = torch.randn(args.experts, args.rank, args.d_in) / args.d_in**0.5
    B = torch.randn(args.experts, args.d_out, args.rank)
    weights, indices = top_k_route(torch.randn(args.batch, args.seq, args.experts), args.k, renormalize=True)

    def mixture(impl: str) -> Callable[[], torch.Tensor]:
        return lambda: routed_lowrank(x, A, B, weights, indices, scaling=2.0, impl=impl)

    cases = {"base Linear": lambda: base(x)}
    cases |= {impl: mixture(impl) for impl in ("reference", "dense", "grouped", "vectorized")}
    cases["layer (base + vectorized)"] = lambda: base(x) + mixture("vectorized")()
    with torch.inference_mode():
        times = time_cases(cases, args.repeats, warmup=2)
    shapes = {
        "x": list(x.shape),
        "d_out": args.d_out,
        "experts": args.experts,
        "rank": args.rank,
        "k": args.k,
    }
    print_table(f"{shapes}, one thread", times, "base Linear")
    result = {
        "environment": environment(),
        "shapes": shapes,
        "repeats": args.repeats,
        "times": times,
        "ratio_vs_base_linear": ratios(times, "base Linear"),
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
