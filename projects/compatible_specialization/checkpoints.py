"""The base model, and specialist / routed checkpoints: ours (safetensors) and the authors' (`.pt`).

A specialist checkpoint holds only the MLP weights (`transformer.h.<l>.mlp.*` of GPT-2,
`model.layers.<l>.mlp.*` of SmolLM2): everything else is the base's, which MLP-only fine-tuning never changed. A routed checkpoint holds the routers and every
model's MLPs (`experts.<j>.<l>.*`, model j's MLP of layer l) plus the routing settings in its metadata,
so `--eval --chkpt` rebuilds the MoE without the experts' files, in the dtype it was trained in. Both
name their base in the metadata.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel
from transformers.activations import ACT2FN

from common.device import resolve_device
from common.io import load_tensors, save_tensors
from common.models import load_model
from common.tiny_world import resolve_base, tiny_base
from common.tokenizers import gpt2_tokenizer
from projects.compatible_specialization import importer
from projects.compatible_specialization.mixture import (
    RoutedMLP,
    decoder_blocks,
    hidden_size,
    routed_model,
)


def configure(model: nn.Module, activation_function: str | None, untie_head: bool) -> nn.Module:
    """Match the original's GPT: no dropout, optionally exact-erf GELU and an untied `lm_head` (= wte).
    The last two are GPT-2 only (the real arm's SmolLM2 keeps its SiLU and tied head: null / false)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if (activation_function or untie_head) and model.config.model_type != "gpt2":
        raise ValueError(
            f"model.activation_function / model.untie_head apply to GPT-2, not {model.config.model_type!r}: "
            "set them to null / false in the config"
        )
    if activation_function:
        model.config.activation_function = activation_function
        for block in decoder_blocks(model):
            block.mlp.act = ACT2FN[activation_function]
    if untie_head and model.lm_head.weight is model.transformer.wte.weight:
        model.lm_head.weight = nn.Parameter(model.transformer.wte.weight.detach().clone())
        model.config.tie_word_embeddings = False
    return model


def base_location(model_cfg: dict[str, Any], scale: str) -> str:
    """The base's folder: a `scale:name` spec ('real:smollm2-135m', 'micro:mistral') through
    `common.tiny_world.resolve_base` as the zoo loads it, else the hub id (paper) or the cached tiny/micro
    base of that name."""
    if ":" in model_cfg["base"]:
        return resolve_base(model_cfg["base"])
    return model_cfg["base"] if scale == "paper" else str(tiny_base(model_cfg["base"], scale))


def load_base(
    model_cfg: dict[str, Any], scale: str, device: str | torch.device = "auto"
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of the pretrained base every specialist starts from, in float32 on `device`.

    float32 because the specialists' MLPs are trained in full (AdamW on bf16 weights loses small updates);
    `model.attn_implementation` ("eager" for SmolLM2, as `common.zoo.load_base`) is passed to transformers.
    """
    where = base_location(model_cfg, scale)
    attn = {"attn_implementation": a} if (a := model_cfg.get("attn_implementation")) else {}
    if model_cfg.get(
        "random_layers"
    ):  # micro: a random base deep enough for multi-layer routing (L <= depth)
        if scale != "micro":
            raise ValueError("model.random_layers (a random base) is for the micro scale only")
        config = AutoConfig.from_pretrained(where, **attn)
        config.num_hidden_layers = model_cfg["random_layers"]  # GPT-2's n_layer through its attribute map
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(resolve_device(device)).eval()
    else:
        model = load_model(where, device=device, **attn)
    tokenizer = (
        gpt2_tokenizer()
        if scale == "paper" and ":" not in model_cfg["base"]
        else AutoTokenizer.from_pretrained(where)
    )
    return configure(
        model, model_cfg.get("activation_function"), model_cfg.get("untie_head", False)
    ), tokenizer


def _metadata(path: str | os.PathLike) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("meta", "{}"))


def save_specialist(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> None:
    """The MLP weights of a fine-tuned model, with `meta` (base, dataset, step)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".mlp." in k}
    save_tensors(path, state, {"meta": json.dumps({"kind": "specialist", **meta})})


def checkpoint_kind(path: str | os.PathLike, arch: str = "gpt2") -> str:
    """'specialist' or 'routed', read from our metadata or from the keys of an original `.pt`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".pt":
        return "routed" if importer.is_routed(importer.read_original(path)) else "specialist"
    kind = _metadata(path).get("kind")
    if kind not in ("specialist", "routed"):
        raise ValueError(f"{path} is not a specialist or routed checkpoint of this project (kind={kind!r})")
    return kind


def base_shape(model: nn.Module) -> dict[str, int]:
    """The depth and width a checkpoint's metadata records (GPT-2's names, kept for saved files)."""
    return {"n_layer": len(decoder_blocks(model)), "n_embd": hidden_size(model)}


def _check_base(path: Path, meta: dict[str, Any], base: nn.Module) -> None:
    shape = base_shape(base)
    if any(meta.get(k) not in (None, v) for k, v in shape.items()):
        raise ValueError(
            f"{path} was trained on a base with n_layer={meta.get('n_layer')}, n_embd={meta.get('n_embd')}, "
            f"not this base (n_layer={shape['n_layer']}, n_embd={shape['n_embd']}): mismatched base model"
        )


def load_specialist(path: str | os.PathLike, base: nn.Module, arch: str = "gpt2") -> nn.Module:
    """A fine-tuned model: `base` with the checkpoint's MLPs (ours), or the whole original `.pt` model."""
    path = Path(path)
    if path.suffix == ".pt":
        state = importer.read_original(path)
        if importer.is_routed(state):
            raise ValueError(f"{path} is a routed checkpoint, not a specialist")
        model = GPT2LMHeadModel(importer.original_config(state, arch))
        model.load_state_dict(importer.convert_dense(state))
        return model.eval()
    meta = _metadata(path)
    if meta.get("kind") != "specialist":
        raise ValueError(f"{path} is not a specialist checkpoint (kind={meta.get('kind')!r})")
    _check_base(path, meta, base)
    state = load_tensors(path)
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path} has NaN/inf weights in {bad[:3]}")
    model = copy.deepcopy(base)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(".mlp." in k for k in missing):
        raise ValueError(f"{path} does not fit the base: unexpected {unexpected[:3]}, missing MLP weights")
    return model.eval()


