"""The batched Gram-based Arrow prototype against the QR and dense-SVD references (issue 9, row 4)."""

import pytest
import torch

from common.adapters import LoraFactors
from projects.mbc_arrow.arrow import (
    arrow_prototypes,
    top_right_singular,
    top_right_singular_dense,
    top_right_singular_qr,
)


def _lora(E, r, d_in, d_out, seed, spectrum=None):
    """Random factors; with `spectrum` (r,), ΔW = B A has exactly those singular values."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(E, r, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    B = torch.randn(E, d_out, r, generator=g, dtype=torch.float64)
    if spectrum is not None:
        qa = torch.linalg.qr(torch.randn(E, d_in, r, generator=g, dtype=torch.float64))[0]
        qb = torch.linalg.qr(torch.randn(E, d_out, r, generator=g, dtype=torch.float64))[0]
        mix = torch.randn(E, r, r, generator=g, dtype=torch.float64)  # any invertible split of the core
        A = torch.linalg.solve(mix, spectrum[..., None] * qa.mT)
        B = qb @ mix
    return A.float(), B.float()


def _cos(u, v):
    return (u.double() * v.double()).sum(-1).abs() / (u.double().norm(dim=-1) * v.double().norm(dim=-1))


@pytest.mark.parametrize("shape", [(8, 4, 64, 48), (3, 8, 32, 96), (5, 1, 20, 20), (2, 16, 16, 40)])
def test_gram_prototype_matches_dense_svd_up_to_sign(shape):
    A, B = _lora(*shape, seed=sum(shape))
    v, s = top_right_singular(A, B)
    vd, sd = top_right_singular_dense(A, B)
    vq, sq = top_right_singular_qr(A, B)
    assert v.shape == vd.shape == (shape[0], shape[2]) and v.dtype == A.dtype
    assert torch.allclose(_cos(v, vd), torch.ones(shape[0], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(_cos(vq, vd), torch.ones(shape[0], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(s, sd, rtol=1e-5) and torch.allclose(sq, sd, rtol=1e-5)
    assert torch.allclose(v.norm(dim=-1), torch.ones(shape[0]), atol=1e-6)


@pytest.mark.parametrize("gap", [1e-1, 1e-3, 1e-6, 0.0])
def test_near_flat_spectra_capture_the_dense_svds_energy(gap):
    """σ₁ − σ₂ = gap·σ₁: v₁ is ill-defined as the gap closes, but ‖ΔW v‖ must still reach σ₁."""
    spectrum = torch.tensor([1.0, 1.0 - gap, 1.0 - 2 * gap - 1e-2, 0.5], dtype=torch.float64)
    A, B = _lora(6, 4, 256, 128, seed=7, spectrum=spectrum.expand(6, 4).clone())
    dw = B.double() @ A.double()
    v, s = top_right_singular(A, B)
    vd, sd = top_right_singular_dense(A, B)
    energy = (dw @ v.double()[..., None]).squeeze(-1).norm(dim=-1)
    energy_dense = (dw @ vd.double()[..., None]).squeeze(-1).norm(dim=-1)
    assert torch.all(energy >= energy_dense * (1 - 1e-6))
    assert torch.allclose(s.double(), sd.double(), rtol=1e-5)
    if gap >= 1e-3:  # separated: the same vector up to sign (error ~ eps / gap)
        assert torch.all(_cos(v, vd) > 1 - 1e-6)


def test_rank_deficient_ill_conditioned_and_zero_factors():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(4, 3, 50, generator=g)
    A[0, 2] = A[0, 0] + A[0, 1]  # rank 2
    A[1, 2] *= 1e-7  # a direction of A far below the others
    B = torch.randn(4, 30, 3, generator=g)
    B[2] = 0  # ΔW = 0: σ₁ = 0
    A[3] = 0  # ΔW = 0 and no row space: v = 0
    v, s = top_right_singular(A, B)
    vd, sd = top_right_singular_dense(A, B)
    assert torch.all(_cos(v[:2], vd[:2]) > 1 - 1e-6) and torch.allclose(s[:2], sd[:2], rtol=1e-5)
    assert s[2] == 0 and torch.isclose(v[2].norm(), torch.tensor(1.0))
    assert s[3] == 0 and torch.all(v[3] == 0)


def test_arrow_prototypes_batch_layers_of_one_shape_like_one_at_a_time():
    A, B = _lora(6, 4, 24, 16, seed=11)
    A2, B2 = _lora(2, 4, 16, 40, seed=12)
    factors = {f"l{i}.q": LoraFactors(A[i], B[i], 2.0) for i in range(6)}
    factors |= {f"l{i}.up": LoraFactors(A2[i], B2[i], 2.0) for i in range(2)}
    protos = arrow_prototypes(factors, scale=True)
    for name, f in factors.items():
        v, s = top_right_singular_dense(f.A, f.B)
        assert _cos(protos[name], v) > 1 - 1e-6
        assert torch.isclose(protos[name].norm(), s**2, rtol=1e-5)
    assert len({p.untyped_storage().data_ptr() for p in protos.values()}) == len(protos)


@pytest.mark.parametrize("weak", [1e-3, 1e-5])
def test_ill_conditioned_a_on_the_cholesky_path(weak):
    g = torch.Generator().manual_seed(5)
    A = torch.randn(3, 4, 64, generator=g)
    A[:, 1] = A[:, 0] + weak * A[:, 1]  # two rows of A nearly parallel: κ(A) ~ 1/weak
    B = torch.randn(3, 32, 4, generator=g)
    assert not torch.linalg.cholesky_ex(A.double() @ A.double().mT)[1].any()
    v, s = top_right_singular(A, B)
    vd, sd = top_right_singular_dense(A, B)
    assert torch.all(_cos(v, vd) > 1 - 1e-6) and torch.allclose(s, sd, rtol=1e-5)
