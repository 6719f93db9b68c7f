"""Closed-form merges of MaTS (Tam et al. 2024, §2-3): average, task arithmetic, TIES, diagonal Fisher,
RegMean. Each is a pure function `fn(base, models, *, stats=None, **hparams) -> StateDict` over the
merged parameters only (all weights for full fine-tuning, the (IA)^3 vectors for (IA)^3).

`stats[i]` holds model i's metadata by kind: `{"fisher": {param: F}, "input_gram": {module: G}, ...}`.
A Linear weight W is (out, in); a Gram G over its inputs is (in, in). The conjugate-gradient merges
live in `conjugate_gradient.py`; `methods.METHODS` lists them all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from peft.utils.merge_utils import ties as peft_ties

StateDict = Mapping[str, torch.Tensor]
FISHER_FLOOR = 1e-8  # MaTS clamps every Fisher entry to at least this before the weighted mean
TIES_VARIANTS = ("mats", "mergekit", "peft")


class MergeError(ValueError):
    """Models that cannot be merged: mismatched names or shapes, missing metadata, non-finite weights."""


def check_models(base: StateDict, models: Sequence[StateDict]) -> None:
    """Every model has the base's parameter names and shapes, and finite values."""
    if not models:
        raise MergeError("nothing to merge: no model given")
    for i, model in enumerate(models):
        missing, extra = sorted(set(base) - set(model)), sorted(set(model) - set(base))
        if missing or extra:
            raise MergeError(
                f"model {i} does not match the base model: missing {missing[:3]}, unexpected {extra[:3]} "
                "(were the experts fine-tuned from another base or in another format?)"
            )
        for name, tensor in model.items():
            if tensor.shape != base[name].shape:
                raise MergeError(
                    f"model {i}: {name} has shape {tuple(tensor.shape)}, base has {tuple(base[name].shape)}"
                )
            if not torch.isfinite(tensor).all():
                raise MergeError(f"model {i}: {name} has NaN or inf weights")


def needed_stats(
    stats: Sequence[Mapping[str, Any]] | None, kind: str, n: int
) -> list[Mapping[str, torch.Tensor]]:
    """`stats[i][kind]` for each of the n models, with a clear error when it was not computed."""
    if stats is None or len(stats) != n:
        raise MergeError(
            f"this merge needs {kind!r} metadata for each of the {n} models (run the metadata command first)"
        )
    out = []
    for i, s in enumerate(stats):
        if kind not in s:
            raise MergeError(f"model {i} has no {kind!r} metadata (has {sorted(s)})")
        out.append(s[kind])
    return out


def average(base: StateDict, models: Sequence[StateDict], *, stats=None, model_lambda: float = 1.0) -> dict:
    """θ = (λ/M) Σ θi; for two models λθ1 + (1−λ)θ2, as MaTS's `average.py`."""
    check_models(base, models)
    if len(models) == 2:
        return {k: model_lambda * models[0][k] + (1 - model_lambda) * models[1][k] for k in base}
    return {k: model_lambda * torch.stack([m[k] for m in models]).mean(0) for k in base}


def task_arithmetic(
    base: StateDict, models: Sequence[StateDict], *, stats=None, model_lambda: float = 1.0
) -> dict:
    """θ = θ0 + λ Σ τi with τi = θi − θ0 (Ilharco et al. 2023); a sum, not a mean."""
    check_models(base, models)
    return {k: base[k] + model_lambda * sum(m[k] - base[k] for m in models) for k in base}


def _trim_global(flat: torch.Tensor, top_k: float) -> torch.Tensor:
    # flat (M, d). MaTS/TIES: keep |τ| >= the (d − ⌊k·d⌋)-th smallest |τ| of each task, i.e. ⌊k·d⌋+1
    # entries without ties, over all parameters at once.
    d = flat.shape[1]
    kth = d - int(d * top_k / 100)
    threshold = flat.abs().kthvalue(max(kth, 1), dim=1, keepdim=True).values
    return flat * (flat.abs() >= threshold)


def _ties_mats(base: StateDict, models: Sequence[StateDict], top_k: float, merge_func: str) -> dict:
    names = sorted(base)  # the TIES code flattens in sorted-key order
    flat = torch.stack([torch.cat([(m[k] - base[k]).reshape(-1) for k in names]) for m in models])
    trimmed = _trim_global(flat, top_k)
    elected = torch.sign(trimmed.sum(0))
    # Entries with no majority take the sign of the global majority.
    elected[elected == 0] = torch.sign(elected.sum())
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    kept = trimmed * agree
    merged = kept.sum(0)
    if merge_func == "mean":
        merged = merged / agree.sum(0).clamp(min=1)
    out, offset = {}, 0
    for k in names:
        n = base[k].numel()
        out[k] = merged[offset : offset + n].view_as(base[k]).to(base[k].dtype)
        offset += n
    return out


def _magnitude_keep(delta: torch.Tensor, density: float) -> torch.Tensor:
    # Per tensor: exactly int(density·numel) largest |δ| (mergekit's `magnitude`).
    k = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[torch.argsort(delta.abs().reshape(-1), descending=True)[:k]] = True
    return delta * mask.view_as(delta)


