"""A base model carrying a library of LoRA experts behind a selector (mttl's MultiExpertModel).

Each adapted linear becomes a `LibraryLinear`: y = W x + mix(x), with the experts' factors stacked as
A (E, r, d_in), B (E, d_out, r), s (E,). Written by hand because no library mixes LoRA *parameters*
per token (mttl's default); PEFT's Arrow mixes outputs only. Both go through `common.routing`:
    output mixing     Σ_j w_j s_j B_j A_j x                      = routed_lowrank(x, A, B, w, e, s)
    parameter mixing  (Σ_j w_j s_j B_j)(Σ_j w_j A_j) x: h = routed_lowrank(x, A, I, w, e) (N, r),
                      y = routed_lowrank(h, I, s·B, w, e)  (I the r×r identity)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer

from common.io import atomic_dir, load_tensors, read_json, save_tensors, write_json
from common.models import load_model
from common.registry import lookup
from common.routing import experts_b_rows, routed_lowrank
from common.tiny_world import resolve_base
from projects.mbc_arrow.arrow import FROM_TRAINING, arrow_prototypes, arrow_transform, expert_tie_params
from projects.mbc_arrow.library import (
    ExpertLibrary,
    LibraryError,
    get_expert_library,
    same_base,
)
from projects.mbc_arrow.selectors import route, selector_config

MODEL_FILE, WEIGHTS_FILE = "multi_expert_model.json", "experts.safetensors"
MODEL_KIND = "mbc_arrow MultiExpertModel"  # what save_model folders hold (common.io.atomic_dir's marker)


# mttl's `precision` flag -> (common.training's mixed_precision, the dtype the model is evaluated in).
PRECISIONS = {"32": ("no", torch.float32), "bf16": ("bf16", torch.bfloat16), "16": ("fp16", torch.float16)}


def precision(value: str | int) -> tuple[str, torch.dtype]:
    """mttl's `precision` ("32", "bf16", "16") as (mixed_precision for training, evaluation dtype)."""
    return lookup(PRECISIONS, str(value), "precision")


