"""The models MaTS merges: T5 (or a decoder-only LM) fully fine-tuned or with (IA)^3, their merged
parameters, and log p(y | x) per example — the quantity whose gradients give the Fisher and Grams.

What is merged (the original's `get_trainableParameters`): for full fine-tuning every parameter as
`named_parameters` lists it (the tied `encoder/decoder.embed_tokens` appear once, as `shared.weight`;
the untied `lm_head` is kept); for (IA)^3 only the vectors, whose pretrained value is 1.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer

from common.adapters import add_adapter, ia3_config
from common.evaluation import IGNORE_INDEX, encode_pair
from common.io import atomic_dir, load_tensors, torch_load_safe
from common.models import load_model
from common.tiny_world import tiny_base

FORMATS = ("full_model", "ia3")
IA3_PATTERN = re.compile(r".*ia3_l.*")


def base_path(base: str, scale: str) -> str | Path:
    """A tiny/micro base name -> its cached folder; at paper scale the hub id or local path as given."""
    return base if scale == "paper" else tiny_base(base, scale)


def model_name(base: str, scale: str) -> str:
    """The `{model}` part of the output layout: the hub id with '/' -> '-', or e.g. 'tiny-t5'."""
    return base.replace("/", "-") if scale == "paper" else f"{scale}-{base}"


def build(model_cfg: Mapping[str, Any]) -> tuple[nn.Module, Any]:
    """(model, tokenizer) in the configured format; (IA)^3 vectors start at 1, so outputs are unchanged."""
    fmt = model_cfg["format"]
    if fmt not in FORMATS:
        raise ValueError(f"unknown model format {fmt!r}; choose one of {FORMATS}")
    path = base_path(model_cfg["base"], model_cfg["scale"])
    model = load_model(path, device=model_cfg.get("device", "auto"))  # auto: cuda if available
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if fmt == "ia3":
        model = add_adapter(model, ia3_config(model.config.model_type))
    else:
        model.requires_grad_(True)
    return model, tokenizer


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def merged_parameters(model: nn.Module, fmt: str) -> dict[str, nn.Parameter]:
    """The parameters that fine-tuning changes and merging combines, by name."""
    params = dict(model.named_parameters())
    if fmt == "ia3":
        return {k: p for k, p in params.items() if IA3_PATTERN.fullmatch(k)}
    return params


def state_of(model: nn.Module, fmt: str) -> dict[str, torch.Tensor]:
    """A detached copy of the merged parameters."""
    return {k: p.detach().clone() for k, p in merged_parameters(model, fmt).items()}


def load_state(model: nn.Module, fmt: str, state: Mapping[str, torch.Tensor], where: str = "state") -> None:
    """Copy `state` into the merged parameters; names and shapes must match exactly."""
    params = merged_parameters(model, fmt)
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise KeyError(
            f"{where} does not fit this {fmt} model: missing {missing[:3]}, unexpected {extra[:3]} "
            "(another base model or format?)"
        )
    with torch.no_grad():
        for k, p in params.items():
            if state[k].shape != p.shape:
                raise ValueError(
                    f"{where}: {k} has shape {tuple(state[k].shape)}, the model {tuple(p.shape)}"
                )
            p.copy_(state[k])


def save_model(model: nn.Module, fmt: str, folder: str | os.PathLike, tokenizer: Any = None) -> Path:
    """A checkpoint or merged model (the weights `model` holds) as a folder the ecosystem reads, atomically:
    (IA)^3 -> a PEFT adapter folder (`PeftModel.from_pretrained(base, folder)`), full fine-tuning -> a
    `save_pretrained` folder (`AutoModelForSeq2SeqLM` / `AutoModelForCausalLM`, lm-eval, mergekit);
    the tokenizer beside it. (The original saves bare state dicts; no library reads those.)"""
    with atomic_dir(folder) as tmp:
        # a PeftModel saves adapter_config.json + adapter_model.safetensors; a full model its config + weights
        model.save_pretrained(tmp)
        if tokenizer is not None and fmt != "ia3":
            tokenizer.save_pretrained(tmp)
    return Path(folder)


def _adapter_state(folder: Path) -> dict[str, torch.Tensor]:
    """An (IA)^3 adapter folder's vectors under this model's parameter names (peft stores them without the
    adapter name: `...k.ia3_l` is the parameter `...k.ia3_l.default`)."""
    from peft import PeftConfig, PeftType
    from peft.utils import load_peft_weights

    config = PeftConfig.from_pretrained(str(folder))
    if config.peft_type != PeftType.IA3:
        raise ValueError(f"{folder} holds a {config.peft_type} adapter; MaTS merges (IA)^3 adapters only")
    return {f"{k}.default": v for k, v in load_peft_weights(str(folder)).items()}


def read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint or merged model: a PEFT (IA)^3 folder, a `save_pretrained` folder, or (the earlier
    layout, and the streaming merge's output) a bare safetensors state, or a `.pt` read with weights_only=True."""
    path = Path(path)
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return _adapter_state(path)
        if (path / "config.json").is_file():
            return state_of(load_model(path), "full_model")
        raise FileNotFoundError(
            f"{path} is neither a PEFT adapter folder (adapter_config.json) nor a save_pretrained folder "
            "(config.json)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint or merged model at {path}")
    if path.suffix == ".safetensors":
        return load_tensors(path)
    state = torch_load_safe(path)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict")
    return dict(state)


