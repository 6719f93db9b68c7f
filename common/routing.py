"""Top-k routing over a library of low-rank experts, and the routed mixture it selects.

Each token n is sent to k of E experts with weights w_nj and expert ids e_nj (Arrow, PHATGOOSE, SMILE);
expert e is a LoRA-style update s_e · B_e A_e with A_e (r, d_in), B_e (d_out, r) (a SMILE expert, the
rank-k SVD u_e svh_e, maps to B = u, A = svh). The mixture, without the base layer W0 x, is

    y_n = Σ_j w_nj · (s_{e_nj} B_{e_nj} A_{e_nj} x_n + b_{e_nj}),

with an optional per-expert bias b (SMILE's b_i - b_0). Implementations are listed in `IMPLS`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from common.registry import lookup

# `vectorized` picks `grouped` over `dense` when E·r > k·(r + _GATHER_COST). _GATHER_COST is the
# per-pair cost of grouped's row gather of x and scatter-add into y, in units of one rank-1 factor pair
# (a d_in dot product plus a d_out axpy), fitted on one CPU thread at N=1024, d_in=d_out=1024 over
# E in 4..256, r in 4..64, k in 1..4; where the rule picks the slower path there it loses at most ~20%.
# `benchmarks/routed_mixture.py --experts E --rank r --k k` times both on any shape.
_GATHER_COST = 64


def top_k_route(
    logits: torch.Tensor, k: int, renormalize: bool, softmax_first: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights and expert indices, each (..., k), from router logits (..., E), heaviest first.

    softmax_first=True: p = softmax(logits) over all E, keep the top k of p, and with `renormalize`
    divide them by their sum (SMILE, PHATGOOSE; compatible_specialization keeps them as they are).
    softmax_first=False: keep the top k logits and softmax over those only (Arrow); this equals the
    renormalised softmax-first weights. Ties go to the lowest expert index (a stable sort), on any device.
    """
    n_experts = logits.shape[-1]
    if not 1 <= k <= n_experts:
        raise ValueError(f"k must be in [1, {n_experts}] for logits of shape {tuple(logits.shape)}, got {k}")
    if not softmax_first and not renormalize:
        raise ValueError(
            "softmax_first=False takes a softmax over the k kept logits, whose weights always sum to 1; "
            "pass renormalize=True (or softmax_first=True for un-renormalised top-k probabilities)"
        )
    # Half-precision logits are routed in float32: near-tied experts would otherwise swap on rounding.
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softmax_first:
        scores = scores.softmax(dim=-1)
    # torch.topk leaves the order of tied values unspecified (and it differs between CPU and CUDA).
    top, indices = scores.sort(dim=-1, descending=True, stable=True)
    top, indices = top[..., :k], indices[..., :k]
    if not softmax_first:
        weights = top.softmax(dim=-1)
    elif renormalize:
        weights = top / top.sum(dim=-1, keepdim=True)
    else:
        weights = top
    return weights.to(logits.dtype), indices


def experts_b_rows(B: torch.Tensor) -> torch.Tensor:
    """B (E, d_out, r), same values, stored as (E, r, d_out) rows: `_dense` then reads all experts' B as one
    (E·r, d_out) matrix as a view instead of copying it on every call (for a stack built once, e.g. a
    layer's buffer; `.to` and `load_state_dict` keep the layout)."""
    return B.transpose(1, 2).contiguous().transpose(1, 2)


def _reference(x, A, B, weights, indices, scaling, bias):
    """A masked loop over experts: each expert is applied to every token and weighted (0 if not routed)."""
    y = x.new_zeros(x.shape[0], B.shape[1])
    for e in range(A.shape[0]):
        w_e = (weights * (indices == e)).sum(dim=-1)  # (N,) summed weight of expert e per token
        y = y + (w_e * scaling[e])[:, None] * ((x @ A[e].T) @ B[e].T)
        if bias is not None:
            y = y + w_e[:, None] * bias[e]
    return y