def load_base(
    spec: str, device: str | torch.device = "auto", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a base spec ("tiny:gpt_neo", a folder, a hub id) on `device` in `dtype`."""
    path = resolve_base(spec)
    model = load_model(path, device=device, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


class LibraryLinear(nn.Module):
    """A frozen linear plus E LoRA experts combined per token by the owning model's selector."""

    def __init__(
        self, base_layer: nn.Linear, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, owner: Any
    ):
        super().__init__()
        self.base_layer = base_layer
        self.register_buffer("A", A)  # (E, r, d_in)
        self.register_buffer("B", experts_b_rows(B))  # (E, d_out, r), stored as (E, r, d_out) rows
        self.register_buffer("scaling", scaling)  # (E,)
        self.register_buffer("protos", None)  # (E, d_in), set for arrow
        self._owner = [owner]  # a list, so that nn.Module does not register the owner as a child

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = self._owner[0]
        cfg = owner.selector
        w, idx = route(cfg, x, self.A.shape[0], task_ids=owner.task_ids, protos=self.protos)
        if cfg["lora_merge_after"]:
            mix = routed_lowrank(x, self.A, self.B, w, idx, scaling=self.scaling)
        else:
            mix = mix_parameters(x, self.A, self.B, self.scaling, w, idx)
        return self.base_layer(x) + mix


def mix_parameters(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Parameter mixing (Σ_j w_j s_j B_j)(Σ_j w_j A_j) x per token: x (..., d_in), A (E, r, d_in), B (E, d_out,
    r), weights/indices (..., k) -> (..., d_out).

    One pass: h_all = x A_allᵀ (N, E, r) for all experts at once, h = Σ_e R_ne h_all[n, e] with R the (N, E)
    routing matrix (zero off the top k), then (R s ⊗ h) (N, E·r) @ B_all (E·r, d_out). Equal to the
    composition of two `routed_lowrank` calls through the r×r identity (`mix_parameters_reference`) without
    their identity products and the per-call copy of s·B.
    """
    n_experts, rank, d_in = A.shape
    d_out, k = B.shape[1], indices.shape[-1]
    lead = x.shape[:-1]
    flat = x.reshape(-1, d_in)
    route = flat.new_zeros(flat.shape[0], n_experts).scatter_add(
        1, indices.reshape(-1, k), weights.reshape(-1, k).to(x.dtype)
    )  # (N, E); scatter_add: an expert picked twice counts twice
    h_all = (flat @ A.reshape(n_experts * rank, d_in).T).view(-1, n_experts, rank)  # (N, E, r)
    h = torch.bmm(route[:, None, :], h_all).squeeze(1)  # (N, r) = (Σ w A) x
    coef = route * scaling.to(x.dtype)  # (N, E)
    y = (coef[:, :, None] * h[:, None, :]).reshape(-1, n_experts * rank) @ B.transpose(1, 2).reshape(
        n_experts * rank, d_out
    )
    return y.reshape(*lead, d_out)


def mix_parameters_reference(x, A, B, scaling, weights, indices) -> torch.Tensor:
    """`mix_parameters` as two `routed_lowrank` calls: h = (Σ w A) x through B = I, then (Σ w s B) h through A = I."""
    n_exp, r = A.shape[:2]
    eye = torch.eye(r, dtype=x.dtype, device=x.device).expand(n_exp, r, r)
    h = routed_lowrank(x, A, eye, weights, indices)  # (..., r) = (Σ w A) x
    return routed_lowrank(h, eye, B * scaling[:, None, None], weights, indices)


def _stack(experts: Sequence[Mapping[str, Any]], module: str, model_module: nn.Linear):
    """Stack one module's factors over experts, zero-padding ranks to the largest (zero adds nothing)."""
    d_out, d_in = model_module.weight.shape
    r = max(f[module].rank for f in experts if module in f)
    A, B = torch.zeros(len(experts), r, d_in), torch.zeros(len(experts), d_out, r)
    s = torch.zeros(len(experts))
    for e, f in enumerate(experts):
        if module in f:
            fa = f[module]
            if fa.A.shape[1] != d_in or fa.B.shape[0] != d_out:
                raise LibraryError(
                    f"{module}: expert factors {tuple(fa.B.shape)}x{tuple(fa.A.shape)} do not fit the base "
                    f"layer ({d_out}, {d_in}): wrong base model?"
                )
            A[e, : fa.rank], B[e, :, : fa.rank], s[e] = fa.A, fa.B, fa.scaling
    return A, B, s


class MultiExpertModel:
    """`model` (the transformers model, with LibraryLinear layers), `tokenizer`, `selector`, expert names."""

    def __init__(
        self,
        base_model: str,
        device: str | torch.device = "auto",
        dtype: torch.dtype = torch.float32,
        *,
        loaded: tuple[nn.Module, Any] | None = None,
    ) -> None:
        """`loaded`: an already loaded (model, tokenizer) of `base_model`, taken as it is (and modified)."""
        self.base_model = base_model
        self.model, self.tokenizer = loaded if loaded is not None else load_base(base_model, device, dtype)
        self.model.requires_grad_(False)
        self.expert_names: list[str] = []
        self.expert_tie_params: list[str | None] = []  # each expert's training tie_params (Arrow's default)
        self.task_to_expert: dict[str, int] = {}
        self.selector: dict[str, Any] = selector_config("uniform")
        self.task_ids: torch.Tensor | None = None
        self.library: ExpertLibrary | None = None

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained_library(
        cls,
        library: str | ExpertLibrary,
        selector: Mapping[str, Any] | str = "uniform",
        *,
        base_model: str | None = None,
        device: str | torch.device = "auto",
        dtype: torch.dtype = torch.float32,
        selector_config: Mapping[str, Any] | str | None = None,
        device_map: str | None = None,
    ) -> MultiExpertModel:
        """`selector_config=` and `device_map=` are mttl's names (the notebook's call) for `selector` and `device`."""
        if selector_config is not None:
            selector = selector_config
        device = device_map or device
        lib = library if isinstance(library, ExpertLibrary) else get_expert_library(library)
        names = lib.require_experts("a multi-expert model")
        recorded = lib.base_model()
        if base_model and not same_base(base_model, recorded):
            raise LibraryError(f"library experts are for base model {recorded!r}, not {base_model!r}")
        self = cls(base_model or recorded, device, dtype)
        self.library = lib
        experts = [lib[n] for n in names]
        self.expert_tie_params = [e.info.training_config.get("tie_params") for e in experts]
        self._install(
            names, [e.factors() for e in experts], {n: e.info.task_names for n, e in zip(names, experts)}
        )
        self.set_selector(selector)
        return self

    @classmethod
    def from_factors(
        cls,
        loaded: tuple[nn.Module, Any],
        factors: Mapping[str, Mapping[str, Any]],
        tasks: Mapping[str, Sequence[str]],
        selector: Mapping[str, Any] | str = "uniform",
        *,
        base_model: str,
    ) -> MultiExpertModel:
        """The experts {name: {module: LoraFactors}} (module names of `loaded`'s model, no PEFT prefix) in an
        already loaded (model, tokenizer), which is modified in place; `tasks` maps each expert to its tasks."""
        self = cls(base_model, loaded=loaded)
        names = list(factors)
        self.expert_tie_params = [None] * len(names)  # untied experts (peft's LoRA)
        self._install(names, [factors[n] for n in names], {n: list(tasks[n]) for n in names})
        self.set_selector(selector)
        return self

    def _install(
        self, names: list[str], factors: list[Mapping[str, Any]], tasks: Mapping[str, list[str]]
    ) -> None:
        self.expert_names = list(names)
        self.task_to_expert = {t: i for i, n in enumerate(names) for t in tasks[n]}
        modules = sorted({m for f in factors for m in f})
        for m in modules:
            try:
                layer = self.model.get_submodule(m)
            except AttributeError as e:
                raise LibraryError(f"the base model has no module {m!r}: experts for another model?") from e
            if not isinstance(layer, nn.Linear):
                raise LibraryError(
                    f"{m} is a {type(layer).__name__}; only nn.Linear layers take experts here"
                )
            A, B, s = _stack(factors, m, layer)
            parent, _, leaf = m.rpartition(".")
            # the experts live with the layer they extend: its device and dtype (bf16 at paper scale)
            new = LibraryLinear(layer, A, B, s, self).to(layer.weight.device, layer.weight.dtype)
            setattr(self.model.get_submodule(parent), leaf, new)

    def layers(self) -> dict[str, LibraryLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, LibraryLinear)}

    def set_selector(
        self, config: Mapping[str, Any] | str, selector: Mapping[str, Any] | str | None = None
    ) -> None:
        """Swap the selector: `set_selector("arrow")`, or as the notebook `set_selector("lora", "uniform")`."""
        if selector is not None:
            if config != "lora":
                raise ValueError(f"only LoRA experts are held here, got modifier {config!r}")
            config = selector
        cfg = selector_config(config)
        if cfg["name"] == "arrow":
            # unset: each expert's training tie_params, as mttl's compute_arrow_embeddings (`or "default"`)
            arrow_cfg = {"scale": cfg["scale"], "tie_params": cfg["tie_params"] or FROM_TRAINING}
            if self.library is not None and not self.library.read_only:
                per_expert = arrow_transform(self.library, arrow_cfg)  # computed once, stored in the library
                protos = {m: [per_expert[n].get(m) for n in self.expert_names] for m in self.layers()}
            else:  # loaded with from_pretrained: the same exact prototypes from the stacked factors
                protos = self._protos_from_layers(arrow_cfg)
            for m, layer in self.layers().items():
                stacked = [p if p is not None else torch.zeros(layer.A.shape[-1]) for p in protos[m]]
                layer.protos = torch.stack(stacked).to(layer.A)
        self.selector = cfg

    def _protos_from_layers(self, arrow_cfg: Mapping[str, Any]) -> dict[str, list[torch.Tensor]]:
        from common.adapters import LoraFactors

        layers = self.layers()
        trained = self.expert_tie_params or [None] * len(self.expert_names)
        per_expert = [
            arrow_prototypes(
                {m: LoraFactors(lay.A[e], lay.B[e], float(lay.scaling[e])) for m, lay in layers.items()},
                scale=arrow_cfg["scale"],
                tie_params=expert_tie_params(arrow_cfg["tie_params"], trained[e]),
            )
            for e in range(len(self.expert_names))
        ]
        return {m: [p[m] for p in per_expert] for m in layers}

    @contextlib.contextmanager
    def routing(self, task_names: Sequence[str] | None = None) -> Iterator[None]:
        """Routing information for the next forward passes: the examples' task names (oracle selector)."""
        unknown = sorted({t for t in task_names or () if t not in self.task_to_expert})
        if unknown:
            raise KeyError(
                f"no expert for task(s) {unknown}; the library covers {sorted(self.task_to_expert)}"
            )
        self.task_ids = (
            None if task_names is None else torch.tensor([self.task_to_expert[t] for t in task_names])
        )
        try:
            yield
        finally:
            self.task_ids = None

    # -- saving --------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """The experts, their task map and the selector (with its prototypes), written atomically; a
        non-empty folder that is not a saved MultiExpertModel is replaced only with `overwrite`."""
        tensors = {}
        for m, layer in self.layers().items():
            for key in ("A", "B", "scaling", "protos"):
                if getattr(layer, key) is not None:
                    tensors[f"{m}::{key}"] = getattr(layer, key)
        meta = {
            "base_model": self.base_model,
            "experts": self.expert_names,
            "expert_tie_params": self.expert_tie_params,
            "task_to_expert": self.task_to_expert,
            "selector": self.selector,
        }
        with atomic_dir(path, kind=MODEL_KIND, overwrite=overwrite) as tmp:
            save_tensors(tmp / WEIGHTS_FILE, tensors)
            write_json(tmp / MODEL_FILE, meta)
        return Path(path)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str | torch.device = "auto", dtype: torch.dtype = torch.float32
    ) -> MultiExpertModel:
        path = Path(path)
        if not (path / MODEL_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a saved MultiExpertModel (no {MODEL_FILE})")
        meta = read_json(path / MODEL_FILE)
        tensors = load_tensors(path / WEIGHTS_FILE)
        self = cls(meta["base_model"], device, dtype)
        self.expert_names, self.task_to_expert = meta["experts"], meta["task_to_expert"]
        self.expert_tie_params = meta.get("expert_tie_params", [])  # absent in models saved before
        for m in sorted({k.split("::")[0] for k in tensors}):
            layer = self.model.get_submodule(m)
            new = LibraryLinear(layer, tensors[f"{m}::A"], tensors[f"{m}::B"], tensors[f"{m}::scaling"], self)
            new.protos = tensors.get(f"{m}::protos")
            parent, _, leaf = m.rpartition(".")
            setattr(self.model.get_submodule(parent), leaf, new.to(layer.weight.device, layer.weight.dtype))
        self.selector = selector_config(meta["selector"])
        return self
