"""The MBC + Arrow notebook's entries (projects/mbc_arrow on the zoo): Arrow routing over the private experts
(with GenKnowSub as an option), and the MBC library (one expert per MBC cluster of the zoo experts) under
oracle, uniform and Arrow selection. The cluster experts are trained beforehand by
`python -m projects.mbc_arrow.real clusters --seeds ...` (cached); an entry never trains them."""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path

from torch import nn

from leaderboard.registry import ENTRIES, Candidate, Context, adapter_params, count, register, with_adapter
from projects.mbc_arrow import real
from projects.mbc_arrow.selectors import selector_config

TOP_K = (1, 2, 4)  # chosen on the library tasks' validation splits (the notebook uses 2)


def _mbc(ctx: Context) -> tuple[dict[str, list[str]], dict[str, Path]]:
    """(clusters, cluster -> expert folder) of the context's experts (cached in ctx)."""
    if "mbc" not in ctx.cache:
        clusters = real.zoo_clusters(ctx.experts)
        ctx.cache["mbc"] = (clusters, real.cluster_experts(clusters, ctx.seed, ctx.settings))
    return ctx.cache["mbc"]


def _arrow(ctx: Context, library: str, top_k: int, gks: str = "none") -> Candidate:
    """Arrow over the private (`library="private"`) or MBC library; one routed model per (library, gks),
    kept in ctx, whose top_k is set as each task's model is handed out."""
    if library == "private":
        experts, members = ctx.experts, {t: [t] for t in ctx.experts}
    else:
        members, experts = _mbc(ctx)
    key = f"mbc_arrow:{library}:{gks}"
    if key not in ctx.cache:
        general = ctx.multitask if gks == "multitask" else None
        ctx.cache[key] = real.arrow_model(
            ctx.base,
            ctx.tokenizer,
            experts,
            members,
            top_k=top_k,
            gks=gks,
            general=general,
            base_model=ctx.settings.base,
        )
    routed = ctx.cache[key]

    def model_for(task: str) -> nn.Module:
        routed.selector = selector_config({"name": "arrow", "top_k": top_k})  # the prototypes stay
        return routed.model

    protos = sum(layer.protos.numel() for layer in routed.layers().values())
    stored = count(ctx.base) + sum(adapter_params(p) for p in experts.values()) + protos
    return Candidate(
        model_for,
        stored,
        f"Arrow top-{top_k} over {len(experts)} experts" + (f", GenKnowSub {gks}" if gks != "none" else ""),
    )


@register("arrow", {"top_k": TOP_K})
def arrow_entry(ctx: Context, top_k: int = 2) -> Candidate:
    """Each token, in each adapted linear, to its top-k private experts by |x·p_e| (p_e: ΔW_e's top right
    singular vector), softmax over the kept; the experts' A and B mixed with those weights (mttl)."""
    return _arrow(ctx, "private", top_k)


@register("arrow_gks", {"top_k": TOP_K})
def arrow_gks_entry(ctx: Context, top_k: int = 2, gks: str = "multitask") -> Candidate:
    """Arrow after GenKnowSub (peft's Arrow `use_gks`): the general expert's A and B (the zoo's multitask
    expert; gks="mean": the experts' mean) subtracted from every expert's before prototypes and mixing."""
    return _arrow(ctx, "private", top_k, gks)


@register("mbc_oracle")
def mbc_oracle_entry(ctx: Context) -> Candidate:
    """Each library task answered by its MBC cluster's expert; held-out tasks have none."""
    clusters, experts = _mbc(ctx)
    cluster_of = {t: c for c, ms in clusters.items() for t in ms}

    @lru_cache(maxsize=1)
    def model_for(cluster: str) -> nn.Module:
        return with_adapter(ctx, experts[cluster])

    stored = count(ctx.base) + sum(adapter_params(p) for p in experts.values())
    return Candidate(
        lambda task: model_for(cluster_of[task]) if task in cluster_of else None,
        stored,
        "own cluster's expert",
    )


@register("mbc_uniform")
def mbc_uniform_entry(ctx: Context) -> Candidate:
    """The MBC experts merged by the `uniform` entry (the mean of their ΔW, as mttl's `uniform_lora_after_op`)."""
    _, experts = _mbc(ctx)
    mbc_ctx = dataclasses.replace(ctx, experts=dict(experts), cache={})
    return ENTRIES["uniform"][0](mbc_ctx)


@register("mbc_arrow", {"top_k": TOP_K})
def mbc_arrow_entry(ctx: Context, top_k: int = 2) -> Candidate:
    """Arrow over the MBC library (one expert per cluster)."""
    return _arrow(ctx, "mbc", top_k)
