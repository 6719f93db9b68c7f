"""SMILE layer forward (top-1 of 8 experts, gate_k 16, k 32) against the dense nn.Linear it replaces.

Row 2 of issue 9. Cases per d: the dense Linear(d, d) (the baseline); `SmileMoELinear.forward` at
inference (the top-1 fast path: tokens sorted by expert, base + expert bias + low-rank update per
segment); `forward_reference` (the generic path: `routed_lowrank` after the full pretrained Linear);
and the gate alone. The multiply-add floor is 1 + (T·gate_k + k·(d_in + d_out)/d_in·top_k)/d_out.
One thread, inference mode, cases take turns, median of repeats.
Usage: python benchmarks/smile_forward.py [--dims 768 1024 --batch 8 --seq 128]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment, print_table, ratios, time_cases

from common.io import write_json
from projects.smile.upscale import SmileMoELinear

RESULTS = Path(__file__).parent / "results" / "smile_forward.json"
TARGETS = {768: 1.4, 1024: 1.3}


def layer_for(d: int, experts: int, gate_k: int, k: int) -> SmileMoELinear:
    base = nn.Linear(d, d)
    layer = SmileMoELinear(base, experts, gate_k, k, top_k=1)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("pretrained"):
                p.normal_(0, d**-0.5)
    return layer.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 1024])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--gate-k", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    per_dim = {}
    for d in args.dims:
        layer = layer_for(d, args.experts, args.gate_k, args.k)
        x = torch.randn(args.batch, args.seq, d)
        flat = x.reshape(-1, d)
        cases = {
            "dense Linear": lambda layer=layer, x=x: layer.pretrained(x),
            "SmileMoELinear (fast top-1)": lambda layer=layer, x=x: layer(x),
            "forward_reference (routed_lowrank)": lambda layer=layer, flat=flat: layer.forward_reference(
                flat
            ),
            "gate alone": lambda layer=layer, flat=flat: layer.gate(flat),
        }
        with torch.inference_mode():
            assert torch.allclose(layer(x).reshape(-1, d), layer.forward_reference(flat), atol=1e-4)
            times = time_cases(cases, args.repeats, warmup=2)
            counts = torch.bincount(layer.route(flat)[1].reshape(-1), minlength=args.experts).tolist()
        floor = 1 + (args.experts * args.gate_k + args.k * 2) / d
        ratio = ratios(times, "dense Linear")
        print_table(
            f"SMILE forward d={d}: x {tuple(x.shape)}, T={args.experts}, gate_k={args.gate_k}, k={args.k}, "
            f"top-1; multiply-add floor {floor:.3f}x dense; target <= {TARGETS.get(d, '-')}x",
            times,
            "dense Linear",
        )
        per_dim[str(d)] = {
            "times": times,
            "ratio_vs_dense": ratio,
            "multiply_add_floor": floor,
            "target": TARGETS.get(d),
            "met": None if d not in TARGETS else ratio["SmileMoELinear (fast top-1)"] <= TARGETS[d],
            "tokens_per_expert": counts,
        }
    result = {
        **environment(),
        "shapes": {
            "batch": args.batch,
            "seq": args.seq,
            "experts": args.experts,
            "gate_k": args.gate_k,
            "k": args.k,
            "top_k": 1,
        },
        "by_dim": per_dim,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
