"""SMILE fast paths (issue 9, rows 2-3): `top_svd` against the full SVD, upscaling with it against the
full-SVD reference, and the top-1 inference forward against `forward_reference`."""

import pytest
import torch
from torch import nn

from projects.smile.upscale import TOP_SVD_RTOL, SmileMoELinear, smile_linear, top_svd


def _matrix(m, d, spectrum, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(spectrum), generator=g))[0]
    v = torch.linalg.qr(torch.randn(d, len(spectrum), generator=g))[0]
    return (u * spectrum) @ v.T


def _check_triplets(w, u, s, vh, rtol=TOP_SVD_RTOL):
    """Backward error of every triplet within rtol·σ₁; σ and the rank-n truncation match the full SVD."""
    n = s.shape[0]
    U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    u, s, vh = u.double(), s.double(), vh.double()
    assert torch.all((w.double() @ vh.T - u * s).norm(dim=0) <= 2 * rtol * S[0])
    assert torch.all((w.double().T @ u - vh.T * s).norm(dim=0) <= 2 * rtol * S[0])
    assert torch.allclose(s, S[:n], atol=2 * rtol * S[0].item())
    assert torch.allclose(u.T @ u, torch.eye(n, dtype=u.dtype), atol=1e-5)
    assert torch.allclose(vh @ vh.T, torch.eye(n, dtype=u.dtype), atol=1e-5)
    return U, S, Vh


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_top_svd_matches_the_full_svd_on_power_law_spectra(alpha):
    m, d, n = 320, 280, 24
    w = _matrix(m, d, torch.arange(1, 281, dtype=torch.float32) ** -alpha)
    u, s, vh = top_svd(w, n)
    U, S, Vh = _check_triplets(w, u, s, vh)
    trunc = (u.double() * s.double()) @ vh.double()
    exact = (U[:, :n] * S[:n]) @ Vh[:n]
    assert (trunc - exact).norm(2) <= 10 * TOP_SVD_RTOL * S[0] * n**0.5 / (S[n - 1] - S[n]) * S[n - 1]


def test_top_svd_on_flat_rank_deficient_and_zero_matrices():
    g = torch.Generator().manual_seed(1)
    flat = torch.randn(300, 260, generator=g)  # Marchenko–Pastur: too flat to converge, falls back
    _check_triplets(flat, *top_svd(flat, 20, max_iter=5))
    low = _matrix(300, 260, torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1]))  # rank 5 < n
    u, s, vh = top_svd(low, 16)
    _check_triplets(low, u, s, vh)
    assert torch.all(s[5:] <= 1e-5)
    u, s, vh = top_svd(torch.zeros(280, 300), 8)
    assert u.shape == (280, 8) and vh.shape == (8, 300) and torch.all(s == 0)


def _layers(d_in=288, d_out=256, experts=6, seed=0, bias=True):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias)
    decay = torch.arange(1, min(d_in, d_out) + 1, dtype=torch.float32) ** -1.0
    fts = []
    for i in range(experts):
        ft = nn.Linear(d_in, d_out, bias=bias)
        with torch.no_grad():
            ft.weight.copy_(base.weight + 0.1 * _matrix(d_out, d_in, decay, seed=seed + i + 1))
            if bias:
                ft.bias.copy_(base.bias + 0.01 * torch.randn(d_out))
        fts.append(ft)
    return base, fts


@pytest.mark.parametrize("top_k", [1, 2])
def test_upscaling_with_top_svd_routes_and_outputs_as_the_full_svd(top_k):
    base, fts = _layers()
    fast = smile_linear(base, fts, gate_k=16, k=32, top_k=top_k)
    exact = smile_linear(base, fts, gate_k=16, k=32, top_k=top_k, exact_svd=True)
    x = torch.randn(512, 288)
    with torch.no_grad():
        logits_f, logits_e = fast.gate(x), exact.gate(x)
        # logits are sign-invariant norms: equal up to the SVD tolerance
        assert torch.allclose(logits_f, logits_e, atol=20 * TOP_SVD_RTOL * logits_e.abs().max().item())
        i_f, ie = fast.route(x)[1], exact.route(x)[1]
        top = logits_e.sort(dim=-1, descending=True).values
        clear = (top[:, top_k - 1] - top[:, top_k]) > 1e-3 * top[:, 0]  # no near-tie at the cut
        assert clear.float().mean() > 0.9
        assert torch.equal(i_f[clear], ie[clear])
        yf, ye = fast(x), exact(x)
        assert torch.allclose(yf[clear], ye[clear], atol=1e-3 * ye.abs().max().item())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top1_inference_forward_equals_the_reference(bias, dtype):
    torch.manual_seed(0)
    layer = SmileMoELinear(nn.Linear(40, 24, bias=bias), num_experts=5, gate_k=3, k=4, top_k=1).to(dtype)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("pretrained"):
                p.normal_()
        layer.gate.weight[9:12] = layer.gate.weight[3:6]  # experts 1 and 3 tie on every token -> 1
        layer.gate.weight[12:15] = 0  # expert 4 never chosen: an empty segment
    x = torch.randn(3, 50, 40, dtype=dtype)
    with torch.no_grad():
        ref = layer.forward_reference(x.reshape(-1, 40)).reshape(3, 50, 24)
        fast = layer(x)
        assert fast.dtype == dtype and fast.shape == (3, 50, 24)
        assert torch.allclose(fast, ref, atol=1e-5 if dtype == torch.float32 else 1e-12)
        assert layer(x[:0]).shape == (0, 50, 24)
    with torch.inference_mode():
        assert torch.allclose(layer(x), ref, atol=1e-5 if dtype == torch.float32 else 1e-12)
    # with autograd the differentiable reference runs
    out = layer(x)
    out.sum().backward()
    assert layer.expert_u.grad is not None and torch.allclose(out.detach(), ref, atol=1e-5)
