"""Arrow prototypes (Ostapenko et al. 2024, §4.2; mttl `ArrowTransform`, ab_only, scale=False).

For each adapted linear with ΔW = s·B A (A (r, d_in), B (d_out, r)), the prototype is the top right
singular vector of ΔW: a unit vector in the layer's input space, of arbitrary sign, unchanged by s.
It is computed exactly from the factors without forming ΔW: Aᵀ = Q_a R_a, B = Q_b R_b (thin QR), so
ΔW ∝ Q_b (R_b R_aᵀ) Q_aᵀ and, with R_b R_aᵀ = U S Vᵀ (an r×r SVD), v₁ = Q_a V[:, 0], σ₁ = S[0].
A group of linears with tied A (q/k/v, tie_params) gets one prototype from A and the B's concatenated.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from common.adapters import LoraFactors
from projects.mbc_arrow.library import ExpertLibrary

DEFAULTS = {"name": None, "scale": False, "tie_params": None}


def top_right_singular(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v₁ (d_in,), σ₁) of ΔW = B A, exactly, from A (r, d_in) and B (d_out, r), in float64 internally."""
    qa, ra = torch.linalg.qr(A.double().T)  # (d_in, r), (r, r)
    _qb, rb = torch.linalg.qr(B.double())  # (d_out, r), (r, r)
    _, s, vh = torch.linalg.svd(rb @ ra.T)  # the r×r core of ΔW = Q_b core Q_aᵀ
    return (qa @ vh[0]).to(A.dtype), s[0].to(A.dtype)


def tie_groups(modules: Sequence[str], tie_params: str | None) -> list[list[str]]:
    """Modules sharing A: same parent, last name in the tie pattern (mttl 'q_proj.lora_a|k_proj.lora_a|...')."""
    if not tie_params:
        return [[m] for m in sorted(modules)]
    tied = {p.split(".")[0] for p in tie_params.split("|")}
    groups: dict[str, list[str]] = {}
    for m in sorted(modules):
        parent, _, leaf = m.rpartition(".")
        groups.setdefault(parent if leaf in tied else m, []).append(m)
    return list(groups.values())


def arrow_prototypes(
    factors: Mapping[str, LoraFactors], *, scale: bool = False, tie_params: str | None = None
) -> dict[str, torch.Tensor]:
    """Module -> prototype (d_in,) of one expert; with `scale`, multiplied by σ₁² (mttl's eigenvalue)."""
    protos = {}
    for group in tie_groups(list(factors), tie_params):
        A = factors[group[0]].A
        for m in group[1:]:
            if not torch.equal(factors[m].A, A):
                raise ValueError(f"tie_params={tie_params!r}: {m} does not share lora_A with {group[0]}")
        B = torch.cat([factors[m].B for m in group], dim=0)  # tie_op="concat"
        v, s = top_right_singular(A, B)
        for m in group:
            protos[m] = v * s**2 if scale else v
    return protos


def data_id(config: Mapping[str, Any]) -> str:
    """Where prototypes of a config live in the library: its name, or a hash of it (as mttl's save_name)."""
    cfg = {**DEFAULTS, **config}
    if cfg["name"]:
        return str(cfg["name"])
    return "arrow-" + hashlib.md5(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]


def arrow_transform(
    library: ExpertLibrary,
    config: Mapping[str, Any] | None = None,
    *,
    persist: bool = True,
    recompute: bool = False,
) -> dict[str, dict[str, torch.Tensor]]:
    """Expert -> module -> prototype for the whole library; cached in it unless `recompute`."""
    cfg = {**DEFAULTS, **(config or {})}
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise KeyError(f"unknown Arrow config keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    key = data_id(cfg)
    out = {}
    for name in tqdm(library.keys(), desc="arrow prototypes", disable=len(library) < 4):
        cached = None if recompute else library.get_auxiliary(name, key)
        if cached is not None:
            out[name] = cached[0]
            continue
        protos = arrow_prototypes(library[name].factors(), scale=cfg["scale"], tie_params=cfg["tie_params"])
        if persist:
            library.add_auxiliary(name, key, protos, cfg)
        out[name] = protos
    return out
