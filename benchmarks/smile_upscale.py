"""SMILE upscaling of one Linear from T fine-tuned copies: `top_svd` against a full SVD per expert.

Row 3 of issue 9. `smile_linear(..., exact_svd=True)` is the reference (fusion_bench's method: a full
`torch.linalg.svd` of every ΔW_i); the default path finds only the top max(gate_k, k) triplets with
`top_svd` (subspace iteration + Rayleigh–Ritz, every triplet's residual ≤ 1e-4·σ₁). The deltas are
synthetic, ΔW_i = scale·U diag(i^-α) Vᵀ + noise (fine-tuning deltas have decaying spectra; the speed of
`top_svd` depends on it, so two decays are timed). Reported: times, ratio, routing agreement on random
tokens, output and gate-logit differences, peak RSS. One thread, cases take turns.
Usage: python benchmarks/smile_upscale.py [--dims 768 1024 --alphas 1.0 0.5 --experts 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment, peak_rss_mb, print_table, ratios, time_cases

from common.io import write_json
from projects.smile.upscale import TOP_SVD_RTOL, smile_linear

RESULTS = Path(__file__).parent / "results" / "smile_upscale.json"


def finetuned_copies(d: int, experts: int, alpha: float, noise: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(d, d)
    spectrum = torch.arange(1, d + 1, dtype=torch.float32) ** -alpha
    copies = []
    for _ in range(experts):
        u = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
        v = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
        delta = (u * spectrum) @ v.T + noise * torch.randn(d, d, generator=g) / d**0.5
        ft = nn.Linear(d, d)
        with torch.no_grad():
            ft.weight.copy_(base.weight + 0.05 * delta)
            ft.bias.copy_(base.bias + 0.01 * torch.randn(d, generator=g))
        copies.append(ft)
    return base, copies


def agreement(fast: nn.Module, exact: nn.Module, d: int, tokens: int = 4096) -> dict[str, float]:
    """Routing and outputs of the two layers on random tokens; outputs compared where routing agrees (a
    token whose top two logits are within the SVD tolerance may go either way)."""
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        lf, le = fast.gate(x), exact.gate(x)
        same = (fast.route(x)[1] == exact.route(x)[1]).all(-1)
        top2 = le.topk(2, dim=-1).values
        margin = (top2[:, 0] - top2[:, 1]) / le.abs().max()
        yf, ye = fast(x), exact(x)
        delta_e = ye - exact.pretrained(x)
    return {
        "same_routing_fraction": same.float().mean().item(),
        "max_top2_margin_rel_where_routing_differs": margin[~same].max().item() if (~same).any() else 0.0,
        "max_logit_diff_rel": ((lf - le).abs().max() / le.abs().max()).item(),
        "max_output_diff_rel_to_expert_output": ((yf - ye)[same].abs().max() / delta_e.abs().max()).item(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 1024])
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.5], help="σ_i ∝ i^-α")
    parser.add_argument("--noise", type=float, default=0.01, help="Gaussian floor, relative to σ₁")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--gate-k", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    rows = {}
    for d in args.dims:
        for alpha in args.alphas:
            base, copies = finetuned_copies(d, args.experts, alpha, args.noise)
            kw = dict(gate_k=args.gate_k, k=args.k, top_k=1)
            cases = {
                "full SVD per expert (reference)": lambda b=base, c=copies, kw=kw: smile_linear(
                    b, c, exact_svd=True, **kw
                ),
                "top_svd per expert (fast path)": lambda b=base, c=copies, kw=kw: smile_linear(b, c, **kw),
            }
            times = time_cases(cases, args.repeats, warmup=0)
            ratio = ratios(times, "full SVD per expert (reference)")
            acc = agreement(
                smile_linear(base, copies, **kw), smile_linear(base, copies, exact_svd=True, **kw), d
            )
            speedup = 1 / ratio["top_svd per expert (fast path)"]
            print_table(
                f"SMILE upscaling d={d}, T={args.experts}, gate_k={args.gate_k}, k={args.k}, spectrum i^-{alpha:g} "
                f"+ {args.noise:g} noise: {speedup:.1f}x faster",
                times,
                "full SVD per expert (reference)",
            )
            print("  " + ", ".join(f"{k} {v:.3g}" for k, v in acc.items()))
            rows[f"d{d}_alpha{alpha:g}"] = {
                "d": d,
                "alpha": alpha,
                "times": times,
                "ratio_vs_full_svd": ratio,
                "speedup": speedup,
                "target_speedup": 10.0,
                "met": speedup >= 10.0,
                "accuracy": acc,
            }
    result = {
        **environment(),
        "shapes": {"experts": args.experts, "gate_k": args.gate_k, "k": args.k, "noise": args.noise},
        "top_svd_rtol": TOP_SVD_RTOL,
        "cases": rows,
        "peak_rss_mb": peak_rss_mb(),
    }
    write_json(args.out, result)
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
