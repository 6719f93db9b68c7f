"""SMILE CLIP vision and T5 models: transformers' own classes with the upscaled Linears swapped.

`SmileCLIPVisionConfig` / `SmileCLIPVisionModel` (AutoModel) and `SmileT5Config` /
`SmileT5ForConditionalGeneration` (AutoModelForSeq2SeqLM) are registered with the Auto classes when this
module is imported, so `smile_upscaling` with `method.model_path` writes a `save_pretrained` folder that
round-trips through `from_pretrained`, as `mistral.py` does for Mistral/Llama. The config lists the
upscaled layers (`smile_layers`: a generic upscaling may target any Linear, and layers with all-zero
deltas stay pretrained) and the ranks in fusion_bench's names. Their own `model_type` makes
`AutoModel` / `AutoConfig` refuse such a folder when this module is not imported, instead of returning a
plain CLIP/T5 with the SMILE weights missing (randomly initialised).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSeq2SeqLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
)

from projects.smile.upscale import SmileLoading, SmileMoELinear


class _SmileFields:
    """The SMILE fields every SMILE config adds to its base config (fusion_bench's names)."""

    num_experts_per_tok: int = 1  # top_k
    rank_of_router: int = 8  # gate_k
    rank_of_expert: int = 512  # k (-1: dense deltas)
    num_local_experts: int = 1  # T
    smile_layers: Sequence[str] = ()  # the upscaled Linears, by module name
    smile_experts: Sequence[str] = ()  # the experts' names, in routing order


class SmileCLIPVisionConfig(_SmileFields, CLIPVisionConfig):
    """CLIPVisionConfig plus the SMILE ranks and upscaled layers."""

    model_type = "smile_clip_vision_model"


class SmileT5Config(_SmileFields, T5Config):
    """T5Config plus the SMILE ranks and upscaled layers."""

    model_type = "smile_t5"


def _swap(model: nn.Module, config: Any) -> None:
    """Replace each Linear named in `config.smile_layers` with an uninitialised SmileMoELinear."""
    for name in config.smile_layers:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = getattr(owner, child)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"smile_layers names {name!r}, which is a {type(layer).__name__}, not a Linear")
        setattr(
            owner,
            child,
            SmileMoELinear(
                layer,
                config.num_local_experts,
                config.rank_of_router,
                config.rank_of_expert,
                config.num_experts_per_tok,
            ),
        )


class _UntiedSmileLayers:
    """An upscaled Linear is no longer the embedding's twin: T5 ties lm_head.weight to shared.weight, and
    tying it would write over the SMILE layer (whose pretrained weight is its own tensor after upscaling)."""

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        keys = super().get_expanded_tied_weights_keys(all_submodels=all_submodels)
        layers = set(self.config.smile_layers)
        return {k: v for k, v in keys.items() if k.rpartition(".")[0] not in layers}


class SmileCLIPVisionModel(SmileLoading, _UntiedSmileLayers, CLIPVisionModel):
    """CLIPVisionModel whose `smile_layers` are SmileMoELinear layers."""

    config_class = SmileCLIPVisionConfig

    def __init__(self, config: SmileCLIPVisionConfig) -> None:
        super().__init__(config)
        _swap(self, config)


class SmileT5ForConditionalGeneration(SmileLoading, _UntiedSmileLayers, T5ForConditionalGeneration):
    """T5ForConditionalGeneration whose `smile_layers` are SmileMoELinear layers."""

    config_class = SmileT5Config

    def __init__(self, config: SmileT5Config) -> None:
        super().__init__(config)
        _swap(self, config)


# base model_type -> (SMILE config, SMILE model, the Auto class it is registered with)
SMILE_CLASSES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], Any]] = {
    "clip_vision_model": (SmileCLIPVisionConfig, SmileCLIPVisionModel, AutoModel),
    "t5": (SmileT5Config, SmileT5ForConditionalGeneration, AutoModelForSeq2SeqLM),
}
for _config_cls, _model_cls, _auto in SMILE_CLASSES.values():
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    _auto.register(_config_cls, _model_cls, exist_ok=True)


def check_savable(model_type: str) -> None:
    """Fail before upscaling when an upscaled model of this type could not be saved as a SMILE model."""
    if model_type not in SMILE_CLASSES:
        raise ValueError(
            f"method.model_path saves SMILE models of {sorted(SMILE_CLASSES)}, not {model_type!r} "
            "(Mistral/Llama: use method=smile_upscaling/smile_mistral_upscaling); drop method.model_path "
            "to upscale and evaluate without saving"
        )


def as_smile_model(
    upscaled: PreTrainedModel, *, top_k: int, gate_k: int, k: int, experts: Sequence[str]
) -> PreTrainedModel:
    """`smile_upscale`'s output (the base class with SmileMoELinear layers in it) as the registered SMILE
    class of its model type, with the same weights (no copy) and buffers: what `save_pretrained` writes."""
    check_savable(upscaled.config.model_type)
    config_cls, model_cls, _ = SMILE_CLASSES[upscaled.config.model_type]
    layers = [n for n, m in upscaled.named_modules() if isinstance(m, SmileMoELinear)]
    fields = {
        key: value
        for key, value in upscaled.config.to_dict().items()
        if key not in ("model_type", "architectures", "transformers_version")
    }
    config = config_cls(
        **fields,
        num_experts_per_tok=top_k,
        rank_of_router=gate_k,
        rank_of_expert=k,
        num_local_experts=len(experts),
        smile_layers=layers,
        smile_experts=list(experts),
    )
    return smile_model_from(upscaled, model_cls, config)


def smile_model_from(
    upscaled: nn.Module,
    model_cls: type[PreTrainedModel],
    config: PretrainedConfig,
    skipped: Sequence[str] = (),
) -> PreTrainedModel:
    """`model_cls(config)` built on `meta`, holding `upscaled`'s Parameters themselves (assigned, not copied)
    and its non-persistent buffers (rotary inv_freq, CLIP's position ids). A `skipped` Linear (left
    pretrained: all deltas zero) that the config upscales gets zero experts and a zero gate, which compute
    the pretrained layer's output."""
    with torch.device("meta"):
        model = model_cls(config)
    # keep_vars: a weight `upscaled` ties (T5's shared/embed_tokens) is one Parameter under several names, so
    # assigning the Parameters keeps exactly its ties. `model.tie_weights()` would tie what the config says
    # instead, and transformers 5's T5Config says tie_word_embeddings=True for every T5: a T5 v1.1 / Flan-T5
    # lm_head left pretrained (LoRA on q, v) would be overwritten by the embedding.
    state = dict(upscaled.state_dict(keep_vars=True))
    for name in skipped:
        for part in ("weight", "bias"):
            if f"{name}.{part}" in state:
                state[f"{name}.pretrained.{part}"] = state.pop(f"{name}.{part}")
    for key, value in model.state_dict().items():
        if key not in state:
            state[key] = torch.zeros(value.shape, dtype=value.dtype)
    model.load_state_dict(state, assign=True, strict=True)
    for name, buffer in upscaled.named_buffers():  # non-persistent buffers are not in the state dict
        owner, _, leaf = name.rpartition(".")
        if name not in state:
            model.get_submodule(owner).register_buffer(leaf, buffer.clone(), persistent=False)
    return model.eval()
