"""Triton forward kernel for the routed low-rank mixture y_n = Σ_j c_nj · B_{e_nj} A_{e_nj} x_n (+ w_nj b_{e_nj}).

Forward only: the output has no autograd graph, so `common.routing` refuses this impl when a gradient is
needed. Two launches, over (token, slot) pairs rather than over experts, so no sort or padding is needed:
  1. `_project_kernel`: h_q = c_q · A_{e_q} x_{n(q)}, one r-vector per pair q = n·k + j, in float32;
  2. `_expand_kernel`:  y_n = Σ_j B_{e_nj} h_{nk+j} (+ w_nj b_{e_nj}), tiled over tokens × d_out.
The rank r is small, so both contractions are broadcast-multiply-sums over gathered expert rows instead
of `tl.dot` (which needs tiles of 16+ on each side). Block sizes are untuned: this file has only been
run under TRITON_INTERPRET=1 on CPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Elements in one gathered 3-D tile (tokens × rank × d): keeps a program's working set register-sized.
_TILE_BUDGET = 8192
_BLOCK_TOKENS = 16
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _project_kernel(
    x_ptr, a_ptr, idx_ptr, coef_ptr, h_ptr, n_pairs, d_in, rank, k, stride_x,
    BLOCK_Q: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (BQ,) pair ids n·k + j
    ranks = tl.arange(0, RANK_PAD)  # (RP,)
    q_ok = q < n_pairs
    r_ok = ranks < rank
    expert = tl.load(idx_ptr + q, mask=q_ok, other=0)  # (BQ,) int64
    token = (q // k).to(tl.int64)
    h = tl.zeros((BLOCK_Q, RANK_PAD), dtype=tl.float32)
    for d0 in range(0, d_in, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)  # (BD,)
        d_ok = d < d_in
        x = tl.load(
            x_ptr + token[:, None] * stride_x + d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)  # (BQ, BD)
        # A[e_q, r, d] for every pair: (BQ, RP, BD); padded ranks load as 0, so h stays 0 there.
        a = tl.load(
            a_ptr + expert[:, None, None] * (rank * d_in) + ranks[None, :, None] * d_in + d[None, None, :],
            mask=q_ok[:, None, None] & r_ok[None, :, None] & d_ok[None, None, :],
            other=0.0,
        ).to(tl.float32)
        h += tl.sum(a * x[:, None, :], axis=2)
    coef = tl.load(coef_ptr + q, mask=q_ok, other=0.0)  # (BQ,) w · scaling[e]
    tl.store(h_ptr + q[:, None] * RANK_PAD + ranks[None, :], h * coef[:, None], mask=q_ok[:, None])


@triton.jit
def _expand_kernel(
    h_ptr, b_ptr, idx_ptr, w_ptr, bias_ptr, y_ptr, n_tokens, d_out, rank, k, stride_y,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, RANK_PAD: tl.constexpr,
):  # fmt: skip
    n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BN,) tokens
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)  # (BO,) output features
    ranks = tl.arange(0, RANK_PAD)  # (RP,)
    n_ok = n < n_tokens
    o_ok = o < d_out
    r_ok = ranks < rank
    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    for j in range(k):
        q = n * k + j
        expert = tl.load(idx_ptr + q, mask=n_ok, other=0)  # (BN,)
        h = tl.load(h_ptr + q[:, None] * RANK_PAD + ranks[None, :], mask=n_ok[:, None], other=0.0)
        # B[e_q, o, r]: (BN, BO, RP)
        b = tl.load(
            b_ptr + expert[:, None, None] * (d_out * rank) + o[None, :, None] * rank + ranks[None, None, :],
            mask=n_ok[:, None, None] & o_ok[None, :, None] & r_ok[None, None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(b * h[:, None, :], axis=2)
        if HAS_BIAS:
            w = tl.load(w_ptr + q, mask=n_ok, other=0.0)  # (BN,) the routing weight, unscaled
            bias = tl.load(
                bias_ptr + expert[:, None] * d_out + o[None, :], mask=n_ok[:, None] & o_ok[None, :], other=0.0
            ).to(tl.float32)
            acc += w[:, None] * bias
    out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + n[:, None] * stride_y + o[None, :], out, mask=n_ok[:, None] & o_ok[None, :])


def _block(rank_pad: int) -> int:
    """Width of the free dimension of a (tokens, rank_pad, width) tile within `_TILE_BUDGET`."""
    return max(16, min(128, triton.next_power_of_2(max(1, _TILE_BUDGET // (_BLOCK_TOKENS * rank_pad)))))


def routed_lowrank_triton(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    scaling: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Forward-only kernel on validated, flattened inputs: x (N, d_in), weights/indices (N, k) -> (N, d_out)."""
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, A, B, weights, scaling, bias)
    ):
        raise RuntimeError(
            "impl='triton' is forward-only (no backward kernel); use impl='vectorized' when gradients "
            "are needed, or call it under torch.no_grad()"
        )
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"impl='triton' needs CUDA tensors (got device {x.device}); on CPU it only runs in the Triton "
            "interpreter, with TRITON_INTERPRET=1 set before triton is first imported"
        )
    if x.dtype not in _DTYPES:
        raise ValueError(f"impl='triton' supports {_DTYPES} (float32 accumulation), got {x.dtype}")
    n_tokens, d_in = x.shape
    rank, d_out, k = A.shape[1], B.shape[1], indices.shape[1]
    rank_pad = triton.next_power_of_2(rank)
    x = x.contiguous()
    A, B, indices = A.contiguous(), B.contiguous(), indices.contiguous()
    weights = weights.float().contiguous()
    coef = (weights * scaling.float()[indices]).contiguous()  # (N, k): routing weight × expert scaling
    h = torch.empty(n_tokens * k, rank_pad, device=x.device, dtype=torch.float32)
    y = torch.empty(n_tokens, d_out, device=x.device, dtype=x.dtype)
    _project_kernel[(triton.cdiv(n_tokens * k, _BLOCK_TOKENS),)](
        x, A, indices, coef, h, n_tokens * k, d_in, rank, k, x.stride(0),
        BLOCK_Q=_BLOCK_TOKENS, RANK_PAD=rank_pad, BLOCK_D=_block(rank_pad),
    )  # fmt: skip
    block_o = _block(rank_pad)
    _expand_kernel[(triton.cdiv(n_tokens, _BLOCK_TOKENS), triton.cdiv(d_out, block_o))](
        h, B, indices, weights, bias.contiguous() if bias is not None else y, y, n_tokens, d_out, rank, k,
        y.stride(0), HAS_BIAS=bias is not None, BLOCK_N=_BLOCK_TOKENS, BLOCK_O=block_o, RANK_PAD=rank_pad,
    )  # fmt: skip
    return y
