"""Map the authors' released checkpoints (their own GPT in `architecture/transformer.py`) onto
transformers' `GPT2LMHeadModel` names, so `--eval --chkpt <their .pt>` runs on the same code as ours.

Their blocks hold `attn.in_proj` / `attn.out_proj` / `mlp.in_proj` / `mlp.out_proj` as `nn.Linear`
(weight (out, in)), an untied `lm_head` and exact erf GELU; GPT-2's `Conv1D` stores (in, out), so every
projection is transposed. A routed checkpoint (`architecture/routed_transformer.py`) holds, per layer,
`mlp.experts.mlp_<e>.*` and the router `mlp.router_policy.0.weight` (E, d).
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from transformers import GPT2Config

from common.io import torch_load_safe

# Their projection names -> GPT-2's (all transposed: nn.Linear (out, in) -> Conv1D (in, out)).
_PROJECTIONS = {
    "attn.in_proj": "attn.c_attn",
    "attn.out_proj": "attn.c_proj",
    "mlp.in_proj": "mlp.c_fc",
    "mlp.out_proj": "mlp.c_proj",
}
_EXPERT_PROJECTIONS = {"in_proj": "c_fc", "out_proj": "c_proj"}
# Heads per `--arch`: the only shape not readable from a state dict (`GPT2config` in their transformer.py).
ARCH_HEADS = {"gpt2": 12, "gpt2-medium": 16, "gpt2-large": 20, "gpt2-xl": 25}
_EXPERT = re.compile(r"^transformer\.h\.(\d+)\.mlp\.experts\.mlp_(\d+)\.(in_proj|out_proj)\.(weight|bias)$")
_ROUTER = re.compile(r"^transformer\.h\.(\d+)\.mlp\.router_policy\.0\.weight$")


def read_original(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict of an original `.pt` (`{"model": state, ...}` or a bare state), weights_only."""
    obj: Any = torch_load_safe(path)
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors (expected a dict with a 'model' entry)")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def is_routed(state: dict[str, torch.Tensor]) -> bool:
    """Whether an original state dict is a routed model (it has router weights)."""
    return any(_ROUTER.match(k) for k in state)


def original_config(state: dict[str, torch.Tensor], arch: str = "gpt2") -> GPT2Config:
    """A `GPT2Config` with their shapes, exact erf GELU and an untied head; heads come from `arch`."""
    if arch not in ARCH_HEADS:
        raise ValueError(f"unknown --arch {arch!r}; expected one of {sorted(ARCH_HEADS)}")
    vocab, width = state["transformer.wte.weight"].shape
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.h."))
    return GPT2Config(
        vocab_size=vocab,
        n_positions=state["transformer.wpe.weight"].shape[0],
        n_embd=width,
        n_layer=depth,
        n_head=ARCH_HEADS[arch],
        activation_function="gelu",  # their nn.GELU() is the exact erf form, not GPT-2's tanh "gelu_new"
        tie_word_embeddings=False,
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def convert_dense(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Their dense GPT state -> `GPT2LMHeadModel` state (routed keys are skipped: see `convert_routed`)."""
    out = {}
    for key, value in state.items():
        if ".mlp.experts." in key or ".mlp.router_policy." in key:
            continue
        new = key
        for theirs, ours in _PROJECTIONS.items():
            if f".{theirs}." in key:
                new = key.replace(f".{theirs}.", f".{ours}.")
                value = value.t() if key.endswith(".weight") else value
                break
        out[new] = value.contiguous()
    missing = {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"} - out.keys()
    if missing:
        raise ValueError(f"not a GPT state dict of the original code: missing {sorted(missing)}")
    return out


def convert_routed(
    state: dict[str, torch.Tensor],
) -> tuple[dict[int, dict[int, dict[str, torch.Tensor]]], dict[int, torch.Tensor]]:
    """Their routed state -> ({layer: {expert: GPT2MLP state}}, {layer: router weight (E, d)})."""
    experts: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    routers: dict[int, torch.Tensor] = {}
    for key, value in state.items():
        if m := _EXPERT.match(key):
            layer, expert, proj, kind = int(m[1]), int(m[2]), m[3], m[4]
            value = value.t() if kind == "weight" else value
            experts.setdefault(layer, {}).setdefault(expert, {})[f"{_EXPERT_PROJECTIONS[proj]}.{kind}"] = (
                value.contiguous()
            )
        elif m := _ROUTER.match(key):
            routers[int(m[1])] = value
    if not routers or routers.keys() != experts.keys():
        raise ValueError("a routed checkpoint needs a router and experts at every layer")
    for layer, weight in routers.items():
        if weight.shape[0] != len(experts[layer]):
            raise ValueError(
                f"layer {layer}: router has {weight.shape[0]} outputs for {len(experts[layer])} experts"
            )
    return experts, routers
