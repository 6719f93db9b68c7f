"""Arrow prototypes, selectors and the two mixing modes against dense references."""

import pytest
import torch
from torch import nn

from common.adapters import LoraFactors
from projects.mbc_arrow.arrow import arrow_prototypes, tie_groups, top_right_singular
from projects.mbc_arrow.expert_model import LibraryLinear
from projects.mbc_arrow.selectors import route, selector_config


def _factors(d_in=12, d_out=10, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)


def _same_up_to_sign(u, v, atol=1e-5):
    return torch.allclose(u, v, atol=atol) or torch.allclose(u, -v, atol=atol)


def test_prototype_is_top_right_singular_vector_of_dense_delta():
    A, B = _factors()
    v, s = top_right_singular(A, B)
    _, S, Vh = torch.linalg.svd((B @ A).double())
    assert _same_up_to_sign(v.double(), Vh[0], atol=1e-6)
    assert torch.isclose(s.double(), S[0], rtol=1e-6)
    # and the top eigenvector of ΔWᵀΔW
    _evals, evecs = torch.linalg.eigh((B @ A).double().T @ (B @ A).double())
    assert _same_up_to_sign(v.double(), evecs[:, -1], atol=1e-6)


def test_prototype_invariant_to_sign_flips_and_scale():
    A, B = _factors(seed=1)
    base = arrow_prototypes({"m": LoraFactors(A, B, 1.0)})["m"]
    for A2, B2, s in ((-A, B, 1.0), (A, -B, 1.0), (-A, -B, 1.0), (A, B, 16.0 / 4)):
        assert _same_up_to_sign(arrow_prototypes({"m": LoraFactors(A2, B2, s)})["m"], base)
    # |x·proto| routing does not see the sign
    x = torch.randn(5, A.shape[1])
    cfg = selector_config({"name": "arrow", "top_k": 1})
    w1, i1 = route(cfg, x, 2, protos=torch.stack([base, base.roll(1)]))
    w2, i2 = route(cfg, x, 2, protos=torch.stack([-base, base.roll(1)]))
    assert torch.equal(i1, i2) and torch.allclose(w1, w2)


def test_scaled_prototype_is_multiplied_by_sigma_squared():
    A, B = _factors(seed=2)
    v, s = top_right_singular(A, B)
    scaled = arrow_prototypes({"m": LoraFactors(A, B, 1.0)}, scale=True)["m"]
    assert torch.allclose(scaled, v * s**2)


def test_tied_group_uses_concatenated_b():
    A, Bq = _factors(seed=3)
    _, Bk = _factors(seed=4)
    f = {"l.q_proj": LoraFactors(A, Bq, 1.0), "l.k_proj": LoraFactors(A, Bk, 1.0)}
    protos = arrow_prototypes(f, tie_params="q_proj.lora_a|k_proj.lora_a")
    _, _, Vh = torch.linalg.svd(torch.cat([Bq, Bk]) @ A)
    assert _same_up_to_sign(protos["l.q_proj"], Vh[0], atol=1e-5)
    assert torch.equal(protos["l.q_proj"], protos["l.k_proj"])
    assert tie_groups(["l.q_proj", "l.k_proj", "l.out"], "q_proj.lora_a|k_proj.lora_a") == [
        ["l.k_proj", "l.q_proj"],
        ["l.out"],
    ]
    with pytest.raises(ValueError, match="does not share lora_A"):
        arrow_prototypes(
            {**f, "l.k_proj": LoraFactors(A + 1, Bk, 1.0)}, tie_params="q_proj.lora_a|k_proj.lora_a"
        )


class _Owner:
    def __init__(self, selector, task_ids=None):
        self.selector, self.task_ids = selector_config(selector), task_ids


def _layer(n_experts=3, d_in=8, d_out=6, r=2, scalings=None, owner=None):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    A, B = torch.randn(n_experts, r, d_in), torch.randn(n_experts, d_out, r)
    s = torch.tensor(scalings or [2.0] * n_experts)
    return LibraryLinear(base, A, B, s, owner), base, A, B, s


def _arrow_protos(A, B):
    return torch.stack([top_right_singular(a, b)[0] for a, b in zip(A, B)])


def test_arrow_with_one_expert_equals_that_expert():
    owner = _Owner({"name": "arrow", "top_k": -1})
    layer, base, A, B, s = _layer(n_experts=1, owner=owner)
    layer.protos = _arrow_protos(A, B)
    x = torch.randn(2, 5, 8)
    for merge_after in (False, True):
        owner.selector["lora_merge_after"] = merge_after
        expected = base(x) + s[0] * x @ A[0].T @ B[0].T
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_parameter_and_output_mixing_agree_at_top_k_1_and_differ_above():
    owner = _Owner({"name": "arrow", "top_k": 1})
    layer, *_ = _layer(scalings=[1.0, 2.0, 0.5], owner=owner)
    layer.protos = _arrow_protos(layer.A, layer.B)
    x = torch.randn(3, 4, 8)
    outs = {}
    for k in (1, 3):
        for merge_after in (False, True):
            owner.selector.update(top_k=k, lora_merge_after=merge_after)
            outs[k, merge_after] = layer(x)
    assert torch.allclose(outs[1, False], outs[1, True], atol=1e-5)
    assert not torch.allclose(outs[3, False], outs[3, True], atol=1e-3)