def _dense(x, A, B, weights, indices, scaling, bias):
    """All experts' rank-r projections at once, weighted by a (N, E) routing matrix zero off the top k.

    Two thin matmuls, x (N, d_in) @ (d_in, E·r) and (N, E·r) @ (E·r, d_out), cost N·E·r·(d_in + d_out)
    multiply-adds (6% of a square d=1024 Linear's at E=8, r=4; ~0.1x its time on one CPU thread) with no
    gather of x or of the chosen experts' factors: gathering B per token, (N, k, d_out, r), is ~30x
    slower there, and `_grouped`'s gather and scatter of x and y rows ~3x slower.
    """
    n_tokens = x.shape[0]
    n_experts, rank, d_in = A.shape
    d_out = B.shape[1]
    # (N, E) routing matrix; scatter_add so an expert picked twice for one token counts twice.
    route = x.new_zeros(n_tokens, n_experts).scatter_add(1, indices, weights * scaling[indices])
    h = x @ A.reshape(n_experts * rank, d_in).T  # (N, E·r)
    h = (h.view(n_tokens, n_experts, rank) * route[:, :, None]).view(n_tokens, n_experts * rank)
    y = h @ B.transpose(1, 2).reshape(n_experts * rank, d_out)  # (E, d_out, r) -> (E·r, d_out)
    if bias is not None:
        y = y + x.new_zeros(n_tokens, n_experts).scatter_add(1, indices, weights) @ bias
    return y


def _grouped(x, A, B, weights, indices, scaling, bias):
    """The N·k (token, slot) pairs sorted by expert; each expert multiplies only the tokens routed to it.

    Costs N·k·r·(d_in + d_out) multiply-adds plus a gather of x and a scatter-add into y per pair, and a
    Python step per expert: cheaper than `_dense` once E·r outgrows k·(r + _GATHER_COST) (large libraries,
    SMILE's higher ranks).
    """
    n_tokens, k = indices.shape
    flat = indices.reshape(-1)  # (N·k,) expert of each pair n·k + j
    order = flat.argsort(stable=True)
    token = order // k  # (N·k,) token of each pair, pairs grouped by expert
    coef = (weights * scaling[indices]).reshape(-1)[order]
    counts = torch.bincount(flat, minlength=A.shape[0]).tolist()
    parts = []
    for e, (x_e, c_e, w_e) in enumerate(
        zip(x[token].split(counts), coef.split(counts), weights.reshape(-1)[order].split(counts))
    ):
        if counts[e] == 0:
            continue
        part = ((x_e @ A[e].T) * c_e[:, None]) @ B[e].T  # (c, d_out)
        parts.append(part if bias is None else part + w_e[:, None] * bias[e])
    return x.new_zeros(n_tokens, B.shape[1]).index_add(0, token, torch.cat(parts))


def _vectorized(x, A, B, weights, indices, scaling, bias):
    """`_dense` or `_grouped`, whichever the cost model above says is cheaper for these shapes."""
    n_experts, rank, _ = A.shape
    k = indices.shape[1]
    impl = _grouped if n_experts * rank > k * (rank + _GATHER_COST) else _dense
    return impl(x, A, B, weights, indices, scaling, bias)


def _triton(x, A, B, weights, indices, scaling, bias):
    """The fused Triton forward kernel (`common.routing_triton`); no autograd."""
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("impl='triton' needs the triton package: pip install 'moerging[triton]'")
    from common.routing_triton import routed_lowrank_triton  # imported late: TRITON_INTERPRET is read then

    return routed_lowrank_triton(x, A, B, weights, indices, scaling, bias)


