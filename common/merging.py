"""Merges of state dicts that several projects share, pure and free of I/O: the checks every merge needs
and task arithmetic. A project wraps them under its own method names and hyperparameter names (MaTS's
`model_lambda`, SMILE's `scaling_factor`); the algorithms that only one paper uses stay in its project.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from common.cli import UserError

StateDict = Mapping[str, torch.Tensor]
# A 512 kB float32 output chunk stays in L2 while the M models stream past (benchmarks/task_arithmetic.py).
TA_CHUNK = 1 << 17
_FAST_DTYPES = (torch.float32, torch.float64)


class MergeError(UserError):
    """Models that cannot be merged: mismatched names or shapes, missing metadata, non-finite weights."""


def check_models(base: StateDict, models: Sequence[StateDict], *, finite: bool = True) -> None:
    """Every model has the base's parameter names and shapes, and (with `finite`) finite values; the fast
    merges check finiteness chunk by chunk instead of in a separate pass over every model."""
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
            if finite and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise MergeError(f"model {i}: {name} has NaN or inf weights")


def task_arithmetic(base: StateDict, models: Sequence[StateDict], *, scaling: float = 1.0) -> dict:
    """θ = θ0 + λ Σ_i (θ_i − θ0) (Ilharco et al. 2023, eq. 1 summed over tasks); a sum, not a mean.

    Float32/64 tensors: computed as θ = λ Σ θi + (1 − Mλ) θ0, chunk by chunk in the output buffer (each
    model read once by one in-place add, the chunk in cache; no temporaries). Σ θi before subtracting Mθ0
    rounds at the scale of |θ| rather than |τ|: the result is within ~M ulp(max |θ|) of
    `task_arithmetic_reference` (tested), not bit-identical. Other float dtypes take the reference;
    integer tensors (position ids, step counters) are the base's."""
    check_models(base, models, finite=False)
    out = {}
    for k, b in base.items():
        tensors = [m[k] for m in models]
        if not b.is_floating_point():
            out[k] = b.clone()
        elif b.dtype in _FAST_DTYPES and all(t.dtype == b.dtype for t in tensors):
            out[k] = _chunked(b, tensors, scaling, lambda: check_models(base, models))
        else:
            out[k] = b + scaling * sum(t - b for t in tensors)
            if not bool(torch.isfinite(out[k]).all()):
                check_models(base, models)  # names the non-finite model
    return out


def _chunked(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], scaling: float, on_non_finite: Callable[[], None]
) -> torch.Tensor:
    b = base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors]
    res = torch.empty_like(b)
    for s in range(0, b.numel(), TA_CHUNK):
        e = min(s + TA_CHUNK, b.numel())
        acc = res[s:e]
        if len(flats) == 1:
            acc.copy_(flats[0][s:e])
        else:
            torch.add(flats[0][s:e], flats[1][s:e], out=acc)
        for m in flats[2:]:
            acc.add_(m[s:e])
        if not bool(torch.isfinite(acc.sum())):  # NaN/inf propagate into the sum (an overflow: rechecked)
            on_non_finite()
        acc.mul_(scaling).add_(b[s:e], alpha=1 - len(flats) * scaling)
    return res.view_as(base)


def task_arithmetic_reference(base: StateDict, models: Sequence[StateDict], *, scaling: float = 1.0) -> dict:
    """θ0 + λ Σ_i (θ_i − θ0) term by term, as written: what `task_arithmetic` is tested and timed against."""
    check_models(base, models)
    return {
        k: b + scaling * sum(m[k] - b for m in models) if b.is_floating_point() else b.clone()
        for k, b in base.items()
    }
