"""The zoo issue's baselines: the base model, each task's own expert (oracle), the multitask expert,
the uniform merge and task arithmetic (both by `projects.mats.methods`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

from torch import nn

from leaderboard.registry import (
    Candidate,
    Context,
    adapter_params,
    count,
    expert_states,
    register,
    with_adapter,
    with_state,
)


@register("base")
def base_entry(ctx: Context) -> Candidate:
    return Candidate(lambda task: ctx.base, count(ctx.base))


@register("oracle")
def oracle_entry(ctx: Context) -> Candidate:
    """Each library task answered by its own expert (task-name routing); held-out tasks have none."""

    @lru_cache(maxsize=1)
    def model_for(task: str) -> nn.Module | None:
        return with_adapter(ctx, ctx.experts[task]) if task in ctx.experts else None

    return Candidate(
        model_for,
        count(ctx.base) + sum(adapter_params(p) for p in ctx.experts.values()),
        "own expert per task",
    )


@register("multitask")
def multitask_entry(ctx: Context) -> Candidate:
    if ctx.multitask is None:
        raise ValueError("the multitask model is not in the zoo (run `make zoo`)")
    model = with_adapter(ctx, ctx.multitask)
    return Candidate(lambda task: model, count(ctx.base) + adapter_params(ctx.multitask))


def _merge_entry(method: str) -> Callable[..., Candidate]:
    def entry(ctx: Context, **hparams: Any) -> Candidate:
        from projects.mats.methods import METHODS

        base, models = expert_states(ctx)
        if method == "average" and len(models) == 2 and not hparams:
            hparams = {"model_lambda": 0.5}  # MaTS's average of two is λθ1 + (1-λ)θ2: the plain mean at 0.5
        model = with_state(ctx, METHODS[method](base, models, **hparams))
        return Candidate(lambda task: model, count(ctx.base))

    entry.__doc__ = f"The experts merged by projects.mats.methods.METHODS[{method!r}]."
    return entry


register("uniform")(_merge_entry("average"))
register("task_arithmetic", {"model_lambda": (0.1, 0.2, 0.3, 0.5)})(_merge_entry("task_arithmetic"))