def specialist_mlps(model: nn.Module) -> list[nn.Module]:
    """The model's MLP modules, one per layer."""
    return [block.mlp for block in decoder_blocks(model)]


def save_routed(
    path: str | os.PathLike, model: nn.Module, model_mlps: list[list[nn.Module]], meta: dict[str, Any]
) -> None:
    """Routers (`routers.<i>`, (E, d)) and every model's MLPs (`experts.<j>.<l>.*`) with the routing settings,
    in the routed model's dtype (recorded as `dtype`: a bf16-trained model reloads as bf16, as the original)."""
    blocks = decoder_blocks(model)
    state = {f"routers.{i}": b.mlp.router.weight.detach().contiguous() for i, b in enumerate(blocks)}
    for j, mlps in enumerate(model_mlps):
        for layer, mlp in enumerate(mlps):
            state |= {
                f"experts.{j}.{layer}.{k}": v.detach().contiguous() for k, v in mlp.state_dict().items()
            }
    first = blocks[0].mlp
    meta = {
        "kind": "routed",
        "num_models": len(model_mlps),
        "top_k": first.top_k,
        "renormalize": first.renormalize,
        "dtype": str(first.router.weight.dtype).removeprefix("torch."),
        **base_shape(model),
        **meta,
    }
    save_tensors(path, state, {"meta": json.dumps(meta)})


def _mlp_with(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    mlp = copy.deepcopy(template)
    mlp.load_state_dict(state)
    return mlp.requires_grad_(False)


def load_routed(
    path: str | os.PathLike,
    base: nn.Module,
    *,
    arch: str = "gpt2",
    top_k: int | None = None,
    num_multi_layer_experts: int | None = None,
    renormalize: bool = False,
) -> nn.Module:
    """A routed model from our checkpoint, or from an original routed `.pt` (then `top_k` and L are needed,
    as the original's flags give them; their experts are listed per layer in id order)."""
    path = Path(path)
    if path.suffix == ".pt":
        state = importer.read_original(path)
        dense = GPT2LMHeadModel(importer.original_config(state, arch))
        missing, _ = dense.load_state_dict(importer.convert_dense(state), strict=False)
        if any(".mlp." not in k for k in missing):
            raise ValueError(f"{path} lacks non-MLP weights: {[k for k in missing if '.mlp.' not in k][:3]}")
        experts, routers = importer.convert_routed(state)
        if top_k is None:
            raise ValueError("an original routed checkpoint needs --topk (it is not stored in the .pt)")
        model = copy.deepcopy(dense)
        for i, block in enumerate(model.transformer.h):
            mlps = [_mlp_with(dense.transformer.h[i].mlp, experts[i][e]) for e in sorted(experts[i])]
            block.mlp = RoutedMLP(mlps, model.config.n_embd, top_k, renormalize)
            block.mlp.router.weight.data.copy_(routers[i])
        device = next(base.parameters()).device if base is not None else "cpu"
        return model.requires_grad_(False).to(device).eval()
    meta = _metadata(path)
    if meta.get("kind") != "routed":
        raise ValueError(f"{path} is not a routed checkpoint (kind={meta.get('kind')!r})")
    _check_base(path, meta, base)
    for name, given, stored in [
        ("--topk", top_k, meta["top_k"]),
        ("--num_multi_layer_experts", num_multi_layer_experts, meta["num_multi_layer_experts"]),
    ]:
        if given is not None and given != stored:
            raise ValueError(f"{name} {given} does not match the checkpoint's {stored} ({path})")
    state = load_tensors(path)
    model_mlps = []
    for j in range(meta["num_models"]):
        layers = []
        for layer, block in enumerate(decoder_blocks(base)):
            prefix = f"experts.{j}.{layer}."
            layers.append(
                _mlp_with(block.mlp, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
            )
        model_mlps.append(layers)
    model = routed_model(
        base,
        model_mlps,
        top_k=meta["top_k"],
        num_multi_layer_experts=meta["num_multi_layer_experts"],
        renormalize=meta["renormalize"],
    )
    # The original casts the routed model to its training dtype before loading the checkpoint; files written
    # before `dtype` was recorded were float32.
    model.to(getattr(torch, meta.get("dtype", "float32")))
    for i, block in enumerate(decoder_blocks(model)):
        block.mlp.router.weight.data.copy_(state[f"routers.{i}"])
    return model.eval()
