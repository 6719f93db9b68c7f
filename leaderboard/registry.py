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
    experts: dict[str, Path]  # library task -> adapter folder (full fine-tuning: a save_pretrained folder)
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
    """Parameters an expert folder stores: its adapter's, or every weight of a fully fine-tuned model."""
    from common.adapters import ADAPTER_CONFIG, load_adapter

    if not (Path(path) / ADAPTER_CONFIG).is_file():  # a save_pretrained folder (full fine-tuning)
        import math

        from safetensors import safe_open

        total = 0
        for file in sorted(Path(path).glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        return total
    return sum(t.numel() for t in load_adapter(path).state.values())


def with_adapter(ctx: Context, path: Path) -> nn.Module:
    """A copy of the base with the adapter merged into its weights (same cost as the base at inference);
    a fully fine-tuned expert (`ctx.settings.adapter == "full"`) is loaded as it was saved."""
    if ctx.settings.adapter == "full":
        return zoo.load_expert(path, ctx.settings)
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


def expert_states(ctx: Context) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(θ0, [θi]) over what the settings' experts fine-tuned, fp32, in the library's task order: the inputs
    of `projects.mats.methods.METHODS`. LoRA: the adapted weights (`lora_deltas`); (IA)^3: the vectors
    (θ0 all ones), named as in a `PeftModel` (`...k_proj.ia3_l.default`); full: every parameter."""
    adapter = ctx.settings.adapter
    if adapter == "lora":
        return lora_deltas(ctx)
    if "states" not in ctx.cache:
        from dataclasses import replace

        from projects.mats.model import read_state

        if adapter == "ia3":
            models = [{k: v.float() for k, v in read_state(p).items()} for p in ctx.experts.values()]
            base = {k: torch.ones_like(v) for k, v in models[0].items()}
        else:
            fp32 = replace(ctx.settings, dtype="float32")
            base = {k: p.detach().float() for k, p in ctx.base.named_parameters()}
            models = [
                {k: p.detach() for k, p in zoo.load_expert(p, fp32).named_parameters()}
                for p in ctx.experts.values()
            ]
        ctx.cache["states"] = (base, models)
    return ctx.cache["states"]


def with_state(ctx: Context, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """The model a merged `state` (named as `expert_states` names it) stands for, as one plain model:
    (IA)^3 vectors are put into a `PeftModel` over a copy of the base and merged into its weights."""
    if ctx.settings.adapter != "ia3":
        return with_weights(ctx, state)
    from peft import PeftModel

    from projects.mats.model import load_state

    model = PeftModel.from_pretrained(copy.deepcopy(ctx.base), str(next(iter(ctx.experts.values()))))
    load_state(model, "ia3", state, where="the merged (IA)^3 vectors")
    return model.merge_and_unload().eval()


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
