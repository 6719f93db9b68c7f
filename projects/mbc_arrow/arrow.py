"""Arrow prototypes (Ostapenko et al. 2024, §4.2; mttl `ArrowTransform`, ab_only, scale=False).

For each adapted linear with ΔW = s·B A (A (r, d_in), B (d_out, r)), the prototype is the top right
singular vector of ΔW: a unit vector in the layer's input space, of arbitrary sign, unchanged by s.
It is computed exactly from the factors without forming ΔW, from the r×r Grams of A and B (`top_right_singular`, a Cholesky and an r×r eigh),
batched over every layer of an expert that has the same shapes; `top_right_singular_qr` (QR of Aᵀ and B,
then an r×r SVD) and `top_right_singular_dense` (SVD of ΔW) are the references the tests compare against.
A group of linears with tied A (q/k/v, tie_params) gets one prototype from A and the B's concatenated.
`tie_params="default"` (mttl's ArrowTransformConfig default) ties what each expert was trained with (its
ExpertInfo's training config); a pattern overrides it for every expert; None ties nothing.
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

DEFAULTS = {"name": None, "scale": False, "tie_params": "default"}
FROM_TRAINING = "default"


def expert_tie_params(tie_params: str | None, trained_with: str | None) -> str | None:
    """The tie pattern Arrow uses for one expert: `trained_with` under "default" (mttl), else `tie_params`."""
    return trained_with if tie_params == FROM_TRAINING else tie_params


def top_right_singular(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v₁ (..., d_in), σ₁ (...)) of ΔW = B A from A (..., r, d_in), B (..., d_out, r), batched, exactly.

    With A Aᵀ = L Lᵀ (Cholesky), Aᵀ = K Lᵀ with K = Aᵀ L⁻ᵀ (d_in, r) orthonormal, so ΔW = (B L) Kᵀ and
    v₁ = K z for z the top eigenvector of the r×r matrix Lᵀ (Bᵀ B) L. Only r×r factorisations and O(r²·d)
    products, in float64: the Grams square the conditioning of A and B, which costs accuracy only in
    directions far below the top one. A rank-deficient A (no Cholesky) takes `_top_right_singular_eigh`.
    """
    a = A.double()
    bt = B.mT.to(torch.float64, memory_format=torch.contiguous_format)  # both Grams along contiguous rows
    gb = bt @ bt.mT
    lower, info = torch.linalg.cholesky_ex(a @ a.mT)
    if bool(info.any()):
        return _top_right_singular_eigh(a, gb, A.dtype)
    s2, z = torch.linalg.eigh(lower.mT @ gb @ lower)  # ascending
    y = torch.linalg.solve_triangular(lower.mT, z[..., -1:], upper=True)  # (..., r, 1): v = Aᵀ y = K z
    v = (y.mT @ a).squeeze(-2)
    return v.to(A.dtype), s2[..., -1].clamp(min=0).sqrt().to(A.dtype)


def _top_right_singular_eigh(a: torch.Tensor, gb: torch.Tensor, dtype: torch.dtype):
    # A Aᵀ = W Λ Wᵀ, A = W Λ^½ K with K = Λ^-½ Wᵀ A orthonormal over the kept directions (λ above eps·λ_max;
    # the others carry < 1e-8 of ΔW); CᵀC = Λ^½ Wᵀ (Bᵀ B) W Λ^½. A zero A gives v = 0.
    lam, w = torch.linalg.eigh(a @ a.mT)
    root = lam.clamp(min=0).sqrt()
    keep = lam > lam[..., -1:] * (lam.shape[-1] * torch.finfo(lam.dtype).eps)
    wr = w * root[..., None, :]
    s2, z = torch.linalg.eigh(wr.mT @ gb @ wr)
    y = (w * torch.where(keep, 1 / root, 0)[..., None, :]) @ z[..., -1:]
    v = (y.mT @ a).squeeze(-2)
    v = v / v.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(v.dtype).tiny)
    return v.to(dtype), s2[..., -1].clamp(min=0).sqrt().to(dtype)


def top_right_singular_qr(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: Aᵀ = Q_a R_a, B = Q_b R_b (thin QR), ΔW = Q_b (R_b R_aᵀ) Q_aᵀ and an r×r SVD of the core."""
    qa, ra = torch.linalg.qr(A.double().mT)  # (..., d_in, r), (..., r, r)
    rb = torch.linalg.qr(B.double(), mode="r")[1]  # (..., r, r)
    _, s, vh = torch.linalg.svd(rb @ ra.mT)
    return (qa @ vh[..., 0, :, None]).squeeze(-1).to(A.dtype), s[..., 0].to(A.dtype)


def top_right_singular_dense(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the dense SVD of ΔW = B A (d_out × d_in), in float64."""
    _, s, vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
    return vh[..., 0, :].to(A.dtype), s[..., 0].to(A.dtype)


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
    batches: dict[tuple, list[tuple[list[str], torch.Tensor, torch.Tensor]]] = {}
    for group in tie_groups(list(factors), tie_params):
        A = factors[group[0]].A
        for m in group[1:]:
            if not torch.equal(factors[m].A, A):
                raise ValueError(f"tie_params={tie_params!r}: {m} does not share lora_A with {group[0]}")
        B = torch.cat([factors[m].B for m in group], dim=0)  # tie_op="concat"
        batches.setdefault((A.shape, B.shape, A.dtype, B.dtype, A.device), []).append((group, A, B))
    protos = {}
    for items in batches.values():  # one batched solve per distinct layer shape
        vs, ss = top_right_singular(
            torch.stack([a for _, a, _ in items]), torch.stack([b for _, _, b in items])
        )
        for (group, _, _), v, s in zip(items, vs, ss):
            for m in group:  # each its own storage, not a view of the batch nor of a tied sibling
                protos[m] = v * s**2 if scale else v.clone()  # (safetensors refuses shared memory)
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
    for name in tqdm(
        library.require_experts("Arrow prototypes"), desc="arrow prototypes", disable=len(library) < 4
    ):
        cached = None if recompute else library.get_auxiliary(name, key)
        if cached is not None:
            out[name] = cached[0]
            continue
        expert = library[name]
        tie = expert_tie_params(cfg["tie_params"], expert.info.training_config.get("tie_params"))
        protos = arrow_prototypes(expert.factors(), scale=cfg["scale"], tie_params=tie)
        if persist:
            library.add_auxiliary(name, key, protos, cfg)
        out[name] = protos
    return out