def test_arrow_parameter_mixing_matches_per_token_reference():
    owner = _Owner({"name": "arrow", "top_k": 2, "router_temp": 0.5})
    layer, base, A, B, s = _layer(scalings=[1.0, 2.0, 0.5], owner=owner)
    P = _arrow_protos(A, B)
    layer.protos = P
    x = torch.randn(7, 8)
    y = layer(x)
    for n in range(7):  # slow reference: one token at a time, straight from the formula
        logits = (x[n] @ P.T).abs() / 0.5
        top = logits.topk(2)
        w = top.values.softmax(-1)
        a = sum(wj * A[e] for wj, e in zip(w, top.indices))
        b = sum(wj * s[e] * B[e] for wj, e in zip(w, top.indices))
        assert torch.allclose(y[n], base(x[n]) + b @ (a @ x[n]), atol=1e-5)


def test_uniform_parameter_averaging_is_mean_a_times_mean_b():
    owner = _Owner({"name": "uniform"})
    layer, base, A, B, _s = _layer(owner=owner)
    x = torch.randn(4, 8)
    expected = base(x) + 2.0 * x @ A.mean(0).T @ B.mean(0).T
    assert torch.allclose(layer(x), expected, atol=1e-5)
    owner.selector["lora_merge_after"] = True  # uniform_lora_after_op: mean of the B A
    expected = base(x) + 2.0 * x @ torch.stack([b @ a for a, b in zip(A, B)]).mean(0).T
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_task_name_selector_routes_each_example_to_its_expert():
    owner = _Owner({"name": "task_name"}, task_ids=torch.tensor([2, 0]))
    layer, base, A, B, s = _layer(owner=owner)
    x = torch.randn(2, 3, 8)
    y = layer(x)
    for b, e in ((0, 2), (1, 0)):
        assert torch.allclose(y[b], base(x[b]) + s[e] * x[b] @ A[e].T @ B[e].T, atol=1e-5)
    owner.task_ids = None
    with pytest.raises(RuntimeError, match="needs task names"):
        layer(x)


def test_selector_config_errors_name_the_choices():
    with pytest.raises(KeyError, match="Did you mean 'arrow'"):
        selector_config("arow")
    with pytest.raises(KeyError, match="has no keys"):
        selector_config({"name": "arrow", "topk": 4})


def test_routing_matrix_counts_tokens_over_layers_by_hand():
    from projects.mbc_arrow.routing_analysis import own_expert_rate, routing_matrix

    # task "b" example: 2 layers × 3 tokens -> experts 0,0,1 | 1,1,1 => 2/6 to expert 0, 4/6 to expert 1
    # task "a" examples: one of 1 layer × 2 tokens (expert 2, 2), one of 1 × 2 (expert 0, 2) => 1/4, 0, 3/4
    top1 = [torch.tensor([[0, 0, 1], [1, 1, 1]]), torch.tensor([[2, 2]]), torch.tensor([[0, 2]])]
    order, m = routing_matrix(top1, ["b", "a", "a"], n_experts=3)
    assert order == ["a", "b"]
    torch.testing.assert_close(m, torch.tensor([[0.25, 0.0, 0.75], [2 / 6, 4 / 6, 0.0]], dtype=torch.float64))
    own = own_expert_rate(m, order, {"a": 2, "b": 0})
    assert own["per_task"] == pytest.approx({"a": 0.75, "b": 2 / 6})
    assert own["mean"] == pytest.approx((0.75 + 2 / 6) / 2)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_parameter_mixing_equals_two_routed_lowrank_calls(dtype, tol):
    from projects.mbc_arrow.expert_model import mix_parameters, mix_parameters_reference

    g = torch.Generator().manual_seed(0)
    E, r, d_in, d_out = 5, 3, 12, 7
    A, B = torch.randn(E, r, d_in, generator=g), torch.randn(E, d_out, r, generator=g)
    s = torch.rand(E, generator=g) + 0.5
    x = torch.randn(2, 6, d_in, generator=g)
    w = torch.rand(2, 6, 3, generator=g)
    idx = torch.randint(0, E, (2, 6, 3), generator=g)
    idx[0, 0] = 4  # one expert picked in every slot of a token: its weights add up
    cast = [t.to(dtype) for t in (x, A, B, s, w)]
    got = mix_parameters(cast[0], cast[1], cast[2], cast[3], cast[4], idx)
    ref = mix_parameters_reference(x, A, B, s, w, idx)  # float32
    # by hand for one token: (Σ w s B)(Σ w A) x
    n = (1, 2)
    Wa = sum(w[n][j] * A[idx[n][j]] for j in range(3))
    Wb = sum(w[n][j] * s[idx[n][j]] * B[idx[n][j]] for j in range(3))
    torch.testing.assert_close(ref[n], Wb @ (Wa @ x[n]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.float(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
