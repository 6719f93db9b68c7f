"""Selectors: which experts each token uses, and with what weight (mttl `containers/selectors`).

Each returns `(weights, indices)` shaped (..., k) for the input x (..., d_in) of one adapted linear:
    task_name  the oracle: every token of an example goes to the expert of its task (k = 1)
    uniform    all E experts with weight 1/E
    arrow      logits_e = |x · proto_e| / T, keep top_k (all if top_k <= 0), softmax over the kept
`lora_merge_after` picks how the chosen experts combine (see `expert_model.LibraryLinear`):
False mixes parameters per token, (Σ w A)(Σ w B) as mttl (for uniform: (mean A)(mean B)); True mixes
outputs, Σ w s B A x, as PEFT's Arrow (for uniform: mttl's `uniform_lora_after_op`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from common.registry import lookup
from common.routing import top_k_route

# Defaults of mttl's selector configs (ArrowSelectorConfig: top_k=-1, router_temp=1, merge_after False).
SELECTORS: dict[str, dict[str, Any]] = {
    "task_name": {"lora_merge_after": False},
    "uniform": {"lora_merge_after": False},
    "arrow": {"lora_merge_after": False, "top_k": -1, "router_temp": 1.0, "scale": False, "tie_params": None},
}


def selector_config(config: Mapping[str, Any] | str) -> dict[str, Any]:
    """A full selector config {"name": ..., knobs...}; unknown names and keys fail with the choices."""
    config = {"name": config} if isinstance(config, str) else dict(config)
    name = config.pop("name", None)
    defaults = lookup(SELECTORS, str(name), "selector")
    unknown = set(config) - set(defaults)
    if unknown:
        raise KeyError(f"selector {name!r} has no keys {sorted(unknown)}; its keys: {sorted(defaults)}")
    return {"name": name, **defaults, **config}


def route(
    cfg: Mapping[str, Any],
    x: torch.Tensor,
    n_experts: int,
    *,
    task_ids: torch.Tensor | None = None,
    protos: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, indices) (..., k) for x (..., d_in); task_ids (batch,) for task_name, protos (E, d_in) for arrow."""
    lead = x.shape[:-1]
    if cfg["name"] == "task_name":
        if task_ids is None:
            raise RuntimeError(
                "the task_name selector needs task names: use `with model.routing(task_names=...)`"
            )
        if task_ids.numel() == 1:
            task_ids = task_ids.expand(lead[0])
        if task_ids.shape[0] != lead[0]:
            raise RuntimeError(f"{task_ids.shape[0]} task names for a batch of {lead[0]}")
        idx = task_ids.to(x.device).reshape(-1, *([1] * len(lead))).expand(*lead, 1)
        return torch.ones(*lead, 1, dtype=x.dtype, device=x.device), idx
    if cfg["name"] == "uniform":
        idx = torch.arange(n_experts, device=x.device).expand(*lead, n_experts)
        return torch.full((*lead, n_experts), 1.0 / n_experts, dtype=x.dtype, device=x.device), idx
    if protos is None:
        raise RuntimeError(
            "the arrow selector has no prototypes (set it through MultiExpertModel.set_selector)"
        )
    temp = cfg["router_temp"] if cfg["router_temp"] > 0 else math.sqrt(x.shape[-1])
    logits = (x @ protos.T.to(x.dtype)).abs() / temp  # (..., E); x is not normalised, as in mttl
    k = n_experts if cfg["top_k"] <= 0 else min(int(cfg["top_k"]), n_experts)
    return top_k_route(logits, k, renormalize=True, softmax_first=False)
