"""PHATGOOSE's entries (projects/phatgoose on the zoo): PHATGOOSE routing over the trained gates, and the
paper's post-hoc baselines Retrieval, Average Activation and Merged Experts (§4.2). The gates are trained
beforehand by `python -m projects.phatgoose.real gates --seeds ...` (cached); an entry never trains them."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import torch
from torch import nn

from common import zoo
from leaderboard.registry import (
    Candidate,
    Context,
    adapter_params,
    count,
    register,
    with_adapter,
    with_weights,
)
from projects.phatgoose import zoo_gates, zoo_routing
from projects.phatgoose.baselines import Retriever, retrieval_text

TOP_K = (1, 2, 4)  # the paper routes to the top 2; k is chosen on the library tasks' validation splits
AVERAGE_ACTIVATION_EXAMPLES = 100  # training examples per expert averaged into its key
RETRIEVAL_EXAMPLES = 1000  # stored examples per expert (the original's retriever.num_examples)


def _lora_experts(ctx: Context, keys: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> list:
    """The zoo's experts as PHATGOOSE's LoRA experts (with router `keys`): the methods mix low-rank updates."""
    if ctx.settings.adapter != "lora":
        raise ValueError(
            f"PHATGOOSE's entries route among LoRA experts; this zoo's adapter is {ctx.settings.adapter!r}"
        )
    return zoo_routing.zoo_experts(ctx.experts, keys)


def _experts_params(ctx: Context) -> int:
    return count(ctx.base) + sum(adapter_params(p) for p in ctx.experts.values())


@register("phatgoose", {"top_k": TOP_K})
def phatgoose_entry(ctx: Context, top_k: int = 2) -> Candidate:
    """Each token, in each adapted module, to its top-k experts by LN(u)·LN(g_e)/√d over the trained gates."""
    if ctx.settings.adapter != "lora":
        _lora_experts(ctx)  # the clear error, before asking for gates
    gates = zoo_gates.zoo_gates(list(ctx.experts), ctx.seed, ctx.settings, zoo_gates.DEFAULT)
    model = zoo_routing.routed_model(ctx.base, _lora_experts(ctx, gates), top_k)
    keys = sum(g.numel() for ms in gates.values() for g in ms.values())
    return Candidate(lambda task: model, _experts_params(ctx) + keys, f"top-{top_k} of the gates")


@register("average_activation", {"top_k": TOP_K})
def average_activation_entry(ctx: Context, top_k: int = 2, pool: str = "mean") -> Candidate:
    """PHATGOOSE's routing with keys = each expert's mean module input on its own training examples."""
    experts = _lora_experts(ctx)
    key = {
        "experts": {t: p.name for t, p in ctx.experts.items()},  # the zoo folders' hashes
        "seed": ctx.seed,
        "pool": pool,
        "examples": AVERAGE_ACTIVATION_EXAMPLES,
        "max_length": ctx.settings.max_length,
        "dtype": ctx.settings.dtype,
    }
    records = {
        t: zoo.training_records(t, ctx.seed, ctx.settings)[:AVERAGE_ACTIVATION_EXAMPLES] for t in ctx.experts
    }
    keys = zoo_routing.cached_average_activation_keys(
        key, ctx.base, ctx.tokenizer, experts, records, pool=pool, max_length=ctx.settings.max_length
    )
    model = zoo_routing.routed_model(ctx.base, _lora_experts(ctx, keys), top_k)
    n_keys = sum(v.numel() for ms in keys.values() for v in ms.values())
    return Candidate(lambda task: model, _experts_params(ctx) + n_keys, f"top-{top_k}, {pool} keys")


def _retriever(ctx: Context) -> Retriever:
    if "phatgoose_retriever" not in ctx.cache:
        retriever = Retriever()  # all-MiniLM-L6-v2, embeddings cached under $MOERGING_CACHE
        for task in ctx.experts:
            stored = zoo.training_records(task, ctx.seed, ctx.settings)[:RETRIEVAL_EXAMPLES]
            retriever.add_expert(task, [retrieval_text(r, bool(r["choices"])) for r in stored])
        ctx.cache["phatgoose_retriever"] = retriever
    return ctx.cache["phatgoose_retriever"]


@register("retrieval")
def retrieval_entry(ctx: Context) -> Candidate:
    """Each example, whole, to the expert holding its most similar training example (MiniLM cosine)."""
    experts = _lora_experts(ctx)
    retriever = _retriever(ctx)

    @lru_cache(maxsize=1)
    def model_for(task: str) -> nn.Module:
        queries = [r for split in ("validation", "test") for r in zoo.splits(task, ctx.settings)[split]]
        return zoo_routing.retrieval_model(ctx.base, ctx.tokenizer, experts, retriever, queries)

    stored = sum(lib.numel() for lib in retriever.library)
    return Candidate(model_for, _experts_params(ctx) + count(retriever.model) + stored, "MiniLM retrieval")


@register("merged_experts")
def merged_experts_entry(ctx: Context) -> Candidate:
    """One model: the base plus the mean of the experts' LoRA updates (equal to `uniform` on LoRA experts)."""
    delta = zoo_routing.merged_experts_delta(_lora_experts(ctx))
    state = dict(ctx.base.named_parameters())
    model = with_weights(ctx, {f"{m}.weight": state[f"{m}.weight"].float() + d for m, d in delta.items()})
    return Candidate(lambda task: model, count(ctx.base), "mean of the experts' ΔW")


def best_expert_for(ctx: Context, task: str) -> str:
    """The library expert scoring best on `task`'s validation split (ties: the first in library order)."""
    picks = ctx.cache.setdefault("phatgoose_best_expert", {})
    if task not in picks:
        records = zoo.splits(task, ctx.settings)["validation"]
        scores = {
            e: zoo.score(with_adapter(ctx, path), ctx.tokenizer, records, ctx.settings.max_new_tokens)
            for e, path in ctx.experts.items()
        }
        picks[task] = max(scores, key=scores.__getitem__)
    return picks[task]


@register("best_single_expert")
def best_single_expert_entry(ctx: Context) -> Candidate:
    """The paper's "best individual" row: a library task gets its own expert; a held-out task the expert that
    does best on its validation split (an oracle-like pick: it reads the held-out task's labels)."""

    @lru_cache(maxsize=1)
    def model_for(task: str) -> nn.Module:
        return with_adapter(ctx, ctx.experts[task if task in ctx.experts else best_expert_for(ctx, task)])

    return Candidate(model_for, _experts_params(ctx), "own expert; held out: best on its validation split")
