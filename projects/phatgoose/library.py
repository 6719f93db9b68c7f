"""Expert checkpoints and the original's checkpoint manipulations (`scripts/manipulations.py`,
`scripts/concatenate.py`), on PEFT adapter folders.

An expert is a PEFT LoRA adapter folder; what PEFT has no field for sits beside it in extras:
    router.<module>   v_e (d_in,): the routing key (zeros after `put_index_to_lora`, the trained gate
                      after `use_input_gate_as_router`, the mean module input for Average Activation)
    gate.<module>     the sigmoid gate g (d_in,) learnt with base and LoRA frozen
A library (the original's concatenated MoE checkpoint) is a folder `experts/<i>_<name>/` of such
adapters plus `library.json` holding their order: expert i of the MoE is the i-th entry.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftConfig

from common.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    load_adapter,
    lora_config,
    lora_factors_from_state,
)
from common.io import atomic_dir, load_tensors, read_json, save_tensors, torch_load_safe, write_json
from projects.phatgoose.moe import Expert

PEFT_PREFIX = "base_model.model."
LIBRARY_INDEX = "library.json"


def read_expert(path: str | os.PathLike) -> Expert:
    """An expert folder -> Expert (factors keyed by the base model's module names)."""
    saved = load_adapter(path)
    factors = lora_factors_from_state(saved.state, saved.config)
    scalings = {f.scaling for f in factors.values()}
    if len(scalings) != 1:
        raise AdapterError(f"{path}: modules have different LoRA scalings {sorted(scalings)}")
    strip = {m: m.removeprefix(PEFT_PREFIX) for m in factors}
    extras = saved.extras
    return Expert(
        name=saved.extras_meta.get("name", Path(path).name),
        A={strip[m]: f.A for m, f in factors.items()},
        B={strip[m]: f.B for m, f in factors.items()},
        scaling=scalings.pop(),
        router={k.removeprefix("router."): v for k, v in extras.items() if k.startswith("router.")},
        gate={k.removeprefix("gate."): v for k, v in extras.items() if k.startswith("gate.")},
    )


def write_expert(
    out: str | os.PathLike,
    config: LoraConfig,
    expert: Expert,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write `expert` as a PEFT adapter folder (with `config`) plus its router/gate extras, atomically."""
    state = {}
    for m in expert.A:
        state[f"{PEFT_PREFIX}{m}.lora_A.weight"] = expert.A[m].contiguous()
        state[f"{PEFT_PREFIX}{m}.lora_B.weight"] = expert.B[m].contiguous()
    extras = {f"router.{m}": v for m, v in expert.router.items()}
    extras |= {f"gate.{m}": v for m, v in expert.gate.items()}
    out = Path(out)
    with atomic_dir(out) as tmp:
        config.save_pretrained(str(tmp))
        save_tensors(tmp / ADAPTER_WEIGHTS, state)
        if extras:
            save_tensors(tmp / "extras.safetensors", extras)
        write_json(tmp / "extras.json", {"name": expert.name, **(meta or {})})
    return out


def adapter_config(path: str | os.PathLike) -> LoraConfig:
    """The LoraConfig saved in an expert folder."""
    return load_adapter(path).config


def put_index_to_lora(path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """A LoRA expert in MoE form with one expert: a zero router key per module (manipulations.py)."""
    ex = read_expert(path)
    ex.router = {m: torch.zeros(a.shape[1], dtype=a.dtype) for m, a in ex.A.items()}
    return write_expert(out_path, adapter_config(path), ex, {"stage": "moe"})


def use_input_gate_as_router(path: str | os.PathLike, out_path: str | os.PathLike | None = None) -> Path:
    """Copy each module's trained gate into its router key (in place unless `out_path` is given)."""
    ex = read_expert(path)
    if not ex.gate:
        raise AdapterError(f"{path} has no trained gate (run train_gate first)")
    ex.router = {m: g.clone() for m, g in ex.gate.items()}
    return write_expert(out_path or path, adapter_config(path), ex, {"stage": "router"})


def run_concatenate(
    paths: Sequence[str | os.PathLike], out_path: str | os.PathLike, names: Sequence[str] | None = None
) -> Path:
    """Experts in this order -> one library (concatenate.py); gates are dropped, router keys kept."""
    if not paths:
        raise ValueError("run_concatenate: no expert to concatenate")
    names = list(names or [Path(p).name for p in paths])
    for p, name in zip(paths, names):
        if not Path(p, ADAPTER_CONFIG).is_file():
            raise AdapterError(f"missing expert {name!r}: {p} is not an adapter folder (no {ADAPTER_CONFIG})")
    check_same_base(paths)
    out = Path(out_path)
    with atomic_dir(out) as tmp:
        entries = []
        for i, (p, name) in enumerate(zip(paths, names)):
            ex = read_expert(p)
            ex.name, ex.gate = name, {}
            sub = f"experts/{i:03d}_{name}"
            write_expert(tmp / sub, adapter_config(p), ex, {"stage": "library", "source": str(p)})
            entries.append({"index": i, "name": name, "path": sub})
        write_json(tmp / LIBRARY_INDEX, {"experts": entries})
    return out


def read_library(path: str | os.PathLike) -> list[Expert]:
    """The experts of a library (or a single expert folder) in MoE order."""
    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():
        return [read_expert(path)]
    if not (path / LIBRARY_INDEX).is_file():
        raise AdapterError(
            f"{path} is neither an expert (no {ADAPTER_CONFIG}) nor a library (no {LIBRARY_INDEX})"
        )
    entries = read_json(path / LIBRARY_INDEX)["experts"]
    if not entries:
        raise AdapterError(
            f"library {path} holds no experts ({LIBRARY_INDEX} lists none); concatenate some first"
        )
    check_same_base([path / e["path"] for e in entries])
    return [read_expert(path / e["path"]) for e in entries]


def check_same_base(paths: Sequence[str | os.PathLike]) -> None:
    """Refuse experts whose adapter configs record different base models (they cannot share one MoE)."""
    bases = {str(p): adapter_base(p) for p in paths}
    if len({Path(b).name for b in bases.values() if b}) > 1:
        raise AdapterError(
            f"the experts were trained on different base models: {bases}; a library needs one base "
            "(retrain the odd ones on the same hf_torch_model.model_name_or_path)"
        )


def adapter_base(path: str | os.PathLike) -> str | None:
    """The base model an adapter folder records (`base_model_name_or_path`), without reading weights."""
    return getattr(PeftConfig.from_pretrained(str(path)), "base_model_name_or_path", None)


def set_library_keys(path: str | os.PathLike, keys: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Rewrite each library expert's router keys (expert name -> module -> v_e), e.g. averaged hiddens."""
    path = Path(path)
    for e in read_json(path / LIBRARY_INDEX)["experts"]:
        if e["name"] not in keys:
            raise KeyError(f"no router keys for expert {e['name']!r}")
        sub = path / e["path"]
        ex = read_expert(sub)
        ex.router = dict(keys[e["name"]])
        write_expert(sub, adapter_config(sub), ex, read_json(sub / "extras.json"))


def merged_delta(experts: Sequence[Expert]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """ΔW = (1/N) Σ_e s_e B_e A_e as exact factors (A_cat (N·r, d_in), B_cat (d_out, N·r)) per module."""
    n = len(experts)
    out = {}
    for m in experts[0].A:
        A_cat = torch.cat([ex.A[m] for ex in experts], dim=0)
        B_cat = torch.cat([ex.B[m] * (ex.scaling / n) for ex in experts], dim=1)
        out[m] = (A_cat, B_cat)
    return out


def average_outer_product_lora_weights(path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Merged Experts: one LoRA of rank N·r (scaling 1) whose B·A is the mean of the experts' updates.

    The paper's average of ΔW_e = B_e A_e (the README's function is missing from the original code;
    its `average_lora_weights`, averaging A and B separately, is a different method).
    """
    experts = read_library(path)
    delta = merged_delta(experts)
    rank = next(iter(delta.values()))[0].shape[0]
    base = adapter_config(Path(path) / read_json(Path(path) / LIBRARY_INDEX)["experts"][0]["path"])
    config = lora_config("t5", rank, rank, target_modules=sorted(set(base.target_modules)))
    config.base_model_name_or_path = base.base_model_name_or_path
    merged = Expert(
        name="merged_experts",
        A={m: a for m, (a, _) in delta.items()},
        B={m: b for m, (_, b) in delta.items()},
        scaling=1.0,
    )
    return write_expert(out_path, config, merged, {"stage": "merged", "experts": [e.name for e in experts]})


def import_rthree(checkpoint: str | os.PathLike, out_path: str | os.PathLike, names: Sequence[str]) -> Path:
    """Split a released r-three MoE checkpoint (`<module>._addons.expert_lora.layer{1,2}__i`,
    `<module>._addons.router.expert_embeddings__i`) into a library, expert i named names[i].

    layer1__i is A_iᵀ (d_in, r), layer2__i is B_iᵀ (r, d_out); the LoRA scaling is 1/r.
    """
    checkpoint = Path(checkpoint)
    state = load_tensors(checkpoint) if checkpoint.suffix == ".safetensors" else torch_load_safe(checkpoint)
    experts: dict[int, Expert] = {}
    for key, value in state.items():
        module, sep, leaf = key.rpartition("._addons.")
        if not sep:
            continue
        kind, _, index = leaf.rpartition("__")
        if not index.isdigit():
            continue
        i = int(index)
        if i >= len(names):
            raise ValueError(f"checkpoint has expert {i} but only {len(names)} names were given")
        ex = experts.setdefault(i, Expert(name=names[i], A={}, B={}, scaling=1.0))
        if kind == "expert_lora.layer1":
            ex.A[module] = value.T.float().contiguous()
        elif kind == "expert_lora.layer2":
            ex.B[module] = value.T.float().contiguous()
        elif kind == "router.expert_embeddings":
            ex.router[module] = value.float()
    if len(experts) != len(names):
        raise ValueError(f"checkpoint holds {len(experts)} experts, {len(names)} names were given")
    paths = []
    staging = Path(out_path).with_name(Path(out_path).name + ".import")
    for i in sorted(experts):
        ex = experts[i]
        rank = next(iter(ex.A.values())).shape[0]
        ex.scaling = 1.0 / rank
        targets = sorted({m.rsplit(".", 1)[-1] for m in ex.A})
        paths.append(
            write_expert(staging / ex.name, lora_config("t5", rank, 1.0, target_modules=targets), ex)
        )
    out = run_concatenate(paths, out_path, names)
    shutil.rmtree(staging)
    return out
