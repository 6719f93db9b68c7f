"""The methods `main.py` runs, as fusion_bench's `method=` group: `fn(cfg, pretrained, models) -> (model, info)`.

`info` is merged into the report's `model_info`. Upscaled models are saved with `save_pretrained` as the
SMILE classes of `smile_models.py` (CLIP vision, T5) or `mistral.py` (Mistral, Llama), which load back
through the Auto classes once the module is imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from common.device import resolve_device
from common.io import atomic_dir, load_tensors, read_json
from common.models import build_model, count_parameters
from common.registry import lookup
from projects.smile.merging import MERGES
from projects.smile.projection import singular_projection_merge
from projects.smile.upscale import SmileMoELinear, smile_upscale

Method = Callable[[Mapping[str, Any], "nn.Module | None", dict[str, nn.Module]], tuple[nn.Module, dict]]
SMILE_FILE = "smile.json"
MODEL_KIND = "smile method model"  # what method.model_path holds (common.io.atomic_dir's marker)


def _need_pretrained(pretrained: nn.Module | None, method: str) -> nn.Module:
    if pretrained is None:
        raise ValueError(f"method {method!r} needs a '_pretrained_' model in the model pool")
    return pretrained


def _need_experts(models: dict[str, nn.Module], method: str, exactly: int | None = None) -> None:
    if not models or (exactly is not None and len(models) != exactly):
        want = f"exactly {exactly}" if exactly else "at least one"
        raise ValueError(
            f"method {method!r} needs {want} fine-tuned model(s) in the pool, got {list(models)}"
        )


def dummy(cfg: Mapping[str, Any], pretrained: nn.Module | None, models: dict[str, nn.Module]):
    """The pool's pretrained model, or its first model if it has none (fusion_bench `method=dummy`)."""
    model = pretrained if pretrained is not None else next(iter(models.values()), None)
    if model is None:
        raise ValueError("method 'dummy' needs one model in the pool")
    return model, {}


def smile_upscaling(cfg: Mapping[str, Any], pretrained: nn.Module | None, models: dict[str, nn.Module]):
    """SMILE upscaling of every nn.Linear (projects/smile/upscale.py)."""
    from projects.smile.smile_models import SMILE_CLASSES, as_smile_model, check_savable

    pretrained = _need_pretrained(pretrained, "smile_upscaling")
    _need_experts(models, "smile_upscaling")
    model_type = getattr(getattr(pretrained, "config", None), "model_type", None)
    if cfg.get("model_path"):
        check_savable(model_type)  # before the upscaling, not after it
    device = resolve_device(cfg["device"])
    accelerator = resolve_device(cfg.get("upscaling_accelerator") or device)
    model, info = smile_upscale(
        pretrained,
        models,
        gate_k=int(cfg["gate_k"]),
        k=int(cfg["k"]),
        top_k=int(cfg["top_k"]),
        routing_use_diff=bool(cfg["routing_use_diff"]),
        full_matrices=bool(cfg["full_matrices"]),
        average_experts=bool(cfg["average_experts"]),
        targets=cfg.get("targets"),
        device=accelerator,
    )
    if model_type in SMILE_CLASSES:  # evaluate the class that is saved
        model = as_smile_model(
            model, top_k=int(cfg["top_k"]), gate_k=info.gate_k, k=info.k, experts=list(models)
        )
    model = model.to(device)
    smile = {
        "experts": list(models),
        "gate_k": info.gate_k,
        "k": info.k,
        "top_k": int(cfg["top_k"]),
        "upscaled_layers": list(info.upscaled),
        "skipped_layers": info.skipped,
    }
    if cfg.get("model_path"):
        save_smile_model(model, pretrained, cfg["model_path"], overwrite=bool(cfg.get("overwrite")))
    return model, {"added_params_formula": info.added_parameters, "smile": smile}


