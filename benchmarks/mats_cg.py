"""MaTS conjugate gradient on one RegMean block, (Σ G̃_i) X = Σ G̃_i W_iᵀ: torch `cg_solve` against scipy.

Row 8 of issue 9. The same float64 system solved by `projects.mats.conjugate_gradient.cg_solve` (matrix-shaped
unknown X (d_in, d_out), torch matmuls) and by `scipy.sparse.linalg.cg` on vec(X) with a LinearOperator
(numpy matmuls), as the original does; both stop at ‖r‖ ≤ 1e-5‖b‖ or `--iterations`. Reports times,
iterations, both residuals and the relative difference of the solutions. One thread.
Usage: python benchmarks/mats_cg.py [--d-in 768 --d-out 768 --models 8 --iterations 100]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment, print_table, ratios, time_cases

from common.io import write_json
from projects.mats.conjugate_gradient import SCIPY_RTOL, cg_solve

RESULTS = Path(__file__).parent / "results" / "mats_cg.json"


def problem(d_in: int, d_out: int, n_models: int, tokens: int, seed: int = 0):
    """Σ G̃_i with G_i = X_iᵀX_i/n from correlated inputs (ill-conditioned, as activations are), and b."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    scales = torch.logspace(0, -2, d_in, dtype=torch.float64)
    total = torch.zeros(d_in, d_in, dtype=torch.float64)
    rhs = torch.zeros(d_in, d_out, dtype=torch.float64)
    for _ in range(n_models):
        x = torch.randn(tokens, d_in, generator=g, dtype=torch.float64) * scales @ mix
        gram = x.T @ x / tokens
        gram = 0.9 * gram + 0.1 * torch.diag_embed(torch.diagonal(gram))  # RegMean's shrink, λ = 0.9
        w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
        total += gram
        rhs += gram @ w.T
    return total, rhs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-out", type=int, default=768)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from scipy.sparse.linalg import LinearOperator, cg

    torch.set_num_threads(1)
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print("note: set OMP_NUM_THREADS=1 so that numpy's BLAS also uses one thread")
    total, rhs = problem(args.d_in, args.d_out, args.models, args.tokens)
    total_np, rhs_np = total.numpy(), rhs.numpy()
    n = args.d_in * args.d_out
    op = LinearOperator(
        (n, n), matvec=lambda v: (total_np @ v.reshape(args.d_in, args.d_out)).ravel(), dtype=np.float64
    )
    scipy_iters = []

    def run_scipy():
        count = [0]
        x, _info = cg(
            op,
            rhs_np.ravel(),
            x0=np.zeros(n),
            rtol=SCIPY_RTOL,
            maxiter=args.iterations,
            callback=lambda _: count.__setitem__(0, count[0] + 1),
        )
        scipy_iters.append(count[0])
        return x

    def run_torch():
        return cg_solve(lambda x: total @ x, rhs, torch.zeros_like(rhs), num_iterations=args.iterations)

    cases = {"scipy.sparse.linalg.cg (numpy)": run_scipy, "cg_solve (torch)": run_torch}
    times = time_cases(cases, args.repeats, warmup=1)
    x_t, record = run_torch()
    x_s = torch.from_numpy(run_scipy().reshape(args.d_in, args.d_out))
    rel_diff = ((x_t - x_s).norm() / x_s.norm()).item()
    scipy_residual = ((rhs - total @ x_s).norm() / rhs.norm()).item()
    ratio = ratios(times, "scipy.sparse.linalg.cg (numpy)")
    print_table(
        f"MaTS CG, RegMean block d_in={args.d_in}, d_out={args.d_out}, {args.models} models, float64, 1 thread",
        times,
        "scipy.sparse.linalg.cg (numpy)",
    )
    print(
        f"iterations torch {record['iterations']} / scipy {scipy_iters[-1]}; relative residual torch "
        f"{record['final_residual'] / rhs.norm().item():.2e} / scipy {scipy_residual:.2e}; "
        f"‖x_torch − x_scipy‖/‖x_scipy‖ = {rel_diff:.2e}"
    )
    result = {
        **environment(),
        "shapes": {
            "d_in": args.d_in,
            "d_out": args.d_out,
            "models": args.models,
            "max_iterations": args.iterations,
        },
        "times": times,
        "ratio_vs_scipy": ratio,
        "iterations": {"torch": record["iterations"], "scipy": scipy_iters[-1]},
        "relative_residual": {"torch": record["final_residual"] / rhs.norm().item(), "scipy": scipy_residual},
        "solution_relative_difference": rel_diff,
        "met": ratio["cg_solve (torch)"] <= 1.0,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
