"""Closed-form merges of MaTS (Tam et al. 2024, §2-3): average, task arithmetic, TIES, diagonal Fisher,
RegMean. Each is a pure function `fn(base, models, *, stats=None, **hparams) -> StateDict` over the
merged parameters only (all weights for full fine-tuning, the (IA)^3 vectors for (IA)^3).

`stats[i]` holds model i's metadata by kind: `{"fisher": {param: F}, "input_gram": {module: G}, ...}`.
A Linear weight W is (out, in); a Gram G over its inputs is (in, in). The conjugate-gradient merges
live in `conjugate_gradient.py`; `methods.METHODS` lists them all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from peft.utils.merge_utils import ties as peft_ties

from common import merging
from common.merging import MergeError, StateDict, check_models

FISHER_FLOOR = 1e-8  # MaTS clamps every Fisher entry to at least this before the weighted mean
TIES_VARIANTS = ("mats", "mergekit", "peft")


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
    """θ = θ0 + λ Σ τi with τi = θi − θ0 (Ilharco et al. 2023); a sum, not a mean (`common.merging`)."""
    return merging.task_arithmetic(base, models, scaling=model_lambda)


def _trim_global_reference(flat: torch.Tensor, top_k: float) -> torch.Tensor:
    # flat (M, d). MaTS/TIES: keep |τ| >= the (d − ⌊k·d⌋)-th smallest |τ| of each task, i.e. ⌊k·d⌋+1
    # entries without ties, over all parameters at once.
    d = flat.shape[1]
    kth = d - int(d * top_k / 100)
    threshold = flat.abs().kthvalue(max(kth, 1), dim=1, keepdim=True).values
    return flat * (flat.abs() >= threshold)


def _ties_mats_reference(base: StateDict, models: Sequence[StateDict], top_k: float, merge_func: str) -> dict:
    names = sorted(base)  # the TIES code flattens in sorted-key order
    flat = torch.stack([torch.cat([(m[k] - base[k]).reshape(-1) for k in names]) for m in models])
    trimmed = _trim_global_reference(flat, top_k)
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
    # Per tensor: exactly int(density·numel) largest |δ| (mergekit's `magnitude`; its sort is not stable).
    k = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[torch.argsort(delta.abs().reshape(-1), descending=True, stable=True)[:k]] = (
        True  # ties: first by index
    )
    return delta * mask.view_as(delta)


def _ties_mergekit_reference(
    deltas: list[torch.Tensor], weights: torch.Tensor, density: float
) -> torch.Tensor:
    # mergekit GTA "ties": sign elected on the weighted deltas (sum consensus, >= 0 -> +1), zeros never
    # agree, and the weighted disjoint mean divides by Σ w over agreeing models.
    shape = (-1,) + (1,) * deltas[0].ndim
    weighted = torch.stack([_magnitude_keep(d, density) for d in deltas]) * weights.view(shape)
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(weighted) == elected
    divisor = (weights.view(shape) * agree).sum(0)
    divisor[divisor.abs() < 1e-8] = 1.0
    return (weighted * agree).sum(0) / divisor


# --- Fast paths (issue 9, rows 5-6): chunked, exact, no (M, D) stack -------------------------------------
# Each tensor is processed in chunks of _CHUNK entries, so that the M deltas of a chunk stay in cache and
# every model is read from memory a fixed number of times (task arithmetic once; exact TIES thresholds
# twice more). Thresholds are exact: a two-level radix select on the bits of |δ| (non-negative float32
# bits order as integers), so the kept sets, ties at the threshold included, equal the sort-based
# references `_ties_*_reference`, which the tests compare against.
_CHUNK = 1 << 18


def _delta_chunk(m: torch.Tensor, b: torch.Tensor, s: int) -> torch.Tensor:
    return m[s : s + _CHUNK] - b[s : s + _CHUNK]  # float32 (the fast TIES paths take float32 models only)


def _abs_bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32) & 0x7FFFFFFF


def _select_bin(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th largest entry (k ≥ 1) of a histogram over ascending bins, and the count above it."""
    desc = counts.flip(0).cumsum(0)  # desc[j] = entries in bins >= len-1-j
    j = int(torch.searchsorted(desc, torch.tensor([k], dtype=desc.dtype)))
    b = counts.numel() - 1 - j
    return b, int(desc[j] - counts[b])