def save_smile_model(
    model: nn.Module, pretrained: nn.Module, path: str | os.PathLike, overwrite: bool = False
) -> None:
    """`save_pretrained` of a SMILE model (+ the base's tokenizer, if its folder has one), atomically (a
    non-empty folder we did not write is replaced only with `overwrite`)."""
    from transformers import AutoTokenizer

    with atomic_dir(path, kind=MODEL_KIND, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        source = getattr(pretrained.config, "_name_or_path", "")
        if source and (Path(source) / "tokenizer_config.json").is_file():
            AutoTokenizer.from_pretrained(source).save_pretrained(tmp)


def load_upscaled(path: str | os.PathLike, family: str | None = None) -> nn.Module:
    """A saved upscaled model: through the Auto classes (SMILE CLIP vision / T5 / Mistral / Llama), or a
    folder of the earlier layout (the base `config.json`, `model.safetensors`, `smile.json`)."""
    from transformers import AutoConfig

    from projects.smile import mistral, smile_models

    path = Path(path)
    if not (path / SMILE_FILE).is_file():
        config = AutoConfig.from_pretrained(path)
        autos = {c.model_type: auto for c, _, auto in smile_models.SMILE_CLASSES.values()}
        autos |= {c.model_type: AutoModelForCausalLM for c, _ in mistral.SMILE_CLASSES.values()}
        if config.model_type not in autos:
            raise ValueError(f"{path} holds a {config.model_type!r} model, not a SMILE model")
        return autos[config.model_type].from_pretrained(path).eval()
    smile = read_json(path / SMILE_FILE)
    model = build_model(AutoConfig.from_pretrained(path), family)
    n = len(smile["experts"])
    for name in smile["upscaled_layers"]:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(
            owner,
            child,
            SmileMoELinear(getattr(owner, child), n, smile["gate_k"], smile["k"], smile["top_k"]),
        )
    model.load_state_dict(load_tensors(path / "model.safetensors"), strict=True)
    return model.eval()


def _merge(name: str) -> Method:
    def run(cfg: Mapping[str, Any], pretrained: nn.Module | None, models: dict[str, nn.Module]):
        base = _need_pretrained(pretrained, name)
        _need_experts(models, name)
        hparams = {"scaling_factor": float(cfg["scaling_factor"])} if "scaling_factor" in cfg else {}
        merged = lookup(MERGES, name, "merge method")(
            base.state_dict(), [m.state_dict() for m in models.values()], **hparams
        )
        model = _copy_with(base, merged)
        return model.to(resolve_device(cfg.get("device", "cpu"))), {}

    run.__doc__ = f"{name} of the pool's fine-tuned models (projects/smile/merging.py)."
    return run


def _copy_with(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    import copy

    out = copy.deepcopy(model)
    out.load_state_dict(state)
    return out


def singular_projection_merging(
    cfg: Mapping[str, Any], pretrained: nn.Module | None, models: dict[str, nn.Module]
):
    """Space I / II / II+III projection of one fine-tuned model's deltas (projects/smile/projection.py)."""
    base = _need_pretrained(pretrained, "singular_projection_merging")
    _need_experts(models, "singular_projection_merging", exactly=1)
    device = resolve_device(cfg["device"])
    model = singular_projection_merge(
        base.to(device),
        next(iter(models.values())).to(device),
        k=int(cfg["k"]),
        rank=cfg["rank"],
        full_matrices=bool(cfg["full_matrices"]),
    )
    if cfg.get("model_path"):
        with atomic_dir(cfg["model_path"], kind=MODEL_KIND, overwrite=bool(cfg.get("overwrite"))) as tmp:
            model.save_pretrained(tmp)
    return model, {}


def smile_mistral_upscaling(
    cfg: Mapping[str, Any], pretrained: nn.Module | None, models: dict[str, nn.Module]
):
    """SMILE on the seven projections of a Mistral or Llama model -> SmileMistralForCausalLM (mistral.py);
    `model_path` gets `save_pretrained` output (and the base's tokenizer), loadable with AutoModelForCausalLM."""
    from projects.smile.mistral import upscale_causal_lm

    pretrained = _need_pretrained(pretrained, "smile_mistral_upscaling")
    _need_experts(models, "smile_mistral_upscaling")
    accelerator = resolve_device(cfg.get("accelerator") or cfg["device"])
    model, info = upscale_causal_lm(
        pretrained,
        models,
        num_experts_per_tok=int(cfg["num_experts_per_tok"]),
        rank_of_router=int(cfg["rank_of_router"]),
        rank_of_expert=int(cfg["rank_of_expert"]),
        device=accelerator,
    )
    if cfg.get("model_dtype"):
        from projects.smile.pools import DTYPES

        model = model.to(lookup(DTYPES, cfg["model_dtype"], "model_dtype"))
    model = model.to(resolve_device(cfg["device"]))
    if cfg.get("model_path"):
        save_smile_model(model, pretrained, cfg["model_path"], overwrite=bool(cfg.get("overwrite")))
    return model, {"smile": {"experts": list(models), **info}}


METHODS: dict[str, Method] = {
    "dummy": dummy,
    "smile_upscaling": smile_upscaling,
    "smile_mistral_upscaling": smile_mistral_upscaling,
    "simple_average": _merge("simple_average"),
    "task_arithmetic": _merge("task_arithmetic"),
    "singular_projection_merging": singular_projection_merging,
}


def model_info(model: nn.Module, pretrained: nn.Module | None) -> dict[str, Any]:
    """fusion_bench's model_info (trainable_params, all_params, trainable_percentage) + the added count."""
    all_params = count_parameters(model)
    trainable = count_parameters(model, trainable_only=True)
    info = {
        "trainable_params": trainable,
        "all_params": all_params,
        "trainable_percentage": trainable / all_params,
    }
    if pretrained is not None:
        base = count_parameters(pretrained)
        info |= {
            "pretrained_params": base,
            "added_params": all_params - base,
            "params_ratio": all_params / base,
        }
    return info
