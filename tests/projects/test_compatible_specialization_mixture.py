"""Activation interpolation, MoE routing and multi-layer expert sets against the spec and by hand."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from projects.compatible_specialization.checkpoints import specialist_mlps
from projects.compatible_specialization.mixture import (
    RoutedMLP,
    interpolated_model,
    multi_layer_expert_layers,
    routed_model,
    router_parameters,
    set_alpha,
)


def _gpt2(seed: int, n_layer: int = 4) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=50,
        n_positions=16,
        n_embd=8,
        n_layer=n_layer,
        n_head=2,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
    )
    return GPT2LMHeadModel(config).eval()


def _specialist(base: GPT2LMHeadModel, seed: int) -> GPT2LMHeadModel:
    """`base` with perturbed MLPs only, as MLP-only fine-tuning leaves it."""
    model = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


@pytest.fixture
def trio():
    base = _gpt2(0)
    return base, _specialist(base, 1), _specialist(base, 2)


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))


def test_interpolation_endpoints_equal_the_models_exactly(trio):
    base, code, math = trio
    model = interpolated_model(base, specialist_mlps(code), specialist_mlps(math))
    set_alpha(model, 1.0)
    assert torch.equal(model(IDS).logits, code(IDS).logits)
    set_alpha(model, 0.0)
    assert torch.equal(model(IDS).logits, math(IDS).logits)


def test_interpolation_mixes_mlp_outputs_not_weights(trio):
    base, code, math = trio
    model = interpolated_model(base, specialist_mlps(code), specialist_mlps(math))
    set_alpha(model, 0.3)
    x = torch.randn(3, 8)
    want = 0.3 * code.transformer.h[1].mlp(x) + 0.7 * math.transformer.h[1].mlp(x)
    torch.testing.assert_close(model.transformer.h[1].mlp(x), want)
    with pytest.raises(ValueError, match="alpha must be in"):
        set_alpha(model, 1.5)


def test_router_forced_to_one_expert_equals_that_model(trio):
    base, code, math = trio
    # Renormalised top-1: the kept weight is p/p = 1 exactly, whatever the router.
    model = routed_model(base, [specialist_mlps(code), specialist_mlps(math)], top_k=1, renormalize=True)
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.router.weight.zero_()
            block.mlp.router.weight[1] = 1.0  # logit of expert 1 (math) is sum(x) ...
            block.mlp.router.weight[0] = -1.0  # ... and expert 0's is −sum(x): math wins where sum(x) > 0
    x = torch.ones(1, 1, 8)
    assert torch.equal(model.transformer.h[0].mlp(x), math.transformer.h[0].mlp(x))
    # Unnormalised (the original): a saturated softmax puts weight exactly 1 on the chosen expert.
    model = routed_model(base, [specialist_mlps(code), specialist_mlps(math)], top_k=2)
    for block in model.transformer.h:
        block.mlp.router = _Constant(torch.tensor([1e4, 0.0]))
    assert torch.equal(model(IDS).logits, code(IDS).logits)


class _Constant(torch.nn.Module):
    """A router returning the same logits (E,) for every token."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*x.shape[:-1], -1)


def test_topk_weights_are_softmax_values_not_renormalised():
    experts = [torch.nn.Linear(4, 4) for _ in range(3)]
    mlp = RoutedMLP(experts, 4, top_k=2)
    x = torch.randn(5, 4)
    p = torch.softmax(mlp.router(x), -1)
    weights, indices = mlp.routing(x)
    torch.testing.assert_close(weights, p.topk(2).values)
    assert (weights.sum(-1) < 1).all()
    want = sum(
        (weights[:, j : j + 1] * torch.stack([experts[int(e)](x[n]) for n, e in enumerate(indices[:, j])]))
        for j in range(2)
    )
    torch.testing.assert_close(mlp(x), want)
    mlp.renormalize = True
    torch.testing.assert_close(mlp.routing(x)[0].sum(-1), torch.ones(5))


def test_routed_dense_k_equals_e_is_softmax_mixture():
    experts = [torch.nn.Linear(4, 4) for _ in range(2)]
    mlp = RoutedMLP(experts, 4, top_k=2)
    x = torch.randn(2, 3, 4)
    p = torch.softmax(mlp.router(x), -1)
    torch.testing.assert_close(mlp(x), p[..., :1] * experts[0](x) + p[..., 1:] * experts[1](x))
    with pytest.raises(ValueError, match=r"top_k must be in 1\.\.2"):
        RoutedMLP(experts, 4, top_k=3)


@pytest.mark.parametrize(
    ("L", "want"),
    [
        (1, [[0], [1], [2], [3]]),
        (2, [[0, 1], [1, 2], [2, 3], [3, 2]]),
        (3, [[0, 1, 2], [1, 2, 3], [2, 3, 1], [3, 2, 1]]),
        (4, [[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 1, 0], [3, 2, 1, 0]]),
    ],
)
def test_multi_layer_expert_sets_match_the_spec(L, want):
    assert [multi_layer_expert_layers(i, L, 4) for i in range(4)] == want


def test_multi_layer_expert_sets_properties_and_errors():
    for depth in range(1, 8):
        for L in range(1, depth + 1):
            for i in range(depth):
                layers = multi_layer_expert_layers(i, L, depth)
                assert layers[0] == i and len(set(layers)) == L and all(0 <= x < depth for x in layers)
    with pytest.raises(ValueError, match=r"num_multi_layer_experts must be in 1\.\.4"):
        multi_layer_expert_layers(0, 5, 4)


def test_multi_layer_expert_ids_are_model_plus_offset_times_n(trio):
    base, code, math = trio
    mlps = [specialist_mlps(code), specialist_mlps(math)]
    model = routed_model(base, mlps, top_k=6, num_multi_layer_experts=3)
    experts = model.transformer.h[2].mlp.experts  # layer 2, L=3: layers [2, 3, 1]
    for c, layer in enumerate([2, 3, 1]):
        for j in range(2):
            assert experts[j + 2 * c] is mlps[j][layer]


def test_only_router_parameters_get_gradients(trio):
    base, code, math = trio
    model = routed_model(
        base, [specialist_mlps(code), specialist_mlps(math)], top_k=4, num_multi_layer_experts=2
    )
    trained = router_parameters(model)
    assert len(trained) == 4
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trained)
    model(IDS, labels=IDS).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trained), name
    assert all(p.grad.abs().sum() > 0 for p in trained.values())
    assert all(p.grad is None for p in code.parameters())
