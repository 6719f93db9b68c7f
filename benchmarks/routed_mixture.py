"""Forward time of the routed low-rank mixture (`common.routing.routed_lowrank`) against the base Linear.

One thread, median of repeats (the cases take turns), inference mode. Every time is also given as a ratio to the base
nn.Linear(d_in, d_out) forward on the same x, measured in the same run; "layer" is base + mixture, the
cost of a routed layer. Usage: python benchmarks/routed_mixture.py [--experts 256 --k 4 ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from common.io import write_json
from common.routing import routed_lowrank, top_k_route

RESULTS = Path(__file__).parent / "results" / "routed_mixture.json"


def median_ms(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time of each case in milliseconds; cases take turns so load from other processes
    on the machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for step in range(warmup + repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


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
        times = median_ms(cases, args.repeats)
    base_ms = times["base Linear"]

    print(
        f"x {tuple(x.shape)}, E={args.experts}, r={args.rank}, k={args.k}, torch {torch.__version__}, 1 thread"
    )
    print(f"{'op':<28}{'median ms':>12}{'x base':>10}")
    for name, ms in times.items():
        print(f"{name:<28}{ms:>12.2f}{ms / base_ms:>10.3f}")
    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shapes": {
            "x": list(x.shape),
            "d_out": args.d_out,
            "experts": args.experts,
            "rank": args.rank,
            "k": args.k,
        },
        "repeats": args.repeats,
        "median_ms": times,
        "ratio_vs_base_linear": {name: ms / base_ms for name, ms in times.items()},
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
