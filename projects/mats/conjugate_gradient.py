"""MaTS (Tam et al. 2024, §3, eq. 6-11): merge by solving (Σi Fi) θ = Σi Fi θi with conjugate gradient.

The choice of Fi is the task subspace: identity (average), diagonal Fisher, input Gram (RegMean), blockwise
Fisher per (IA)^3 vector, or K-FAC G ⊗ H for Linear weights. Each parameter block is one system; Linear
weights are solved transposed, X = Wᵀ (in, out), as in the original. Blocks without a system are averaged.

The original calls `scipy.sparse.linalg.cg` per block on the CPU in float32; we write CG in torch (a dozen
lines) so that it runs on the tensors' device, on matrix-shaped unknowns, with scipy's stopping rule
(‖r‖ ≤ rtol·‖b‖, rtol 1e-5), in float32 by default (`dtype="float64"` is the option: the systems are
ill-conditioned, so the two differ after 10 or 100 iterations). A singular but consistent system (a
direction no model's data excites) keeps the initialisation there, as CG never moves x0 along the null space.

`lm_head` under the RegMean and K-FAC objectives follows the original (`lm_head="original"`): it is left
out of the solve, so RegMean keeps the pretrained head and K-FAC averages it; `lm_head="solve"` solves it
with its input Gram (RegMean's system, as it has no output Gram).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from projects.mats.merging import (
    MergeError,
    StateDict,
    average,
    check_models,
    linear_module,
    needed_stats,
    shrink_off_diagonal,
)

OBJECTIVES = ("average", "diagonal_fisher", "regmean", "blockwise_fisher", "kfac")
INITIALIZATIONS = ("average", "pretrained", "zeros")
LM_HEAD = ("original", "solve")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
SCIPY_RTOL = 1e-5


def cg_solve(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor,
    *,
    num_iterations: int,
    rtol: float = SCIPY_RTOL,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Solve A x = b for symmetric PSD A (Hestenes & Stiefel 1952); x may be any shape, <u, v> = Σ u⊙v.

    Returns x and {"iterations", "converged", "initial_residual", "final_residual"} (residual = ‖b − Ax‖).
    """
    # In place, with dot products as vdot over the flat views and python-float step sizes: no temporary of
    # the unknown's size per iteration but the matvec's (as fast as scipy's cg on CPU, benchmarks/mats_cg.py).
    x = x0.clone()
    r = b - matvec(x)
    p = r.clone()
    rs = torch.vdot(r.reshape(-1), r.reshape(-1)).item()
    initial = rs**0.5
    tol = rtol * b.norm().item()
    it = 0
    while it < num_iterations and rs**0.5 > tol:
        ap = matvec(p)
        curvature = torch.vdot(p.reshape(-1), ap.reshape(-1)).item()
        if curvature <= 0:  # p in the null space (singular A): no descent direction left
            break
        alpha = rs / curvature
        x.add_(p, alpha=alpha)
        r.sub_(ap, alpha=alpha)
        rs_new = torch.vdot(r.reshape(-1), r.reshape(-1)).item()
        torch.add(r, p, alpha=rs_new / rs, out=p)  # p = r + β p in one pass (mul_ then add_ took two)
        rs = rs_new
        it += 1
    final = (b - matvec(x)).norm().item()
    return x, {
        "iterations": it,
        "converged": final <= tol,
        "initial_residual": initial,
        "final_residual": final,
    }


def _system(
    objective: str,
    name: str,
    models: Sequence[StateDict],
    stats: list[Mapping[str, Any]] | None,
    model_lambda: float,
    dtype: torch.dtype,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, bool] | None:
    """(matvec, b, transposed) of parameter `name`'s system, or None when the objective has none for it."""
    thetas = [m[name].to(dtype) for m in models]
    if objective == "average":
        return (lambda x: x), torch.stack(thetas).mean(0), False
    if objective == "diagonal_fisher":
        fishers = [s["fisher"][name].to(dtype) for s in stats]  # no 1e-8 floor here, as the original
        total = sum(fishers)
        return (lambda x: total * x), sum(f * t for f, t in zip(fishers, thetas)), False
    if objective == "blockwise_fisher":
        if name not in stats[0]["blockwise_fisher"]:
            return None
        blocks = [shrink_off_diagonal(s["blockwise_fisher"][name].to(dtype), model_lambda) for s in stats]
        total = sum(blocks)
        shape = thetas[0].shape
        b = sum(f @ t.reshape(-1) for f, t in zip(blocks, thetas)).reshape(shape)
        return (lambda x: (total @ x.reshape(-1)).reshape(shape)), b, False
    module = linear_module(name)
    if module is None or module not in stats[0]["input_gram"] or thetas[0].ndim != 2:
        return None
    grams = [shrink_off_diagonal(s["input_gram"][module].to(dtype), model_lambda) for s in stats]
    if objective == "regmean" or module not in stats[0].get("output_gram", {}):
        # K-FAC without an output Gram (lm_head has no backward hook in the original) falls back to RegMean.
        total = sum(grams)
        return (lambda x: total @ x), sum(g @ t.T for g, t in zip(grams, thetas)), True
    outs = [shrink_off_diagonal(s["output_gram"][module].to(dtype), model_lambda) for s in stats]
    # (Σ Hi ⊗ Gi) vec X = Σ (Hi ⊗ Gi) vec Wiᵀ, i.e. Σ Gi X Hi = Σ Gi Wiᵀ Hi (eq. 11).
    return (
        (lambda x: sum(g @ x @ h for g, h in zip(grams, outs))),
        sum(g @ t.T @ h for g, h, t in zip(grams, outs, thetas)),
        True,
    )


