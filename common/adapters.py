"""LoRA and (IA)^3 experts, kept in PEFT's adapter format.

Every LoRA expert is a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`), so a
hub LoRA can join a library and a library expert loads in peft. What PEFT has no field for (a PHATGOOSE
gate, an A shared across q/k/v, Arrow prototypes) goes beside it in `extras.safetensors`, with what each
tensor means in `extras.json`.

LoRA (Hu et al. 2021, eq. 3): h = W0 x + s · B A x with A ∈ R^{r×d_in}, B ∈ R^{d_out×r}, s = α/r
(α/√r with rsLoRA). GPT-2's `Conv1D` stores W0 transposed; peft handles it with `fan_in_fan_out=True`
and its A/B keep the orientation above, which `lora_factors` returns.
(IA)^3 (Liu et al. 2022, §3.3): a learned vector l rescales a module's output (l ⊙ W x), or for
"feed-forward" modules its input (W (l ⊙ x)).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import IA3Config, LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from common.cli import UserError
from common.io import (
    NonFiniteError,
    atomic_dir,
    check_finite,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
EXTRAS_WEIGHTS = "extras.safetensors"
EXTRAS_META = "extras.json"

# Linear layers each paper adapts, by transformers `model_type`.
LORA_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neo": ["q_proj", "k_proj", "v_proj"],
    "t5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "clip": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "clip_vision_model": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "clip_text_model": ["q_proj", "k_proj", "v_proj", "out_proj"],
}
# (IA)^3 on T5 (T-Few): keys, values, and the input of the second feed-forward matrix.
IA3_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "t5": (["k", "v", "wo"], ["wo"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
}


class AdapterError(UserError):
    """A missing, malformed or incompatible adapter."""


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module's update ΔW = scaling · B @ A, with A (r, d_in) and B (d_out, r)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense ΔW (d_out, d_in); for tests and small layers only."""
        return self.scaling * (self.B @ self.A)


def _targets(registry: Mapping[str, Any], model_type: str) -> Any:
    if model_type not in registry:
        raise AdapterError(
            f"no default target modules for model_type {model_type!r}; pass target_modules "
            f"(known: {sorted(registry)})"
        )
    return registry[model_type]


def lora_config(
    model_type: str,
    r: int,
    alpha: float | None = None,
    *,
    target_modules: Sequence[str] | None = None,
    dropout: float = 0.0,
    init_lora_weights: bool | str = True,
    **kwargs: Any,
) -> LoraConfig:
    """A peft LoraConfig with the family's default targets (alpha defaults to r, i.e. scaling 1)."""
    if r <= 0:
        raise AdapterError(f"LoRA rank must be positive, got r={r}")
    return LoraConfig(
        r=r,
        lora_alpha=r if alpha is None else alpha,
        target_modules=list(target_modules or _targets(LORA_TARGETS, model_type)),
        lora_dropout=dropout,
        fan_in_fan_out=model_type == "gpt2",  # GPT-2's Conv1D stores W as (d_in, d_out)
        init_lora_weights=init_lora_weights,
        **kwargs,
    )


def ia3_config(
    model_type: str,
    *,
    target_modules: Sequence[str] | None = None,
    feedforward_modules: Sequence[str] | None = None,
    **kwargs: Any,
) -> IA3Config:
    """A peft IA3Config; by default (IA)^3's keys, values and feed-forward input, as in T-Few."""
    default_targets, default_ff = _targets(IA3_TARGETS, model_type) if target_modules is None else ([], [])
    return IA3Config(
        target_modules=list(target_modules or default_targets),
        feedforward_modules=list(feedforward_modules if feedforward_modules is not None else default_ff),
        fan_in_fan_out=model_type == "gpt2",
        **kwargs,
    )


