"""Linear CKA against the kernel (HSIC) formula, its invariances, and block features."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from projects.compatible_specialization.cka import block_features, linear_cka


def _hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Slow reference: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with Gram matrices and H = I − 11ᵀ/n."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = x.double() @ x.double().T, y.double() @ y.double().T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h)

    return float(hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_)))


def test_linear_cka_matches_the_hsic_formula():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 5, generator=gen), torch.randn(20, 7, generator=gen)
    y = y + x @ torch.randn(5, 7, generator=gen)
    assert linear_cka(x, y) == pytest.approx(_hsic_cka(x, y), rel=1e-9)


def test_linear_cka_invariances_and_range():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, 6, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q + 2.0) == pytest.approx(1.0)  # orthogonal map, scale, shift
    assert 0 <= linear_cka(x, torch.randn(30, 6, generator=gen)) < 0.6
    with pytest.raises(ValueError, match="same n"):
        linear_cka(x, x[:5])


def test_block_features_are_sequence_means_of_block_outputs():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_positions=8, n_embd=8, n_layer=3, n_head=2)).eval()
    ids = torch.randint(0, 30, (4, 5))
    captured = {}
    model.transformer.h[1].register_forward_hook(
        lambda m, i, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o)
    )
    feats = block_features(model, ids, layer=1)
    assert feats.shape == (4, 8)
    torch.testing.assert_close(feats, captured["h"].mean(1))
