"""Import an mttl expert library (`{name}.ckpt` + `{name}.meta`, as `hf://sordonia/trained_gpt125m_experts_colab`).

mttl stores per expert (`mttl/models/library/expert_library.py`): `{name}.ckpt` = torch.save(param -> tensor)
with `<module>.lora_a` (d_in, r) and `<module>.lora_b` (r, d_out), and `{name}.meta` = torch.save(ExpertInfo
dict: expert_name, expert_task_name, expert_config {lora_rank, lora_alpha, modify_layers, tie_params},
training_config, expert_model, expert_deleted). Both are read with torch.load(weights_only=True) only;
its update is x A B · α/r, i.e. PEFT's lora_A.weight = lora_aᵀ, lora_B.weight = lora_bᵀ, scaling α/r.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

from common.adapters import ADAPTER_WEIGHTS
from common.io import save_tensors, torch_load_safe
from projects.mbc_arrow.library import ExpertInfo, ExpertLibrary, LibraryError, get_expert_library


def _expand_tied(weights: dict[str, torch.Tensor], tie_params: str | None) -> dict[str, torch.Tensor]:
    """Re-create tied parameters stored once (mttl keeps e.g. q_proj.lora_a only; k/v share it)."""
    if not tie_params:
        return weights
    patterns = tie_params.split("|")
    out = dict(weights)
    for key, value in weights.items():
        for pat in patterns:
            m = re.search(pat + "$", key)
            if not m:
                continue
            prefix = key[: m.start()]
            for other in patterns:
                target = prefix + other.replace("\\", "")
                out.setdefault(target, value)
    return out


def mttl_expert_to_peft(ckpt: Any, meta: dict[str, Any], out_dir: Path) -> ExpertInfo:
    """Write one mttl expert as a PEFT adapter folder in `out_dir`; return its ExpertInfo."""
    if isinstance(ckpt, dict) and "expert_weights" in ckpt:  # an Expert.asdict() dump
        ckpt = ckpt["expert_weights"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise LibraryError("an mttl .ckpt must be a dict of parameter name -> tensor")
    cfg = meta.get("expert_config") or {}
    if not isinstance(cfg, dict) or "lora_rank" not in cfg:
        raise LibraryError(f"expert {meta.get('expert_name')!r}: .meta holds no LoRA expert_config")
    rank, alpha = int(cfg["lora_rank"]), float(cfg.get("lora_alpha") or 1.0)
    weights = _expand_tied(ckpt, cfg.get("tie_params"))
    state, modules = {}, set()
    for key, a in weights.items():
        if not key.endswith(".lora_a"):
            continue
        module = key[: -len(".lora_a")]
        b = weights.get(f"{module}.lora_b")
        if b is None:
            raise LibraryError(f"{key} has no matching {module}.lora_b")
        if a.shape[1] != rank or b.shape[0] != rank:
            raise LibraryError(
                f"{module}: lora_a {tuple(a.shape)} / lora_b {tuple(b.shape)} not of rank {rank}"
            )
        state[f"base_model.model.{module}.lora_A.weight"] = a.T.contiguous().float()
        state[f"base_model.model.{module}.lora_B.weight"] = b.T.contiguous().float()
        modules.add(module.split(".")[-1])
    if not state:
        raise LibraryError(f"expert {meta.get('expert_name')!r}: no '*.lora_a' parameters in its .ckpt")
    training = meta.get("training_config") or {}
    base = meta.get("expert_model") or training.get("model") or "unknown"
    LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=sorted(modules), base_model_name_or_path=base
    ).save_pretrained(str(out_dir))
    save_tensors(out_dir / ADAPTER_WEIGHTS, state)
    return ExpertInfo(
        expert_name=meta["expert_name"],
        expert_task_name=meta.get("expert_task_name") or meta["expert_name"],
        base_model=base,
        # the expert_config's tie_params is what the expert was trained with: Arrow's default reads it
        training_config={
            **{k: v for k, v in training.items() if isinstance(v, (str, int, float, bool, type(None)))},
            "tie_params": cfg.get("tie_params"),
        },
        source="mttl",
    )


def import_mttl_library(src: str | os.PathLike, destination_id: str) -> ExpertLibrary:
    """Every non-deleted expert of an mttl library folder, into a new library at `destination_id`."""
    src = Path(src)
    metas = sorted(src.glob("*.meta"))
    if not metas:
        raise LibraryError(f"{src} holds no mttl experts (*.meta)")
    lib = get_expert_library(destination_id, create=True)
    for meta_path in metas:
        meta = torch_load_safe(meta_path)
        if meta.get("expert_deleted"):
            continue
        ckpt_path = meta_path.with_suffix(".ckpt")
        if not ckpt_path.is_file():
            raise LibraryError(f"{meta_path.name} has no {ckpt_path.name}")
        with tempfile.TemporaryDirectory() as tmp:
            info = mttl_expert_to_peft(torch_load_safe(ckpt_path), meta, Path(tmp))
            lib.add_adapter_dir(tmp, info)
    return lib
