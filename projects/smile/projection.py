"""Singular projection merging (the paper's Space I / II / II+III experiment, §3.2).

For each Linear, W0 = U S Vᵀ (the pretrained weight). The fine-tuned delta is kept only inside one
subspace of W0's singular vectors, W = W0 + Û (Ûᵀ ΔW V̂) V̂ᵀ:
- Space I (`rank="low"`): Û = U[:, :k], V̂ = V[:, :k], the top-k directions;
- Space II (`rank="high"`, `full_matrices=False`): U[:, k:r], V[:, k:r], the rest of the spectrum;
- Space II+III (`rank="high"`, `full_matrices=True`): U[:, k:m], V[:, k:n], incl. W0's null spaces.
k < 0 picks k = #{cumsum(s) < ½ Σ s} + 1. Biases and every non-Linear parameter stay fine-tuned.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

RANKS = ("low", "high")


def energy_rank(s: torch.Tensor) -> int:
    """The number of singular values holding half of their sum: #{cumsum(s) < 0.5 Σs} + 1."""
    return int((s.cumsum(0) < 0.5 * s.sum()).sum().item()) + 1


@torch.no_grad()
def project_delta(
    w0: torch.Tensor, w: torch.Tensor, k: int, rank: str = "low", full_matrices: bool = False
) -> torch.Tensor:
    """W0 + Û(Ûᵀ ΔW V̂)V̂ᵀ for one (out × in) weight."""
    if rank not in RANKS:
        raise ValueError(f"rank must be one of {RANKS}, got {rank!r}")
    u, s, vh = torch.linalg.svd(w0.float(), full_matrices=full_matrices)
    v = vh.T
    if k < 0:
        k = energy_rank(s)
    if rank == "low":
        u_hat, v_hat = u[:, :k], v[:, :k]
    else:  # thin SVD: columns k..r; full: k..m and k..n
        u_hat, v_hat = u[:, k:], v[:, k:]
    delta = (w - w0).float()
    projected = u_hat @ (u_hat.T @ delta @ v_hat) @ v_hat.T
    return (w0.float() + projected).to(w0.dtype)


@torch.no_grad()
def singular_projection_merge(
    pretrained: nn.Module,
    finetuned: nn.Module,
    *,
    k: int = 128,
    rank: str = "low",
    full_matrices: bool = False,
) -> nn.Module:
    """A copy of `finetuned` whose Linear weights keep only the delta inside the chosen subspace of W0."""
    model = copy.deepcopy(finetuned)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            w0 = pretrained.get_submodule(name).weight
            module.weight.copy_(project_delta(w0, module.weight, k, rank, full_matrices))
    return model