def add_adapter(model: torch.nn.Module, config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` with a new trainable adapter (the base weights are frozen)."""
    return get_peft_model(model, config, adapter_name=adapter_name)


def lora_factors(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, LoraFactors]:
    """Module name -> LoraFactors for every LoRA layer of `model` that holds `adapter_name`."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            out[name] = LoraFactors(
                A=module.lora_A[adapter_name].weight.detach(),
                B=module.lora_B[adapter_name].weight.detach(),
                scaling=float(module.scaling[adapter_name]),
            )
    if not out:
        raise AdapterError(f"model has no LoRA layers with adapter {adapter_name!r}")
    return out


def lora_factors_from_state(state: Mapping[str, torch.Tensor], config: LoraConfig) -> dict[str, LoraFactors]:
    """Module name -> LoraFactors from a saved PEFT adapter state dict (`...lora_A.weight` keys)."""
    out = {}
    for key, A in state.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        b_key = f"{module}.lora_B.weight"
        if b_key not in state:
            raise AdapterError(f"adapter has {key} but no {b_key}")
        B = state[b_key]
        if A.shape[0] != B.shape[1]:
            raise AdapterError(
                f"{module}: rank of lora_A {tuple(A.shape)} != rank of lora_B {tuple(B.shape)}"
            )
        r = A.shape[0]
        short = module.split(".")[-1]
        alpha = (config.alpha_pattern or {}).get(short, config.lora_alpha)
        r_conf = (config.rank_pattern or {}).get(short, config.r)
        if r != r_conf:
            raise AdapterError(f"{module}: stored rank {r} differs from the config's rank {r_conf}")
        scaling = alpha / (r**0.5) if config.use_rslora else alpha / r
        out[module] = LoraFactors(A=A, B=B, scaling=float(scaling))
    if not out:
        raise AdapterError("state dict holds no LoRA weights (no keys ending in 'lora_A.weight')")
    return out


def save_adapter(
    model: PeftModel,
    path: str | os.PathLike,
    *,
    adapter_name: str = "default",
    extras: Mapping[str, torch.Tensor] | None = None,
    extras_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write the adapter in PEFT format plus extras, atomically: the folder appears whole or not at all."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(str(tmp), selected_adapters=[adapter_name])
        sub = tmp / adapter_name if adapter_name != "default" else tmp
        if sub != tmp:  # peft nests non-default adapters in a sub-folder; keep one flat layout
            for f in sub.iterdir():
                f.rename(tmp / f.name)
            sub.rmdir()
        _check_finite(load_tensors(tmp / ADAPTER_WEIGHTS, finite=False), path)
        if extras:
            save_tensors(tmp / EXTRAS_WEIGHTS, extras)
        if extras or extras_meta:
            write_json(tmp / EXTRAS_META, dict(extras_meta or {}))
    return path


@dataclass
class SavedAdapter:
    config: PeftConfig
    state: dict[str, torch.Tensor]
    extras: dict[str, torch.Tensor]
    extras_meta: dict[str, Any]


def load_adapter(path: str | os.PathLike) -> SavedAdapter:
    """Read an adapter folder written by peft (ours or anyone's) without loading a base model."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"{path} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{path} has no {ADAPTER_WEIGHTS} (only safetensors adapters are read)")
    config = PeftConfig.from_pretrained(str(path))
    state = load_tensors(path / ADAPTER_WEIGHTS, finite=False)
    _check_finite(state, path)  # as an AdapterError
    try:  # router keys, gates, prototypes: NaN/inf refused with the file and tensor named
        extras = load_tensors(path / EXTRAS_WEIGHTS) if (path / EXTRAS_WEIGHTS).is_file() else {}
    except NonFiniteError as e:
        raise AdapterError(str(e)) from e
    meta = read_json(path / EXTRAS_META) if (path / EXTRAS_META).is_file() else {}
    return SavedAdapter(config=config, state=state, extras=extras, extras_meta=meta)


def check_compatible(config: PeftConfig, base_model_name: str | None) -> None:
    """Refuse an adapter trained on another base model (compared by the name recorded in its config)."""
    recorded = getattr(config, "base_model_name_or_path", None)
    if base_model_name and recorded and Path(str(recorded)).name != Path(base_model_name).name:
        raise AdapterError(f"adapter was trained on base model {recorded!r}, not {base_model_name!r}")


def _check_finite(state: Mapping[str, torch.Tensor], where: Any) -> None:
    try:
        check_finite(state, f"adapter at {where}")
    except NonFiniteError as e:
        raise AdapterError(str(e)) from e
