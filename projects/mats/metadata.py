"""The task subspaces MaTS merges in (§3.2-3.3): diagonal and blockwise Fisher, and the input-activation
and output-gradient Grams of every Linear (RegMean's G; K-FAC's two factors Z and O').

All use log p = −(mean target-token NLL) (`model.example_log_probs`). The Fisher is per example
(per-example gradients, batched exactly with torch.func): F = (1/N) Σn g gᵀ, g = ∇θ log p(yn | xn), with yn the gold answer (empirical) or an answer
choice sampled from the model's softmax over summed choice log-likelihoods (true Fisher). Grams sum
over non-pad tokens, G = Σ (m⊙x)ᵀ(m⊙x) and H = Σ (m⊙δ)ᵀ(m⊙δ) with δ = ∂ log p / ∂(module output),
and are divided by the number of non-pad encoder (input mask) or decoder (target mask) tokens.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from projects.mats.model import encode, example_log_probs, is_encoder_decoder
from projects.mats.tasks import answer

FISHER_KINDS = ("diagonal", "blockwise")
FISHER_GRAD_BUDGET = 2 << 30  # bytes of per-example gradients the batched Fisher may hold at once
# Modules whose input lives on encoder positions (the original's `input_mask` regex); others are decoder.
INPUT_MASK_MODULES = re.compile(r".*encoder.*|.*decoder.*EncDecAttention\.(k|v).*")


def answers(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    *,
    true_fisher: bool,
    seed: int,
    max_source_len: int,
) -> list[str]:
    """The answer each example's gradient is taken at: gold, or sampled from p(choice) (true Fisher)."""
    if not true_fisher:
        return [answer(ex) for ex in examples]
    if any(not ex["choices"] for ex in examples):
        raise NotImplementedError(
            "the true Fisher of a generative task (ROPES) samples a generation (the original's sample_label); "
            "not implemented: use the empirical Fisher"
        )
    generator = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for ex in examples:
            batch = encode(
                tokenizer,
                [ex["question"]] * len(ex["choices"]),
                ex["choices"],
                encoder_decoder=is_encoder_decoder(model),
                max_source_len=max_source_len,
            )
            scores = example_log_probs(model, batch, reduction="sum")
            out.append(ex["choices"][torch.multinomial(scores.softmax(0), 1, generator=generator).item()])
    return out


