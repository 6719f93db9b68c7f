"""Whole-model forward of SmolLM2-135M with 12 routed LoRA experts per projection against the base forward.

Every one of the seven projections (q/k/v/o/gate/up/down) of all 30 layers carries a library of E = 12
random rank-r experts behind a top-2 router, as each project builds it: Arrow (`mbc_arrow.expert_model.
LibraryLinear`, arrow selector, parameter mixing as mttl), PHATGOOSE (`phatgoose.moe.MoELoRALinear`, learned
keys) and SMILE (`smile.upscale.SmileMoELinear`, gate_k, k = r, top_k = 2). The model is run on one batch of
real-length prompts (the `general_text` passages, right-padded), `inference_mode`, one thread, fp32 and
bf16 (the base, the experts and the routers in one dtype). The cases take turns round by round; every time
is a ratio to the base model's forward in the same run and dtype (issue 21 row 5: target ≤ 1.3x).

Usage: python benchmarks/routed_inference.py [--quick] [--rank 16] [--dtypes float32,bfloat16] [--profile]
(`--quick`: 2 layers of SmolLM2's shapes, random weights and prompts, no model files needed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment, print_table, ratios, time_cases

from common.io import write_json
from projects.mbc_arrow.arrow import top_right_singular
from projects.mbc_arrow.expert_model import LibraryLinear
from projects.mbc_arrow.selectors import selector_config
from projects.phatgoose.moe import MoELoRALinear
from projects.smile.upscale import SmileMoELinear

RESULTS = Path(__file__).parent / "results" / "routed_inference.json"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _model_and_prompts(quick: bool, batch: int, max_len: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """SmolLM2-135M and `batch` real prompts, or (quick) 2 random layers of its shapes and random prompts."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from common.models import load_model
    from common.tiny_world import general_text, real_base

    if quick:
        cfg = LlamaConfig(
            hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
            num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
        )  # fmt: skip
        model = LlamaForCausalLM(cfg)
        gen = torch.Generator().manual_seed(0)
        lengths = torch.randint(max_len // 2, max_len + 1, (batch,), generator=gen).tolist()
        rows = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    else:
        path = real_base("smollm2-135m")
        model, tokenizer = load_model(path), AutoTokenizer.from_pretrained(path)
        texts = [t for t in general_text(200_000) if len(t) > 200][:batch]
        rows = [tokenizer(t)["input_ids"][:max_len] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return model.eval(), {"input_ids": ids, "attention_mask": mask}


def _routed_layers(
    model: nn.Module, experts: int, rank: int, gate_k: int, seed: int
) -> dict[str, dict[str, nn.Module]]:
    """{method: {module name: routed layer}} over the same base Linears (the model keeps its own)."""
    gen = torch.Generator().manual_seed(seed)
    linears = {
        n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in PROJECTIONS
    }
    arrow_owner = SimpleNamespace(selector=selector_config({"name": "arrow", "top_k": 2}), task_ids=None)
    out: dict[str, dict[str, nn.Module]] = {"arrow": {}, "phatgoose": {}, "smile": {}}
    for name, lin in linears.items():
        d_out, d_in = lin.weight.shape
        A = torch.randn(experts, rank, d_in, generator=gen) / d_in**0.5
        B = torch.randn(experts, d_out, rank, generator=gen) / rank**0.5 * 0.1
        scaling = torch.full((experts,), 2.0)
        arrow = LibraryLinear(lin, A, B, scaling, arrow_owner)
        arrow.protos = top_right_singular(A, B)[0]
        out["arrow"][name] = arrow
        keys = torch.randn(experts, d_in, generator=gen)
        out["phatgoose"][name] = MoELoRALinear(lin, A.clone(), B.clone(), scaling.clone(), keys, topk_value=2)
        smile = SmileMoELinear(lin, experts, gate_k, rank, top_k=2)
        with torch.no_grad():
            smile.gate.weight.copy_(torch.randn(experts * gate_k, d_in, generator=gen) / d_in**0.5)
            smile.expert_svh.copy_(A)
            smile.expert_u.copy_(B)
        out["smile"][name] = smile.requires_grad_(False)
    return out


def _install(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    for name, layer in layers.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, layer)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 random layers of SmolLM2's shapes")
    parser.add_argument("--batch", type=int, default=8, help="prompts in the batch")
    parser.add_argument("--max-len", type=int, default=256, help="tokens per prompt at most")
    parser.add_argument("--experts", type=int, default=12)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--gate-k", type=int, default=8, help="SMILE's router rank")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (15 with --quick)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per method")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    repeats = args.repeats or (15 if args.quick else 5)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, inputs = _model_and_prompts(args.quick, args.batch, args.max_len)
    model.requires_grad_(False)
    originals = {n: m for n, m in model.named_modules() if n.split(".")[-1] in PROJECTIONS}
    tokens = int(inputs["attention_mask"].sum())
    result: dict = {
        "environment": environment(),
        "model": "SmolLM2-135M shapes, 2 random layers" if args.quick else "SmolLM2-135M-Instruct",
        "shapes": {
            "batch": list(inputs["input_ids"].shape),
            "tokens": tokens,
            "experts": args.experts,
            "rank": args.rank,
            "top_k": 2,
            "smile_gate_k": args.gate_k,
            "projections": list(PROJECTIONS),
            "routed_layers": len(originals),
        },
        "repeats": repeats,
        "by_dtype": {},
    }
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        _install(model, originals)
        model.to(dtype)
        methods = _routed_layers(model, args.experts, args.rank, args.gate_k, seed=1)
        for layers in methods.values():
            for layer in layers.values():
                layer.to(dtype)

        def case(layers: dict[str, nn.Module]) -> Callable[[], torch.Tensor]:
            def run() -> torch.Tensor:
                _install(model, layers)
                return model(**inputs).logits

            return run

        cases = {"base forward": case(originals)} | {m: case(layers) for m, layers in methods.items()}
        with torch.inference_mode():
            times = time_cases(cases, repeats, warmup=1)
            if args.profile:
                for name, fn in cases.items():
                    with torch.profiler.profile() as prof:
                        fn()
                    print(f"--- {name} ({dtype_name})")
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
        per_token = {n: 1e3 * t["median_ms"] / tokens for n, t in times.items()}
        print_table(
            f"{result['shapes']}, {dtype_name}, {args.threads} thread(s)",
            times,
            "base forward",
            {"µs/token": {n: f"{v:.1f}" for n, v in per_token.items()}},
        )
        result["by_dtype"][dtype_name] = {
            "times": times,
            "us_per_token": per_token,
            "ratio_vs_base": ratios(times, "base forward"),
        }
    _install(model, originals)
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