def _kth_largest_abs(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[float, int, int]:
    """(t, #|δ| > t, #|δ| == t) for t the exact k-th largest |δ| over δ = m − b of all (m, b) pairs (flat)."""
    counts = torch.zeros(1 << 15, dtype=torch.int64)
    for m, b in pairs:
        for s in range(0, m.numel(), _CHUNK):
            counts += torch.bincount(_abs_bits(_delta_chunk(m, b, s)) >> 16, minlength=1 << 15)
    hi, above = _select_bin(counts, k)
    # Second level: the low 16 bits inside bucket `hi`; entries below/above it land in the end bins
    # (a clamp, not a boolean index: no nonzero() pass).
    counts = torch.zeros((1 << 16) + 2, dtype=torch.int64)
    for m, b in pairs:
        for s in range(0, m.numel(), _CHUNK):
            low = (_abs_bits(_delta_chunk(m, b, s)) - (hi << 16)).clamp_(-1, 1 << 16).add_(1)
            counts += torch.bincount(low, minlength=(1 << 16) + 2)
    counts = counts[1:-1]
    lo, above_lo = _select_bin(counts, k - above)
    value = torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32).item()
    return value, above + above_lo, int(counts[lo])


def _sampled_threshold(pairs, fraction: float, samples: int, gen: torch.Generator) -> float:
    """Approximate threshold: the (1 − fraction) quantile of |δ| over random blocks of 64 entries."""
    sizes = torch.tensor([m.numel() for m, _ in pairs], dtype=torch.float64)
    parts = []
    for (m, b), n in zip(pairs, sizes.tolist()):
        blocks = max(1, round(min(samples, sizes.sum().item()) * n / sizes.sum().item() / 64))
        starts = torch.randint(0, max(1, int(n) - 64), (blocks,), generator=gen).sort().values
        idx = (starts[:, None] + torch.arange(min(64, int(n)))).reshape(-1)
        parts.append((m[idx] - b[idx]).float().abs())
    sample = torch.cat(parts)
    kth = min(max(1, round((1 - fraction) * sample.numel())), sample.numel())
    return sample.kthvalue(kth).values.item()


class _Keep:
    """The kept entries of one task vector: |δ| > t, plus |δ| == t — all of them, or (exact top-k) the
    first `ties` in flat index order, which is what a stable descending sort keeps."""

    def __init__(self, t: float, ties: int | None = None, none: bool = False):
        self.t, self.ties, self.none = t, ties, none

    def apply_(self, d: torch.Tensor) -> torch.Tensor:
        """Zero the dropped entries of d (one chunk of the task vector, in flat order) in place."""
        if self.none:
            return d.zero_()
        if self.t <= 0:  # keep everything (dropping zeros changes nothing)
            return d
        tied = None
        if self.ties is not None:
            tied = d.abs() == self.t
            n_tied = int(tied.sum())
        # |d| >= t  <=>  |d| > the float32 just below t: one vectorised op (masked_fill_ is ~15x slower)
        below = torch.nextafter(torch.tensor(self.t), torch.tensor(0.0)).item()
        torch.ops.aten.hardshrink.out(d, below, out=d)
        if tied is not None:
            if n_tied > self.ties:  # keep only the first `ties` of this chunk's ties
                d[tied.nonzero().squeeze(1)[self.ties :]] = 0.0
            self.ties = max(self.ties - n_tied, 0)
        return d


def _keep_top_k(pairs, k: int, threshold: str, gen: torch.Generator, samples: int) -> _Keep:
    """Keep exactly k entries (ties broken by index), or with threshold="sample" those >= a sampled t."""
    total = sum(m.numel() for m, _ in pairs)
    if k <= 0:
        return _Keep(0.0, none=True)
    if threshold == "sample":
        return _Keep(_sampled_threshold(pairs, k / total, samples, gen))
    t, greater, equal = _kth_largest_abs(pairs, k)
    return _Keep(t, ties=None if greater + equal == k else k - greater)  # None: every tie fits


