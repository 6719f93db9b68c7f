"""Model families: each one's transformers config and model classes, and a micro config for tests.

A micro model has a few thousand to tens of thousands of parameters, so it builds in milliseconds,
yet its config keeps what sets the family apart: T5 v1.1's gated-GELU and untied head, Mistral's
grouped-query attention, GPT-Neo's alternating global/local attention, CLIP's two towers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
)

from common.registry import close_matches, lookup


@dataclass(frozen=True)
class Family:
    """A model family: its config class, the model class built from it, and its micro config kwargs."""

    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    micro: Mapping[str, Any]
    # A checkpoint of this model_type also holds this family as a sub-model (a CLIP checkpoint holds
    # both towers), so `load_model(clip_dir, "clip_vision")` loads the vision tower alone.
    part_of: str | None = None

    @property
    def model_type(self) -> str:
        return self.config_class.model_type


_CLIP_TEXT_MICRO = dict(
    vocab_size=256,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=16,
    bos_token_id=254,
    eos_token_id=255,  # the text tower pools at the first eos token
)
_CLIP_VISION_MICRO = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=8,
    patch_size=4,  # 2x2 patches + the class token
)
_DECODER_MICRO = dict(  # Llama-style decoders (Mistral, Llama): 2 query heads share 1 key/value head
    vocab_size=256,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
)

FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        GPT2Config,
        GPT2LMHeadModel,
        dict(
            vocab_size=256, n_positions=64, n_embd=16, n_layer=2, n_head=2, bos_token_id=255, eos_token_id=255
        ),
    ),
    "gpt_neo": Family(
        GPTNeoConfig,
        GPTNeoForCausalLM,
        dict(
            vocab_size=256,
            max_position_embeddings=64,
            hidden_size=16,
            num_layers=2,
            num_heads=2,
            attention_types=[[["global", "local"], 1]],
            window_size=4,
            bos_token_id=255,
            eos_token_id=255,
        ),
    ),
    # T5 v1.1 as in LM-adapt and Flan-T5: gated-GELU feed-forward, untied lm_head, no output rescaling.
    "t5": Family(
        T5Config,
        T5ForConditionalGeneration,
        dict(
            vocab_size=256,
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            decoder_start_token_id=0,
        ),
    ),
    "clip": Family(
        CLIPConfig,
        CLIPModel,
        dict(text_config=_CLIP_TEXT_MICRO, vision_config=_CLIP_VISION_MICRO, projection_dim=16),
    ),
    "clip_vision": Family(CLIPVisionConfig, CLIPVisionModel, _CLIP_VISION_MICRO, part_of="clip"),
    "clip_text": Family(CLIPTextConfig, CLIPTextModel, _CLIP_TEXT_MICRO, part_of="clip"),
    "mistral": Family(MistralConfig, MistralForCausalLM, _DECODER_MICRO),
    "llama": Family(LlamaConfig, LlamaForCausalLM, _DECODER_MICRO),
}


def family_of(config: PretrainedConfig) -> str:
    """The family name for a config, from its `model_type`."""
    by_model_type = {fam.model_type: name for name, fam in FAMILIES.items()}
    return lookup(by_model_type, config.model_type, "model_type (no family in common.models.FAMILIES)")


def family_config(config: PretrainedConfig, family: str) -> PretrainedConfig:
    """`config` itself, or its sub-config for a tower family (`clip_vision` of a CLIP config)."""
    fam = lookup(FAMILIES, family, "model family")
    if isinstance(config, fam.config_class):
        return config
    if config.model_type == fam.part_of:
        for key in config.sub_configs:
            sub = getattr(config, key)
            if isinstance(sub, fam.config_class):
                return sub
    raise ValueError(f"a {config.model_type!r} config does not describe a {family!r} model")


def build_model(config: PretrainedConfig, family: str | None = None) -> PreTrainedModel:
    """A randomly initialised model of `config` (on the current default device, e.g. under `torch.device('meta')`)."""
    family = family or family_of(config)
    model = lookup(FAMILIES, family, "model family").model_class(family_config(config, family))
    _untie_t5_v1_1_head(model)
    return model


def _untie_t5_v1_1_head(model: PreTrainedModel) -> None:
    # T5 v1.1 (LM-adapt, Flan-T5) has its own lm_head, but transformers 5 ties it to the embedding for
    # every T5 built from a config: configuration_t5.py forces tie_word_embeddings=True and keeps the v1.1
    # flag as scale_decoder_outputs=False. (Loading a v1.1 checkpoint unties it again, as both weights are
    # present and differ.) Give it its own weight, initialised as transformers does an untied T5 head.
    config = model.config
    if config.model_type != "t5" or config.scale_decoder_outputs or not hasattr(model, "lm_head"):
        return
    if model.lm_head.weight is model.shared.weight:
        head = torch.empty_like(model.lm_head.weight).normal_(
            std=config.initializer_factor
        )  # (vocab, d_model)
        model.lm_head.weight = nn.Parameter(head)
        model.all_tied_weights_keys.pop("lm_head.weight", None)


def micro_config(family: str, **overrides: Any) -> PretrainedConfig:
    """The family's micro config; a mapping override (`vision_config={...}`) updates that sub-config."""
    fam = lookup(FAMILIES, family, "model family")
    known = set(fam.config_class().to_dict()) | set(fam.config_class.attribute_map)
    unknown = [key for key in overrides if key not in known]
    if unknown:
        raise KeyError(f"{family} config has no field {unknown[0]!r}.{close_matches(unknown[0], known)}")
    kwargs = {key: dict(value) if isinstance(value, Mapping) else value for key, value in fam.micro.items()}
    for key, value in overrides.items():
        base = kwargs.get(key)
        kwargs[key] = {**base, **value} if isinstance(value, Mapping) and isinstance(base, Mapping) else value
    return fam.config_class(**kwargs)


def micro_model(family: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A random micro model of `family` in eval mode; the same seed gives the same weights."""
    config = micro_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = build_model(config, family)
    return model.eval()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters; a tied weight (shared embedding and lm_head) counts once."""
    # `parameters()` yields each Parameter object once, so tied weights are not double counted.
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
