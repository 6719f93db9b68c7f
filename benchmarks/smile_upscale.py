"""SMILE upscaling of one Linear from T fine-tuned copies: `top_svd` against a full SVD per expert.

Row 3 of issue 9. `smile_linear(..., exact_svd=True)` is the reference (fusion_bench's method: a full
`torch.linalg.svd` of every ΔW_i); the default path finds only the top max(gate_k, k) triplets with
`top_svd` (subspace iteration + Rayleigh–Ritz, every triplet's residual ≤ 1e-4·σ₁). The deltas are
synthetic, ΔW_i = scale·U diag(i^-α) Vᵀ + noise (fine-tuning deltas have decaying spectra; the speed of
`top_svd` depends on it, so two decays are timed). Reported: times, ratio, routing agreement on random
tokens, output and gate-logit differences. One thread, cases take turns. Where `make bench-peers` has
made `.venv-peers`, fusion_bench's own `SmileMoELinear` is timed on the same weights there (a separate
process, after the in-process cases). Whole model (`--blocks`, 0 to skip): transformer-shaped blocks of
width d (q, k, v, o: d×d; fc1: 4d×d; fc2: d×4d) and T fine-tuned copies (deltas with decaying spectra),
upscaled by `smile_upscale` with each path in its own process: time and peak RSS above the inputs.
Usage: python benchmarks/smile_upscale.py [--dims 768 1024 --alphas 1.0 0.5 --experts 8 --blocks 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment, peak_rss_of, print_table, ratios, time_cases

from common.io import save_tensors, write_json
from projects.smile.upscale import TOP_SVD_RTOL, smile_linear, smile_upscale

RESULTS = Path(__file__).parent / "results" / "smile_upscale.json"
ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
# Run in .venv-peers: fusion_bench's SmileMoELinear (a full SVD per expert) on the saved layer; median ms.
PEER_SCRIPT = """
import copy, json, statistics, sys, time
import torch
from safetensors.torch import load_file
from torch import nn
from fusion_bench.models.smile_moe.linear_from_module import SmileMoELinear
torch.set_num_threads(1)
path, experts, gate_k, k, repeats = sys.argv[1], *map(int, sys.argv[2:6])
w = load_file(path)
def linear(prefix):
    out, inp = w[prefix + ".weight"].shape
    layer = nn.Linear(inp, out)
    layer.load_state_dict({"weight": w[prefix + ".weight"], "bias": w[prefix + ".bias"]})
    return layer
base, copies = linear("base"), [linear(f"expert{i}") for i in range(experts)]
times = []
for _ in range(repeats + 1):
    b, c = copy.deepcopy(base), [copy.deepcopy(m) for m in copies]  # it overwrites the copies' weights
    start = time.perf_counter()
    SmileMoELinear(b, c, gate_k=gate_k, k=k, top_k=1)
    times.append(time.perf_counter() - start)
print(json.dumps({"median_ms": 1e3 * statistics.median(times[1:])}))
"""


def time_fusion_bench(base: nn.Linear, copies: list[nn.Linear], gate_k: int, k: int, repeats: int) -> float:
    """fusion_bench's SmileMoELinear construction in .venv-peers on these weights: median ms."""
    tensors = {"base.weight": base.weight, "base.bias": base.bias}
    for i, c in enumerate(copies):
        tensors |= {f"expert{i}.weight": c.weight, f"expert{i}.bias": c.bias}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "layer.safetensors"
        save_tensors(path, tensors)
        args = [str(PEER_PYTHON), "-c", PEER_SCRIPT, str(path), *map(str, (len(copies), gate_k, k, repeats))]
        done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"fusion_bench in .venv-peers failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["median_ms"]


class Block(nn.Module):
    """The Linear layers of one transformer block of width d (what SMILE upscales in a ViT or BERT)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


@torch.no_grad()
def whole_model(d: int, blocks: int, experts: int, seed: int = 0) -> tuple[nn.Module, list[nn.Module]]:
    """A base of `blocks` blocks and `experts` copies whose deltas have singular values ~ i^-1 (rank 128) plus
    a 1% Gaussian floor."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Sequential(*(Block(d) for _ in range(blocks)))
    copies = []
    for _ in range(experts):
        ft = nn.Sequential(*(Block(d) for _ in range(blocks)))
        ft.load_state_dict(base.state_dict())
        for m in ft.modules():
            if isinstance(m, nn.Linear):
                out, inp = m.weight.shape
                scale = torch.arange(1, 129, dtype=torch.float32) ** -1.0
                low = (torch.randn(out, 128, generator=g) * scale) @ torch.randn(128, inp, generator=g)
                delta = low / (out * inp) ** 0.25 + 0.01 * torch.randn(out, inp, generator=g) / inp**0.5
                m.weight += 0.05 * delta / 2
        copies.append(ft)
    return base, copies


