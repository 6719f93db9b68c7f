"""SMILE Mistral and Llama: the transformers model with its seven projections swapped for SMILE layers.

`SmileMistralConfig` / `SmileMistralForCausalLM` (and the Llama pair, which serves SmolLM2) are
registered with AutoConfig / AutoModelForCausalLM when this module is imported, so an upscaled model
round-trips through `save_pretrained` / `AutoModelForCausalLM.from_pretrained`. The modeling code is
transformers' own: the subclass only swaps layers (no forked modeling file). Config fields as
fusion_bench's: num_experts_per_tok (top_k), rank_of_router (gate_k), rank_of_expert (k),
num_local_experts (T). Embeddings, norms and lm_head are the pretrained model's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from common.device import resolve_device
from projects.smile.smile_models import smile_model_from
from projects.smile.upscale import SmileLoading, SmileMoELinear, smile_shell, smile_upscale

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class SmileMistralConfig(MistralConfig):
    """MistralConfig plus the SMILE ranks."""

    model_type = "smile_mistral"
    num_experts_per_tok: int = 1
    rank_of_router: int = 8
    rank_of_expert: int = 512
    num_local_experts: int = 1


class SmileLlamaConfig(LlamaConfig):
    """LlamaConfig plus the SMILE ranks."""

    model_type = "smile_llama"
    num_experts_per_tok: int = 1
    rank_of_router: int = 8
    rank_of_expert: int = 512
    num_local_experts: int = 1


def _swap(model: nn.Module, config: Any) -> None:
    smile_shell(
        model.model,
        config.num_local_experts,
        config.rank_of_router,
        config.rank_of_expert,
        config.num_experts_per_tok,
        TARGETS,
    )


class SmileMistralForCausalLM(SmileLoading, MistralForCausalLM):
    """MistralForCausalLM whose q/k/v/o and gate/up/down projections are SmileMoELinear layers."""

    config_class = SmileMistralConfig

    def __init__(self, config: SmileMistralConfig) -> None:
        super().__init__(config)
        _swap(self, config)


class SmileLlamaForCausalLM(SmileLoading, LlamaForCausalLM):
    """LlamaForCausalLM whose q/k/v/o and gate/up/down projections are SmileMoELinear layers."""

    config_class = SmileLlamaConfig

    def __init__(self, config: SmileLlamaConfig) -> None:
        super().__init__(config)
        _swap(self, config)


# base model_type -> (SMILE config, SMILE model)
SMILE_CLASSES = {
    "mistral": (SmileMistralConfig, SmileMistralForCausalLM),
    "llama": (SmileLlamaConfig, SmileLlamaForCausalLM),
}
for _config_cls, _model_cls in SMILE_CLASSES.values():
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)


def upscale_causal_lm(
    pretrained: nn.Module,
    models: Mapping[str, nn.Module],
    *,
    num_experts_per_tok: int = 1,
    rank_of_router: int = 8,
    rank_of_expert: int = 512,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """A SmileMistralForCausalLM / SmileLlamaForCausalLM from a pretrained model and its fine-tuned copies."""
    model_type = pretrained.config.model_type
    if model_type not in SMILE_CLASSES:
        raise ValueError(f"SMILE causal LMs exist for {sorted(SMILE_CLASSES)}, not {model_type!r}")
    config_cls, model_cls = SMILE_CLASSES[model_type]
    upscaled, info = smile_upscale(
        pretrained,
        models,
        gate_k=rank_of_router,
        k=rank_of_expert,
        top_k=num_experts_per_tok,
        targets=TARGETS,
        device=device,
    )
    fields = {
        k: v for k, v in pretrained.config.to_dict().items() if k not in ("model_type", "architectures")
    }
    config = config_cls(
        **fields,
        num_experts_per_tok=num_experts_per_tok,
        rank_of_router=rank_of_router,
        rank_of_expert=rank_of_expert,
        num_local_experts=len(models),
    )
    smile_model = smile_model_from(upscaled, model_cls, config, info.skipped)
    return smile_model.to(resolve_device(device)).eval(), {
        "upscaled": list(info.upscaled),
        "skipped": info.skipped,
    }


def smile_layers(model: nn.Module) -> list[SmileMoELinear]:
    return [m for m in model.modules() if isinstance(m, SmileMoELinear)]
