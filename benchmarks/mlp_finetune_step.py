"""The compatible-specialization real arm's fine-tuning step: SmolLM2-135M with only the MLPs trained, fp32
against bf16 autocast over fp32 weights (`finetune.mixed_precision: bf16`, accelerate's CPU autocast).

Issue 18 asks for the real arm's cost; its configuration had fp32 steps estimated at ~10 s (~3.5 h a seed).
Two copies of the base (eager attention, as `configs/real_smollm2.yaml`), each with its own AdamW over the
MLP weights (the config's lr 3e-4, β (0.9, 0.99), wd 0.1), take the same batches of 8 x 128-token windows of
the code domain (`zoo_code`'s training split, as the pipeline's `RandomWindows`) in turns, so load from other
processes falls on both alike: the ratio is the number to read. Also written: each case's loss per step (the
two runs start from the same weights and see the same batches, so the curves must agree to bf16 rounding).
Writes results/mlp_finetune_step.json.
Usage: python benchmarks/mlp_finetune_step.py [--steps 8 --warmup 2 --batch-size 8 --context 128 --threads 1]
       [--quick] [--out PATH]   (--quick: micro:mistral, 2 steps of 2 x 32, a smoke run)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment, print_table, ratios, time_cases

from common.io import write_json
from common.zoo import DEFAULT, load_base
from projects.compatible_specialization.data import ZOO_DOMAINS, RandomWindows, token_stream, zoo_texts

RESULTS = Path(__file__).parent / "results"


def stepper(model: torch.nn.Module, batches: list[torch.Tensor], bf16: bool, losses: list[float]):
    """One optimizer step per call on the next batch: the pipeline's loss (mean token cross-entropy over the
    window), MLP weights only, gradient clipping at 1.0 as `common.training`."""
    params = [p for n, p in model.named_parameters() if ".mlp." in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.99), weight_decay=0.1)
    model.train()
    it = iter(batches)

    def step() -> None:
        batch = next(it)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    return step


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="micro:mistral, 2 steps of 2 x 32: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS / "mlp_finetune_step.json")
    args = parser.parse_args(argv)
    settings = DEFAULT
    if args.quick:
        settings = replace(DEFAULT, base="micro:mistral")
        args.steps, args.warmup, args.batch_size, args.context = 2, 1, 2, 32
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, tokenizer = load_base(settings, dtype="float32")
    texts, _ = zoo_texts(ZOO_DOMAINS["zoo_code"], 0)
    stream = token_stream(texts["train"], tokenizer, None, 0)
    n = args.warmup + args.steps
    windows = RandomWindows(stream, args.context, n * args.batch_size, 0)
    batches = [
        torch.stack([windows[b * args.batch_size + i] for i in range(args.batch_size)]) for b in range(n)
    ]
    losses: dict[str, list[float]] = {"fp32": [], "bf16 autocast": []}
    cases = {
        "fp32": stepper(model, batches, False, losses["fp32"]),
        "bf16 autocast": stepper(copy.deepcopy(model), batches, True, losses["bf16 autocast"]),
    }
    times = time_cases(cases, args.steps, args.warmup)
    tokens = args.batch_size * args.context
    tok_s = {k: f"{tokens / (t['median_ms'] / 1000):.0f}" for k, t in times.items()}
    print_table(
        f"MLP-only fine-tuning step, SmolLM2-135M, {args.batch_size} x {args.context} tokens",
        times,
        "fp32",
        {"tokens/s": tok_s},
    )
    gap = max(abs(a - b) for a, b in zip(*losses.values(), strict=True))
    print(f"largest loss gap between the two runs over {n} steps: {gap:.4f}")
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": environment(),
        "times": times,
        "ratio_vs_fp32": ratios(times, "fp32"),
        "tokens_per_s": {k: float(v) for k, v in tok_s.items()},
        "losses": losses,
        "largest_loss_gap": gap,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