def fisher(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    params: Mapping[str, nn.Parameter],
    *,
    kind: str = "diagonal",
    true_fisher: bool = False,
    seed: int = 0,
    max_source_len: int = 512,
    batch_size: int = 1,
) -> dict[str, torch.Tensor]:
    """Diagonal (g², param-shaped) or blockwise (g gᵀ, (n, n) per parameter) Fisher, averaged over examples.

    F = (1/N) Σn gn gnᵀ needs each example's own gradient gn = ∇θ log p(yn | xn). `batch_size` > 1 takes
    them `batch_size` at a time, exactly, with `torch.func.vmap(grad(·))` over the padded batch (each
    example seen as a batch of one, its padding masked; memory: batch_size × the parameters' size, capped
    at FISHER_GRAD_BUDGET);
    `batch_size=1` is the plain per-example loop (the reference the tests and the benchmark compare to), and
    the default: on one idle CPU thread the vmap path ran at 0.73x the loop's speed (SmolLM2-135M, 7.1M
    parameters, `benchmarks/mats_statistics.py`, 2026-12-05), so batching is left to users with a GPU.
    """
    if kind not in FISHER_KINDS:
        raise ValueError(f"unknown Fisher approximation {kind!r}; choose one of {FISHER_KINDS}")
    if not examples:
        raise ValueError("the Fisher needs at least one example")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the deterministic model
    targets = answers(
        model, tokenizer, examples, true_fisher=true_fisher, seed=seed, max_source_len=max_source_len
    )
    acc = {
        k: torch.zeros_like(p) if kind == "diagonal" else p.new_zeros(p.numel(), p.numel())
        for k, p in params.items()
    }
    # vmap holds batch_size copies of the gradients: cap them at FISHER_GRAD_BUDGET bytes (T5-large's 738M
    # parameters then go one example at a time; the micro and tiny models 8 at a time).
    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    batch_size = max(1, min(batch_size, FISHER_GRAD_BUDGET // max(param_bytes, 1)))
    per_example = _loop_grads if batch_size == 1 else _vmap_grads
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc=f"{kind} Fisher"):
            chunk = examples[start : start + batch_size]
            batch = encode(
                tokenizer,
                [ex["question"] for ex in chunk],
                targets[start : start + batch_size],
                encoder_decoder=is_encoder_decoder(model),
                max_source_len=max_source_len,
            )
            for k, g in per_example(model, batch, params).items():  # g (B, *param shape)
                if kind == "diagonal":
                    acc[k] += (g**2).sum(0)
                else:
                    v = g.reshape(g.shape[0], -1)
                    acc[k] += v.T @ v
    finally:
        model.train(was_training)
    return {k: a / len(examples) for k, a in acc.items()}


def _loop_grads(
    model: nn.Module, batch: Mapping[str, torch.Tensor], params: Mapping[str, nn.Parameter]
) -> dict[str, torch.Tensor]:
    """{name: (1, *shape)} for a batch of one example: one backward (unused parameters get zeros)."""
    if batch["input_ids"].shape[0] != 1:
        raise ValueError("the per-example loop takes one example per batch")
    names = list(params)
    grads = torch.autograd.grad(
        example_log_probs(model, batch)[0], [params[k] for k in names], allow_unused=True
    )
    return {k: (torch.zeros_like(params[k]) if g is None else g.detach())[None] for k, g in zip(names, grads)}


def _vmap_grads(
    model: nn.Module, batch: Mapping[str, torch.Tensor], params: Mapping[str, nn.Parameter]
) -> dict[str, torch.Tensor]:
    """{name: (B, *shape)}: gn = ∇θ log p(yn | xn) per example by vmap over the batch, each example a batch
    of one. The padding mask is passed as an additive 4D mask (transformers' 2D mask handling branches on
    its values, which vmap cannot trace); for decoder-only models it includes the causal part."""
    from torch.func import functional_call, grad, vmap

    detached = {k: p.detach() for k, p in params.items()}
    encoder_decoder = is_encoder_decoder(model)
    dtype = next(iter(detached.values())).dtype if detached else torch.float32
    low = torch.finfo(dtype).min

    def log_p(theta: dict[str, torch.Tensor], ids, mask, labels) -> torch.Tensor:
        keep = mask[None, None, None, :].bool()  # (1, 1, 1, T): keys that are real tokens
        if not encoder_decoder:
            width = ids.shape[0]
            keep = keep & torch.ones(width, width, dtype=torch.bool, device=ids.device).tril()
        additive = torch.zeros(keep.shape, dtype=dtype, device=ids.device).masked_fill(~keep, low)
        one = {"input_ids": ids[None], "attention_mask": additive, "labels": labels[None]}
        forward = lambda **kw: functional_call(model, theta, (), kw, strict=False)  # noqa: E731
        return example_log_probs(model, one, forward=forward)[0]

    # torch has no vmap rule for CPU flash attention (it would loop over the examples): eager attention
    # is the same product as batched matmuls.
    attn = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        grads = vmap(grad(log_p), in_dims=(None, 0, 0, 0))(
            detached, batch["input_ids"], batch["attention_mask"], batch["labels"]
        )
    finally:
        model.set_attn_implementation(attn)
    return {k: g.detach() for k, g in grads.items()}


def _linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    # Names as the merged parameters see them, minus '.weight' (peft wraps the base Linear in a layer that
    # is not an nn.Linear, so full fine-tuning is the case that matters here).
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def gram_matrices(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 8,
    true_fisher: bool = False,
    seed: int = 0,
    max_source_len: int = 512,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({module: G (in, in)}, {module: H (out, out)}) over `examples`; H skips `lm_head` (vocab × vocab)."""
    if not examples:
        raise ValueError("the Gram matrices need at least one example")
    encoder_decoder = is_encoder_decoder(model)
    modules = _linear_modules(model)
    G = {n: m.weight.new_zeros(m.in_features, m.in_features) for n, m in modules.items()}
    H = {
        n: m.weight.new_zeros(m.out_features, m.out_features)
        for n, m in modules.items()
        if "lm_head" not in n
    }
    counts = {"input": 0, "target": 0}
    masks: dict[str, torch.Tensor] = {}

    def mask_of(name: str) -> torch.Tensor:
        # (B, T, 1) of the positions this module sees
        return masks["input" if not encoder_decoder or INPUT_MASK_MODULES.fullmatch(name) else "target"]

    def hook(name: str):
        def forward_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            m = mask_of(name)
            x = inputs[0].detach() * m  # (B, T, in)
            G[name] += torch.einsum("bti,btj->ij", x, x)
            if name in H and output.requires_grad:

                def grad_hook(d: torch.Tensor) -> None:  # d (B, T, out) = ∂ Σn log p_n / ∂ output
                    H[name].add_(torch.einsum("bti,btj->ij", d * m, d * m))

                output.register_hook(grad_hook)

        return forward_hook

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        targets = answers(
            model, tokenizer, examples, true_fisher=true_fisher, seed=seed, max_source_len=max_source_len
        )
        for start in tqdm(range(0, len(examples), batch_size), desc="Gram matrices"):
            chunk = examples[start : start + batch_size]
            batch = encode(
                tokenizer,
                [ex["question"] for ex in chunk],
                targets[start : start + batch_size],
                encoder_decoder=encoder_decoder,
                max_source_len=max_source_len,
            )
            masks["input"] = batch["attention_mask"].unsqueeze(-1).float()
            masks["target"] = (batch["labels"] != -100).unsqueeze(-1).float()
            counts["input"] += int(batch["attention_mask"].sum())
            counts["target"] += int((batch["labels"] != -100).sum())
            # Σn log p_n: examples are independent, so δ at example n's tokens is ∂ log p_n / ∂ output.
            example_log_probs(model, batch).sum().backward()
            model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    norm = {
        n: counts["input" if not encoder_decoder or INPUT_MASK_MODULES.fullmatch(n) else "target"] for n in G
    }
    return {n: g / norm[n] for n, g in G.items()}, {n: h / norm[n] for n, h in H.items()}