def _ties_chunked(
    base: StateDict,
    models: Sequence[StateDict],
    names: Sequence[str],
    keeps: Callable[[str], list[_Keep]],
    merge_chunk: Callable[[torch.Tensor], torch.Tensor],
) -> dict:
    """out[k] = merge_chunk(trimmed τ (M, C)) over the chunks of every tensor (keeps made per tensor), in
    one reused buffer; the finiteness check of `check_models` runs on each chunk while it is in cache."""
    out = {}
    buf = torch.empty(len(models), _CHUNK, dtype=torch.float32)
    for k in names:
        flats = [m[k].reshape(-1) for m in models]
        b = base[k].reshape(-1)
        keep = keeps(k)
        merged = torch.empty(b.numel(), dtype=torch.float32)
        for s in range(0, b.numel(), _CHUNK):
            e = min(s + _CHUNK, b.numel())
            deltas = buf[:, : e - s]
            for i, m in enumerate(flats):
                torch.sub(m[s:e], b[s:e], out=deltas[i])
            if not bool(torch.isfinite(deltas.sum())):  # NaN/inf propagate into the sum (overflow: rechecked)
                check_models(base, models)  # names the model; a non-finite base is let through, as there
            for kp, d in zip(keep, deltas):
                kp.apply_(d)
            merged[s:e] = merge_chunk(deltas)
        out[k] = merged.view_as(base[k])
    return out


# The merges below avoid boolean masks (masked_fill_/where/!= are ~5-15x slower than arithmetic on CPU):
# with e = ±1 the elected sign, an entry agrees iff e·τ > 0, so q = max(e·τ, 0) holds |τ| where it agrees and
# 0 elsewhere; Σ τ·[agree] = e·Σ q exactly (a sum of same-sign terms is sign-symmetric) and [agree] = sign(q).


def _mergekit_chunk(weights: torch.Tensor):
    w = weights.view(-1, 1)

    def merge(trimmed: torch.Tensor) -> torch.Tensor:  # = `_ties_mergekit_reference`
        weighted = trimmed.mul_(w)
        elected = (weighted.sum(0) >= 0).float().mul_(2).sub_(1)  # sum >= 0 -> +1, else -1
        q = weighted.mul_(elected).clamp_(min=0)
        numerator = q.sum(0).mul_(elected)
        divisor = q.sign_().mul_(w).sum(0)
        divisor[divisor.abs() < 1e-8] = 1.0
        return numerator.div_(divisor)

    return merge


def _peft_chunk(weights: torch.Tensor):
    w = weights.view(-1, 1)

    def merge(pruned: torch.Tensor) -> torch.Tensor:  # = peft.utils.merge_utils.ties
        majority = (pruned.sum(0) >= 0).float().mul_(2).sub_(1)
        q = pruned.mul_(majority).clamp_(min=0)
        count = q.sign().sum(0).clamp_(min=1)
        return q.mul_(w).sum(0).mul_(majority).div_(count)

    return merge