def encode(
    tokenizer: Any,
    sources: Sequence[str],
    targets: Sequence[str],
    *,
    encoder_decoder: bool,
    max_source_len: int,
) -> dict[str, torch.Tensor]:
    """A padded batch: (context, continuation) split as rank classification scores it; T5 targets end in EOS."""
    rows = []
    for source, target in zip(sources, targets):
        context, continuation = encode_pair(tokenizer, source, " " + target, encoder_decoder=encoder_decoder)
        context = context[-max_source_len:]
        if encoder_decoder:
            rows.append((context, [*continuation, tokenizer.eos_token_id]))
        else:
            rows.append(([*context, *continuation], [IGNORE_INDEX] * len(context) + continuation))
    width_in = max(len(c) for c, _ in rows)
    width_out = max(len(y) for _, y in rows)
    pad = tokenizer.pad_token_id
    if encoder_decoder:
        input_ids = torch.tensor([c + [pad] * (width_in - len(c)) for c, _ in rows])
        labels = torch.tensor([y + [IGNORE_INDEX] * (width_out - len(y)) for _, y in rows])
    else:  # right padding; labels align with input_ids and are shifted in `example_log_probs`
        input_ids = torch.tensor([c + [pad] * (width_in - len(c)) for c, _ in rows])
        labels = torch.tensor([y + [IGNORE_INDEX] * (width_in - len(y)) for _, y in rows])
    mask = torch.tensor([[1] * len(c) + [0] * (width_in - len(c)) for c, _ in rows])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def example_log_probs(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    reduction: str = "mean",
    *,
    forward: Callable[..., Any] | None = None,
) -> torch.Tensor:
    """(B,) log p(y | x) = −(mean token NLL over the target), as MaTS's `EncoderDecoderWrapper.forward`.

    `reduction="sum"` gives the summed log-likelihood that rank classification compares. `forward`
    replaces `model(**inputs)` (e.g. `torch.func.functional_call` with other parameters); the batch's
    attention mask may then be additive and 4D (see `metadata.fisher`).
    """
    labels = batch["labels"]
    call = forward or model
    if is_encoder_decoder(model):
        logits = call(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
        ).logits  # (B, T_dec, V)
    else:
        logits = call(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    token_logp = F.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    total = (token_logp * mask).sum(1)
    return total if reduction == "sum" else total / mask.sum(1).clamp(min=1)