def _initial(
    initialization: str | StateDict, base: StateDict, models: Sequence[StateDict]
) -> StateDict | None:
    if not isinstance(initialization, str):
        missing = sorted(set(base) - set(initialization))
        if missing:
            raise MergeError(f"the initialisation model has no {missing[:3]}")
        return initialization
    if initialization == "average":
        return average(base, models)
    if initialization == "pretrained":
        return base
    if initialization == "zeros":
        return None
    raise MergeError(f"unknown initialization {initialization!r}; choose {INITIALIZATIONS} or a merged model")


def conjugate_gradient(
    base: StateDict,
    models: Sequence[StateDict],
    *,
    stats: Sequence[Mapping[str, Any]] | None = None,
    objective: str = "regmean",
    model_lambda: float = 1.0,
    num_iterations: int = 100,
    initialization: str | StateDict = "zeros",
    rtol: float = SCIPY_RTOL,
    dtype: str = "float32",
    lm_head: str = "original",
    device: str | torch.device | None = None,
    log: list[dict[str, Any]] | None = None,
) -> dict:
    """MaTS: per block, x = CG(Σ Fi, Σ Fi θi, x0) for `num_iterations`; `log` gets each block's residuals.

    `model_lambda` shrinks the off-diagonals of G, H and blockwise F (1 keeps them); `initialization` is
    "average", "pretrained", "zeros" (the original's default with no flag) or a merged state dict.
    `rtol` is the stopping rule ‖r‖ <= rtol·‖b‖ (scipy's default 1e-5); `dtype` the CG precision
    ("float32", the original's, or "float64"); `lm_head` "original" (RegMean: pretrained head, K-FAC:
    averaged) or "solve" (RegMean-CG with its input Gram).
    """
    check_models(base, models)
    if objective not in OBJECTIVES:
        raise MergeError(f"unknown CG objective {objective!r}; choose one of {OBJECTIVES}")
    if dtype not in DTYPES:
        raise MergeError(f"unknown CG dtype {dtype!r}; choose one of {tuple(DTYPES)}")
    if lm_head not in LM_HEAD:
        raise MergeError(f"unknown lm_head handling {lm_head!r}; choose one of {LM_HEAD}")
    precision = DTYPES[dtype]
    kind = {"diagonal_fisher": "fisher", "blockwise_fisher": "blockwise_fisher"}.get(objective, "input_gram")
    if objective == "kfac":
        needed_stats(stats, "output_gram", len(models))
    needed = None if objective == "average" else needed_stats(stats, kind, len(models))
    stats = None if needed is None else list(stats)
    init = _initial(initialization, base, models)
    device = torch.device(device) if device is not None else base[next(iter(base))].device
    on = [{k: v.to(device) for k, v in m.items()} for m in models]
    on_stats = None if stats is None else [_to(s, device) for s in stats]
    out = {}
    for name in tqdm(base, desc=f"conjugate gradient ({objective})", leave=False):
        if lm_head == "original" and objective in ("regmean", "kfac") and _is_lm_head(name):
            # The original drops lm_head from the solved set. RegMean: it has a Gram, so it is in neither the
            # solved nor the averaged set, and the non-strict load keeps the pretrained head. K-FAC: it is
            # skipped (no output Gram) and so averaged with the other unsolved parameters.
            has_gram = linear_module(name) in on_stats[0]["input_gram"]
            out[name] = (
                base[name].clone()
                if objective == "regmean" and has_gram
                else torch.stack([m[name] for m in models]).mean(0)
            )
            continue
        system = _system(objective, name, on, on_stats, model_lambda, precision)
        if system is None:
            out[name] = torch.stack([m[name] for m in models]).mean(0)
            continue
        matvec, b, transposed = system
        x0 = torch.zeros_like(b) if init is None else init[name].to(device).to(precision)
        if transposed and init is not None:
            x0 = x0.T
        x, record = cg_solve(matvec, b, x0, num_iterations=num_iterations, rtol=rtol)
        if log is not None:
            log.append({"block": name, **record})
        out[name] = (x.T if transposed else x).to(base[name].dtype).to(base[name].device)
    return out


def _is_lm_head(name: str) -> bool:
    module = linear_module(name)
    return module is not None and (module == "lm_head" or module.endswith(".lm_head"))


def _to(tree: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: _to(v, device) if isinstance(v, Mapping) else v.to(device) for k, v in tree.items()}