def whole_model_case(exact: bool, d: int, blocks: int, experts: int, gate_k: int, k: int) -> dict:
    """In this (fresh) process: upscale the whole model once; seconds and peak RSS above the inputs."""
    torch.set_num_threads(1)
    base, copies = whole_model(d, blocks, experts)
    seconds = []

    def run():
        start = time.perf_counter()
        out = smile_upscale(base, copies, gate_k=gate_k, k=k, exact_svd=exact)
        seconds.append(time.perf_counter() - start)
        return out

    peak = peak_rss_of(run)
    inputs = sum(p.numel() * 4 for m in (base, *copies) for p in m.parameters()) / 2**20
    return {"seconds": seconds[0], "peak_rss_mb_above_inputs": peak, "inputs_mb": inputs}


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
    parser.add_argument("--blocks", type=int, default=1, help="whole-model case: blocks of width --model-d")
    parser.add_argument("--model-d", type=int, default=768)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--whole-model-case", choices=["exact", "fast"], help=argparse.SUPPRESS)  # internal
    args = parser.parse_args(argv)
    if args.whole_model_case:
        case = whole_model_case(
            args.whole_model_case == "exact", args.model_d, args.blocks, args.experts, args.gate_k, args.k
        )
        print(json.dumps(case))
        return case

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
            peer_ms = None
            if PEER_PYTHON.exists():
                peer_ms = time_fusion_bench(base, copies, args.gate_k, args.k, args.repeats)
            print_table(
                f"SMILE upscaling d={d}, T={args.experts}, gate_k={args.gate_k}, k={args.k}, spectrum i^-{alpha:g} "
                f"+ {args.noise:g} noise: {speedup:.1f}x faster",
                times,
                "full SVD per expert (reference)",
            )
            print("  " + ", ".join(f"{k} {v:.3g}" for k, v in acc.items()))
            if peer_ms is not None:
                fast_ms = times["top_svd per expert (fast path)"]["median_ms"]
                print(
                    f"  fusion_bench SmileMoELinear (.venv-peers, separate process): {peer_ms:.4g} ms, "
                    f"{peer_ms / fast_ms:.1f}x the fast path"
                )
            rows[f"d{d}_alpha{alpha:g}"] = {
                "d": d,
                "alpha": alpha,
                "times": times,
                "ratio_vs_full_svd": ratio,
                "speedup": speedup,
                "target_speedup": 10.0,
                "met": speedup >= 10.0,
                "accuracy": acc,
                "fusion_bench_ms": peer_ms,
                "speedup_vs_fusion_bench": None
                if peer_ms is None
                else peer_ms / times["top_svd per expert (fast path)"]["median_ms"],
            }
    model = {}
    if args.blocks > 0:
        for case in ("exact", "fast"):
            cmd = [sys.executable, __file__, "--whole-model-case", case, "--blocks", str(args.blocks)]
            cmd += ["--model-d", str(args.model_d), "--experts", str(args.experts)]
            cmd += ["--gate-k", str(args.gate_k), "--k", str(args.k)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                raise RuntimeError(f"whole-model case {case} failed:\n{done.stderr[-2000:]}")
            model[case] = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"whole model, {args.blocks} block(s) of width {args.model_d} (6 Linears each), {args.experts} experts, "
            f"inputs {model['fast']['inputs_mb']:.0f} MB: full SVD {model['exact']['seconds']:.1f} s, peak RSS "
            f"+{model['exact']['peak_rss_mb_above_inputs']:.0f} MB; top_svd {model['fast']['seconds']:.1f} s, "
            f"+{model['fast']['peak_rss_mb_above_inputs']:.0f} MB"
        )
    result = {
        **environment(),
        "shapes": {"experts": args.experts, "gate_k": args.gate_k, "k": args.k, "noise": args.noise},
        "top_svd_rtol": TOP_SVD_RTOL,
        "cases": rows,
        "whole_model": {"blocks": args.blocks, "d": args.model_d, **model},
        "fusion_bench": "timed in .venv-peers" if PEER_PYTHON.exists() else "not installed",
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
