"""The merging baselines SMILE is compared with, on state dicts: simple averaging and task arithmetic.

Both share the repo's merge signature `fn(base, models, **hparams) -> StateDict` (pure, no I/O).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from common import merging

StateDict = dict[str, torch.Tensor]


def simple_average(base: StateDict, models: Sequence[StateDict]) -> StateDict:
    """θ = (1/T) Σ_i θ_i (floating tensors; others are taken from the base)."""
    return {
        key: torch.stack([m[key] for m in models]).mean(0) if value.is_floating_point() else value.clone()
        for key, value in base.items()
    }


def task_arithmetic(
    base: StateDict, models: Sequence[StateDict], *, scaling_factor: float = 0.3
) -> StateDict:
    """θ = θ0 + λ Σ_i (θ_i − θ0) (Ilharco et al. 2023; fusion_bench's default λ = 0.3; `common.merging`)."""
    return merging.task_arithmetic(base, models, scaling=scaling_factor)


MERGES: dict[str, Callable[..., StateDict]] = {
    "simple_average": simple_average,
    "task_arithmetic": task_arithmetic,
}