def _ties_mergekit(deltas: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    # mergekit GTA "ties": sign elected on the weighted deltas (sum consensus, >= 0 -> +1), zeros never
    # agree, and the weighted disjoint mean divides by Σ w over agreeing models.
    shape = (-1,) + (1,) * deltas[0].ndim
    weighted = torch.stack([_magnitude_keep(d, density) for d in deltas]) * weights.view(shape)
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(weighted) == elected
    divisor = (weights.view(shape) * agree).sum(0)
    divisor[divisor.abs() < 1e-8] = 1.0
    return (weighted * agree).sum(0) / divisor


def ties(
    base: StateDict,
    models: Sequence[StateDict],
    *,
    stats=None,
    model_lambda: float = 1.0,
    top_k: float = 20.0,
    variant: str = "mats",
    merge_func: str = "mean",
    weights: Sequence[float] | None = None,
) -> dict:
    """TIES (Yadav et al. 2023): trim to the top-k% |τ|, elect signs, disjoint mean; θ = θ0 + λ τm.

    `variant`: "mats" (the TIES code MaTS runs: top-k over all parameters at once, ⌊k·d⌋+1 kept, sign of
    Σ τ̂, ties -> global majority; `merge_func` "sum" is fusion_bench's default), "mergekit" (per tensor,
    exactly int(k·n) kept, sign elected on weighted deltas, weighted disjoint mean) or "peft"
    (`peft.utils.merge_utils.ties`: per tensor, sign of the unweighted sum with 0 -> +1, weights applied
    after election, mean over agreeing models). `weights` (default all 1) apply to mergekit and peft.
    """
    check_models(base, models)
    if variant not in TIES_VARIANTS:
        raise MergeError(f"unknown TIES variant {variant!r}; choose one of {TIES_VARIANTS}")
    if not 0 < top_k <= 100:
        raise MergeError(f"top_k is the percentage of entries kept, in (0, 100]; got {top_k}")
    if merge_func not in ("mean", "sum"):
        raise MergeError(f"merge_func must be 'mean' or 'sum', got {merge_func!r}")
    if variant == "mats":
        merged = _ties_mats(base, models, top_k, merge_func)
    else:
        w = torch.tensor([1.0] * len(models) if weights is None else list(weights))
        density = top_k / 100
        merged = {}
        for k in base:
            deltas = [(m[k] - base[k]).float() for m in models]
            if variant == "peft":
                merged[k] = peft_ties(deltas, w, density, majority_sign_method="total")
            else:
                merged[k] = _ties_mergekit(deltas, w, density)
    return {k: base[k] + model_lambda * merged[k].to(base[k].dtype) for k in base}


def diagonal_fisher(
    base: StateDict, models: Sequence[StateDict], *, stats=None, model_lambda: float = 1.0
) -> dict:
    """θ = Σ F̃i ⊙ θi / Σ F̃i with F̃ = max(F, 1e-8) (Matena & Raffel 2022, eq. 3); λ weights a pair only."""
    check_models(base, models)
    fishers = needed_stats(stats, "fisher", len(models))
    coef = [model_lambda, 1 - model_lambda] if len(models) == 2 else [1.0] * len(models)
    out = {}
    for k in base:
        if any(k not in f for f in fishers):
            raise MergeError(f"the diagonal Fisher has no entry for {k}")
        weighted = [c * f[k].clamp(min=FISHER_FLOOR) for c, f in zip(coef, fishers)]
        out[k] = sum(w * m[k] for w, m in zip(weighted, models)) / sum(weighted)
    return out


def shrink_off_diagonal(gram: torch.Tensor, model_lambda: float) -> torch.Tensor:
    """G̃ = λG + (1−λ) diag(G) (RegMean's α; MaTS's `scale_nonDiagonalElements`)."""
    return model_lambda * gram + (1 - model_lambda) * torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))


def masked_inverse(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse over the rows/columns that are not all zero; zero elsewhere (MaTS's `matrix_inverse`)."""
    live = (matrix != 0).any(0) | (matrix != 0).any(1)
    out = torch.zeros_like(matrix)
    idx = live.nonzero().squeeze(1)
    out[idx.unsqueeze(1), idx] = torch.linalg.inv(matrix[idx.unsqueeze(1), idx])
    return out


def linear_module(name: str) -> str | None:
    """'…q.weight' -> '…q' (the module whose input Gram a weight needs); None for other parameters."""
    return name[: -len(".weight")] if name.endswith(".weight") else None


def regmean(base: StateDict, models: Sequence[StateDict], *, stats=None, model_lambda: float = 1.0) -> dict:
    """RegMean (Jin et al. 2023, eq. 2): Wᵀ = (Σ G̃i)⁻¹ Σ G̃i Wiᵀ per Linear; other parameters averaged."""
    check_models(base, models)
    grams = needed_stats(stats, "input_gram", len(models))
    out = {}
    for k in base:
        module = linear_module(k)
        if module is None or module not in grams[0] or base[k].ndim != 2:
            out[k] = torch.stack([m[k] for m in models]).mean(0)
            continue
        shrunk = [shrink_off_diagonal(g[module].double(), model_lambda) for g in grams]
        rhs = sum(g @ m[k].double().T for g, m in zip(shrunk, models))  # (in, out)
        out[k] = (masked_inverse(sum(shrunk)) @ rhs).T.to(base[k].dtype)
    return out
