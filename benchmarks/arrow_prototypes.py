"""Arrow prototypes of E LoRA experts of one layer: the batched Gram solve against peft and a dense SVD.

Row 4 of issue 9. Cases: `projects.mbc_arrow.arrow.top_right_singular` on the stacked (E, r, d) factors;
its QR reference, per expert (the previous code) and batched; peft's `ArrowLoraLinearLayer.build_prototypes`
(15 power iterations per expert, float32); the dense SVD of each ΔW = B A (the baseline, fewer repeats).
Accuracy is reported on random factors and on factors with a near-flat spectrum (σ₂ = (1 − gap)·σ₁):
|cos| to the exact v₁ and the captured energy ‖ΔW v‖ / σ₁. One thread, median of repeats.
Usage: python benchmarks/arrow_prototypes.py [--experts 8 --rank 4 --d-in 2048 --d-out 2048]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment, print_table, ratios, time_cases

from common.io import write_json
from projects.mbc_arrow.arrow import (
    top_right_singular,
    top_right_singular_dense,
    top_right_singular_qr,
)

RESULTS = Path(__file__).parent / "results" / "arrow_prototypes.json"


def peft_prototypes(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """peft's Arrow prototype routine on the same factors (rebuilt every call)."""
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    names = [f"task_{i}" for i in range(A.shape[0])]
    cfg = SimpleNamespace(
        top_k=1,
        router_temperature=1.0,
        rng_seed=0,
        task_adapter_names=names,
        gks_adapter_names=[],
        use_gks=False,
    )
    layer = ArrowLoraLinearLayer(A.shape[2], cfg)
    lora_A = {n: SimpleNamespace(weight=a) for n, a in zip(names, A)}
    lora_B = {n: SimpleNamespace(weight=b) for n, b in zip(names, B)}
    layer.build_prototypes(lora_A, lora_B)
    return layer.prototypes


def flat_factors(E, r, d_in, d_out, gap, seed=0):
    """Factors whose ΔW has singular values 1, 1 − gap, then 0.5 ... (a near-tie at the top)."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.tensor([1.0, 1.0 - gap] + [0.5] * (r - 2), dtype=torch.float64)[:r]
    qa = torch.linalg.qr(torch.randn(E, d_in, r, generator=g, dtype=torch.float64))[0]
    qb = torch.linalg.qr(torch.randn(E, d_out, r, generator=g, dtype=torch.float64))[0]
    mix = torch.randn(E, r, r, generator=g, dtype=torch.float64)
    return torch.linalg.solve(mix, spectrum[:, None] * qa.mT).float(), (qb @ mix).float()


def accuracy(v: torch.Tensor, A: torch.Tensor, B: torch.Tensor, v_exact: torch.Tensor, s_exact: torch.Tensor):
    """(min |cos(v, v₁)|, min ‖ΔW v‖/(‖v‖σ₁)) over the experts, ΔW v from the factors in float64."""
    v = v.double()
    cos = (v * v_exact.double()).sum(-1).abs() / v.norm(dim=-1)
    energy = (B.double() @ (A.double() @ v[..., None])).squeeze(-1).norm(dim=-1) / (v.norm(dim=-1) * s_exact)
    return cos.min().item(), energy.min().item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--d-in", type=int, default=2048)
    parser.add_argument("--d-out", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=51)
    parser.add_argument(
        "--dense-repeats", type=int, default=1, help="the dense SVD takes ~10 s per expert at d 2048"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    E, r = args.experts, args.rank
    A = torch.randn(E, r, args.d_in) / args.d_in**0.5
    B = torch.randn(E, args.d_out, r)
    cases = {
        "dense SVD of each B A": lambda: [top_right_singular_dense(a, b) for a, b in zip(A, B)],
        "peft build_prototypes (15 power its)": lambda: peft_prototypes(A, B),
        "QR + r×r SVD, per expert": lambda: [top_right_singular_qr(a, b) for a, b in zip(A, B)],
        "QR + r×r SVD, batched": lambda: top_right_singular_qr(A, B),
        "Gram + Cholesky, batched (fast path)": lambda: top_right_singular(A, B),
    }
    reps = {n: args.repeats for n in cases} | {"dense SVD of each B A": args.dense_repeats}
    warm = {n: 2 for n in cases} | {"dense SVD of each B A": 0}
    with torch.inference_mode():
        times = time_cases(cases, reps, warm)

        # Accuracy: random factors (exact = dense SVD) and near-flat spectra (exact = the QR reference,
        # which the tests check against the dense SVD on small shapes).
        vd, sd = top_right_singular_dense(A, B)
        outputs = {
            "peft": peft_prototypes(A, B),
            "qr": top_right_singular_qr(A, B)[0],
            "gram": top_right_singular(A, B)[0],
        }
        acc = {"random": {k: accuracy(v, A, B, vd, sd.double()) for k, v in outputs.items()}}
        for gap in (1e-2, 1e-4):
            Af, Bf = flat_factors(E, r, args.d_in, args.d_out, gap)
            vq, sq = top_right_singular_qr(Af.double(), Bf.double())
            outs = {"peft": peft_prototypes(Af, Bf), "gram": top_right_singular(Af, Bf)[0]}
            acc[f"gap {gap:g}"] = {k: accuracy(v, Af, Bf, vq, sq) for k, v in outs.items()}

    baseline = "dense SVD of each B A"
    ratio = ratios(times, baseline)
    vs_peft = ratios(times, "peft build_prototypes (15 power its)")
    print_table(
        f"Arrow prototypes: E={E}, r={r}, d_in={args.d_in}, d_out={args.d_out}, torch {torch.__version__}, 1 thread",
        times,
        baseline,
        {"x peft": {n: f"{v:.3g}" for n, v in vs_peft.items()}},
    )
    print("accuracy: min |cos(v, v1)| / min captured energy ||dW v|| / sigma1, over the experts")
    for spectrum, row in acc.items():
        print(f"  {spectrum:<10}" + "  ".join(f"{k}: {c:.6f} / {e:.8f}" for k, (c, e) in row.items()))
    fast = "Gram + Cholesky, batched (fast path)"
    result = {
        **environment(),
        "shapes": {"experts": E, "rank": r, "d_in": args.d_in, "d_out": args.d_out},
        "times": times,
        "baseline": baseline,
        "ratio_vs_dense_svd": ratio,
        "ratio_vs_peft": vs_peft,
        "speedup_fast_vs_peft": 1 / vs_peft[fast],
        "speedup_fast_vs_dense_svd": 1 / ratio[fast],
        "accuracy_min_abs_cos_and_energy": acc,
    }
    write_json(args.out, result)
    print(f"fast path: {1 / vs_peft[fast]:.1f}x faster than peft, {1 / ratio[fast]:.0f}x than the dense SVD")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