def _ties_fast(
    base: StateDict,
    models: Sequence[StateDict],
    top_k: float,
    variant: str,
    merge_func: str,
    weights: torch.Tensor,
    threshold: str,
    samples: int,
    seed: int,
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    density = top_k / 100
    if variant != "mats":
        merge = _mergekit_chunk(weights) if variant == "mergekit" else _peft_chunk(weights)

        def keeps(k: str) -> list[_Keep]:
            if density >= 1 and variant == "peft":  # peft does not prune at density 1
                return [_Keep(0.0) for _ in models]
            b = base[k].reshape(-1)
            return [
                _keep_top_k([(m[k].reshape(-1), b)], int(density * b.numel()), threshold, gen, samples)
                for m in models
            ]

        return _ties_chunked(base, models, list(base), keeps, merge)

    # MaTS: one threshold per task over all parameters; keep |τ| >= the (d − ⌊k·d⌋)-th smallest.
    names = sorted(base)
    d = sum(base[k].numel() for k in names)
    kth = max(d - int(d * top_k / 100), 1)
    global_keeps = []
    for m in models:
        pairs = [(m[k].reshape(-1), base[k].reshape(-1)) for k in names]
        t = (
            _sampled_threshold(pairs, (d - kth + 1) / d, samples, gen)
            if threshold == "sample"
            else _kth_largest_abs(pairs, d - kth + 1)[0]
        )
        global_keeps.append(_Keep(t))
    keeps = lambda k: global_keeps  # noqa: E731

    # Entries with no majority take the sign of the global majority: one pass for its sign first.
    total = 0

    def elect(trimmed: torch.Tensor) -> torch.Tensor:
        nonlocal total
        signs = torch.sign(trimmed.sum(0))
        total += int(signs.sum())
        return signs

    _ties_chunked(base, models, names, keeps, elect)
    majority = float(torch.sign(torch.tensor(total)))

    def merge(trimmed: torch.Tensor) -> torch.Tensor:  # as `_ties_mats_reference`
        elected = torch.sign(trimmed.sum(0))
        elected[elected == 0] = majority
        q = trimmed.mul_(elected).clamp_(min=0)
        merged = q.sum(0).mul_(elected)
        return merged.div_(q.sign_().sum(0).clamp_(min=1)) if merge_func == "mean" else merged

    return _ties_chunked(base, models, names, keeps, merge)


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
    threshold: str = "exact",
    sample_size: int = 1 << 16,
    seed: int = 0,
) -> dict:
    """TIES (Yadav et al. 2023): trim to the top-k% |τ|, elect signs, disjoint mean; θ = θ0 + λ τm.

    `variant`: "mats" (the TIES code MaTS runs: top-k over all parameters at once, ⌊k·d⌋+1 kept, sign of
    Σ τ̂, ties -> global majority; `merge_func` "sum" is fusion_bench's default), "mergekit" (per tensor,
    exactly int(k·n) kept, sign elected on weighted deltas, weighted disjoint mean) or "peft"
    (`peft.utils.merge_utils.ties`: per tensor, sign of the unweighted sum with 0 -> +1, weights applied
    after election, mean over agreeing models). `weights` (default all 1) apply to mergekit and peft.

    Float32 models take the chunked fast path with exact thresholds (`threshold="exact"`, equal to the
    sort-based references; ties at the threshold go to the lowest flat index, as a stable sort), or with
    `threshold="sample"` a threshold from `sample_size` sampled |τ| (the kept fraction is then within
    ~5·sqrt(p(1−p)/sample_size) of p = top_k/100: ±0.008 at p = 0.2 with the default 2^16 samples).
    """
    if threshold not in ("exact", "sample"):
        raise MergeError(f"threshold must be 'exact' or 'sample', got {threshold!r}")
    fast = all(t.dtype == torch.float32 for m in (base, *models) for t in m.values())
    check_models(base, models, finite=not fast)
    if variant not in TIES_VARIANTS:
        raise MergeError(f"unknown TIES variant {variant!r}; choose one of {TIES_VARIANTS}")
    if not 0 < top_k <= 100:
        raise MergeError(f"top_k is the percentage of entries kept, in (0, 100]; got {top_k}")
    if merge_func not in ("mean", "sum"):
        raise MergeError(f"merge_func must be 'mean' or 'sum', got {merge_func!r}")
    w = torch.tensor([1.0] * len(models) if weights is None else list(weights))
    if fast:
        merged = _ties_fast(base, models, top_k, variant, merge_func, w, threshold, sample_size, seed)
    elif threshold == "sample":
        raise MergeError("threshold='sample' needs float32 models")
    else:
        merged = _ties_reference(base, models, top_k, variant, merge_func, w)
    return {k: base[k] + model_lambda * merged[k].to(base[k].dtype) for k in base}


def _ties_reference(
    base: StateDict, models: Sequence[StateDict], top_k: float, variant: str, merge_func: str, w: torch.Tensor
) -> dict:
    """The merged task vector τm of each variant, by sorting (the slow reference of `_ties_fast`)."""
    if variant == "mats":
        return _ties_mats_reference(base, models, top_k, merge_func)
    density = top_k / 100
    merged = {}
    for k in base:
        deltas = [(m[k] - base[k]).float() for m in models]
        if variant == "peft":
            merged[k] = peft_ties(deltas, w, density, majority_sign_method="total")
        else:
            merged[k] = _ties_mergekit_reference(deltas, w, density)
    return merged


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
