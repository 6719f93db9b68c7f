"""What a leaderboard entry is and gets: `Context`, `Candidate`, the shared model helpers, and `ENTRIES`.

An entry is `fn(ctx, **hparams) -> Candidate`, registered by name with the hyperparameter grid that the
leaderboard searches on the library tasks' validation split (the test split is read once, with the
chosen values). Each project's entries live in `leaderboard/<project>.py` and call `projects.<name>`;
nothing is reimplemented there. `leaderboard.entries` imports them all.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import zoo


@dataclass
class Context:
    """What every entry may use: the zoo's settings, seed, base model and expert adapter folders."""

    settings: zoo.ZooSettings
    seed: int
    base: nn.Module  # eval mode, the settings' dtype; never modified by an entry
    tokenizer: Any
    experts: dict[str, Path]  # library task -> adapter folder
    multitask: Path | None = None
    cache: dict[str, Any] = field(default_factory=dict)


@dataclass
class Candidate:
    """A method's model(s): `model_for(task)` gives the model that answers `task` (one shared model for a
    merge, the task's own expert for the oracle, None where the method has no answer)."""

    model_for: Callable[[str], nn.Module | None]
    params: int  # parameters stored to serve every task (the base counted once)
    note: str = ""


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def adapter_params(path: Path) -> int:
    from common.adapters import load_adapter

    return sum(t.numel() for t in load_adapter(path).state.values())


def with_adapter(ctx: Context, path: Path) -> nn.Module:
    """A copy of the base with the adapter merged into its weights (same cost as the base at inference)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(ctx.base), str(path))
    return model.merge_and_unload().eval()


def lora_deltas(ctx: Context) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(θ0, [θ0 + ΔW_i]) over the adapted weights, fp32, in the library's task order: the inputs of the
    MaTS-style merges (`fn(base, models)`), which see each LoRA expert as the full weights it stands for."""
    if "deltas" not in ctx.cache:
        from common.adapters import load_adapter, lora_factors_from_state

        state = dict(ctx.base.named_parameters())
        base: dict[str, torch.Tensor] = {}
        models = []
        for task in ctx.experts:
            saved = load_adapter(ctx.experts[task])
            factors = lora_factors_from_state(saved.state, saved.config)
            model = {}
            for module, f in factors.items():
                name = _weight_name(module, state)
                base.setdefault(name, state[name].detach().float())
                model[name] = base[name] + f.delta().float()
            models.append(model)
        ctx.cache["deltas"] = (base, models)
    return ctx.cache["deltas"]


def _weight_name(module: str, state: Mapping[str, Any]) -> str:
    """The base model's weight name of a peft module path ('base_model.model.model.layers.0...q_proj')."""
    for prefix in ("base_model.model.", ""):
        name = module.removeprefix(prefix) + ".weight"
        if name in state:
            return name
    raise KeyError(f"no base weight for adapted module {module}")


def with_weights(ctx: Context, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of the base whose named weights are replaced (cast to the base's dtype)."""
    model = copy.deepcopy(ctx.base)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w.to(params[name].dtype))
    return model.eval()


Entry = Callable[..., Candidate]

# name -> (entry, hyperparameter grid searched on validation); filled by `register`
ENTRIES: dict[str, tuple[Entry, Mapping[str, Sequence[Any]]]] = {}


def register(name: str, grid: Mapping[str, Sequence[Any]] | None = None) -> Callable[[Entry], Entry]:
    """Add `fn` to `ENTRIES` as `name`, with its validation grid (`{}`: nothing to choose)."""

    def add(fn: Entry) -> Entry:
        if name in ENTRIES:
            raise ValueError(f"leaderboard entry {name!r} is registered twice")
        ENTRIES[name] = (fn, dict(grid or {}))
        return fn

    return add