# Each takes validated, flattened inputs: x (N, d_in), weights and indices (N, k), scaling (E,), bias
# (E, d_out) or None; returns (N, d_out).
IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": _reference,
    "vectorized": _vectorized,
    "dense": _dense,
    "grouped": _grouped,
    "triton": _triton,
}


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check(x, A, B, weights, indices, scaling, bias) -> None:
    """Raise a ValueError naming the offending shapes, dtypes or indices."""
    if A.dim() != 3 or B.dim() != 3:
        raise ValueError(f"A must be (E, r, d_in) and B (E, d_out, r); got A {_shape(A)}, B {_shape(B)}")
    n_experts, rank, d_in = A.shape
    if B.shape[0] != n_experts or B.shape[2] != rank:
        raise ValueError(f"B {_shape(B)} does not match A {_shape(A)}: expected ({n_experts}, d_out, {rank})")
    if x.dim() == 0 or x.shape[-1] != d_in:
        raise ValueError(f"x {_shape(x)} must end in d_in={d_in} to match A {_shape(A)}")
    if weights.shape != indices.shape or weights.dim() == 0:
        raise ValueError(
            f"weights {_shape(weights)} and indices {_shape(indices)} must have the same shape (..., k)"
        )
    if weights.shape[:-1] != x.shape[:-1] or weights.shape[-1] == 0:
        raise ValueError(
            f"weights/indices {_shape(weights)} must be (..., k) with k >= 1 and the leading dims of "
            f"x {_shape(x)}; expand per-sequence routing to every token first"
        )
    if not x.is_floating_point() or A.dtype != x.dtype or B.dtype != x.dtype:
        raise ValueError(f"x, A and B must share one floating dtype; got {x.dtype}, {A.dtype}, {B.dtype}")
    if not weights.is_floating_point():
        raise ValueError(f"weights must be floating point, got {weights.dtype}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    if indices.numel() and (indices.min() < 0 or indices.max() >= n_experts):
        raise ValueError(
            f"indices must be in [0, {n_experts}) for E={n_experts} experts; "
            f"got values in [{indices.min().item()}, {indices.max().item()}]"
        )
    if isinstance(scaling, torch.Tensor) and scaling.numel() != 1 and _shape(scaling) != (n_experts,):
        raise ValueError(f"scaling must be a float or an (E,) = ({n_experts},) tensor, got {_shape(scaling)}")
    if bias is not None and _shape(bias) != (n_experts, B.shape[1]):
        raise ValueError(f"bias must be (E, d_out) = ({n_experts}, {B.shape[1]}), got {_shape(bias)}")
    devices = {t.device for t in (x, A, B, weights, indices)}
    if len(devices) > 1:
        raise ValueError(
            f"x, A, B, weights and indices must be on one device, got {sorted(map(str, devices))}"
        )


def routed_lowrank(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    *,
    scaling: float | torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """y = Σ_j w_j (s_{e_j} B_{e_j} A_{e_j} x + b_{e_j}): x (..., d_in), A (E, r, d_in), B (E, d_out, r),
    weights/indices (..., k) -> y (..., d_out), in x's dtype (weights, scaling and bias are cast to it).

    impl="auto" runs the Triton kernel on CUDA tensors when triton is installed and no gradient is
    needed, and "vectorized" otherwise.
    """
    _check(x, A, B, weights, indices, scaling, bias)
    if impl == "auto":
        needs_grad = torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in (x, A, B, weights, scaling, bias)
        )
        use_triton = x.is_cuda and not needs_grad and importlib.util.find_spec("triton") is not None
        impl = "triton" if use_triton else "vectorized"
    fn = lookup(IMPLS, impl, "routed_lowrank impl")
    lead, k, (n_experts, _, d_in), d_out = x.shape[:-1], indices.shape[-1], A.shape, B.shape[1]
    if lead.numel() == 0:
        return x.new_zeros(*lead, d_out)
    if not isinstance(scaling, torch.Tensor):
        scaling = torch.tensor(1.0 if scaling is None else scaling)
    scaling = scaling.to(device=x.device, dtype=x.dtype).reshape(-1)  # (1,) or (E,), expanded below
    y = fn(
        x.reshape(-1, d_in),
        A,
        B,
        weights.to(x.dtype).reshape(-1, k),
        indices.reshape(-1, k).long(),
        scaling.expand(n_experts),
        None if bias is None else bias.to(x.dtype),
    )
    return y.reshape(*lead, d_out)
