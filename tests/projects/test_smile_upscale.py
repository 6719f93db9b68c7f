"""SMILE upscaling: equalities the construction must satisfy, the parameter formula, and clear errors."""

import copy
import re

import pytest
import torch
from torch import nn

from common.models import count_parameters, micro_model
from projects.smile.merging import simple_average, task_arithmetic
from projects.smile.projection import energy_rank, project_delta, singular_projection_merge
from projects.smile.upscale import (
    SmileMoELinear,
    added_parameters,
    smile_linear,
    smile_shell,
    smile_upscale,
)


def _finetuned(base: nn.Module, n: int, scale: float = 0.1, seed: int = 0) -> list[nn.Module]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
        out.append(m)
    return out


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.GELU(), nn.Linear(10, 8, bias=False), nn.LayerNorm(8))


def test_single_dense_expert_equals_the_finetuned_model():
    base = _mlp()
    (ft,) = _finetuned(base, 1)
    up, info = smile_upscale(base, [ft], gate_k=3, k=-1)
    x = torch.randn(4, 5, 12)
    # the LayerNorm is not a Linear: it stays pretrained, so compare the layers before it
    torch.testing.assert_close(up[:3](x), ft[:3](x), atol=1e-5, rtol=1e-5)
    assert list(info.upscaled) == ["0", "2"]


def test_full_rank_expert_routed_alone_equals_its_finetuned_layer():
    base = nn.Linear(6, 5)
    fts = _finetuned(base, 3)
    layer = smile_linear(base, fts, gate_k=2, k=5, top_k=1)
    x = torch.randn(7, 6)
    _, idx = layer.route(x)
    want = torch.stack([fts[int(i)](x[n]) for n, i in enumerate(idx[:, 0])])
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_zero_deltas_stay_pretrained_and_inputs_are_untouched():
    base = _mlp()
    fts = [copy.deepcopy(base) for _ in range(2)]
    with torch.no_grad():
        fts[1][0].weight.add_(0.5)  # only layer 0 of one expert moves
    before = [copy.deepcopy(m.state_dict()) for m in (base, *fts)]
    up, info = smile_upscale(base, fts, gate_k=2, k=2)
    assert list(info.upscaled) == ["0"] and info.skipped == ["2"]
    assert isinstance(up[0], SmileMoELinear) and isinstance(up[2], nn.Linear)
    for m, state in zip((base, *fts), before):
        for key, value in m.state_dict().items():
            assert torch.equal(value, state[key]), key


def test_router_scores_are_projection_norms_and_topk_weights_renormalise():
    base = nn.Linear(9, 7)
    fts = _finetuned(base, 4)
    layer = smile_linear(base, fts, gate_k=3, k=2, top_k=2)
    x = torch.randn(11, 9)
    want = []
    for f in fts:
        _, _, vh = torch.linalg.svd(f.weight - base.weight)
        want.append((x @ vh[:3].T).norm(dim=-1))
    torch.testing.assert_close(layer.gate(x), torch.stack(want, -1), atol=1e-5, rtol=1e-5)
    weights, idx = layer.route(x)
    torch.testing.assert_close(weights.sum(-1), torch.ones(11))
    p = torch.stack(want, -1).softmax(-1)
    torch.testing.assert_close(weights, p.gather(1, idx) / p.gather(1, idx).sum(-1, keepdim=True))


def test_forward_matches_a_slow_reference():
    base = nn.Linear(8, 6)
    fts = _finetuned(base, 3)
    gate_k, k, top_k = 2, 3, 2
    layer = smile_linear(base, fts, gate_k=gate_k, k=k, top_k=top_k)
    x = torch.randn(5, 8)
    weights, idx = layer.route(x)
    rows = []
    for n in range(5):
        y = base(x[n])
        for w, i in zip(weights[n], idx[n]):
            f = fts[int(i)]
            u, s, vh = torch.linalg.svd(f.weight - base.weight)
            y = y + w * ((u[:, :k] * s[:k]) @ vh[:k] @ x[n] + f.bias - base.bias)
        rows.append(y)
    torch.testing.assert_close(layer(x), torch.stack(rows), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [3, -1])
def test_parameter_count_equals_the_formula(k):
    base = micro_model("clip_vision", seed=0)
    fts = _finetuned(base, 3, scale=0.01)
    up, info = smile_upscale(base, fts, gate_k=2, k=k)
    layers = [
        (m.in_features, m.out_features, m.bias is not None)
        for m in base.modules()
        if isinstance(m, nn.Linear)
    ]
    assert len(info.upscaled) == len(layers) == 6 * base.config.num_hidden_layers  # q, k, v, out, fc1, fc2
    formula = added_parameters(layers, 3, 2, k)
    assert count_parameters(up) - count_parameters(base) == formula == info.added_parameters
    shell = smile_shell(copy.deepcopy(base), 3, 2, k)
    assert count_parameters(shell) == count_parameters(up)


def test_hand_computed_parameter_count():
    # one Linear 4 -> 3 with bias, T=2, gate_k=1, k=2: 2·(1·4 + 2·(4+3) + 3) = 42
    assert added_parameters([(4, 3, True)], 2, 1, 2) == 42
    assert added_parameters([(4, 3, False)], 1, 2, -1) == 1 * (2 * 4 + 12)


def test_clear_errors():
    base = _mlp()
    fts = _finetuned(base, 2)
    with pytest.raises(ValueError, match="k must be -1"):
        smile_upscale(base, fts, gate_k=2, k=50)
    with pytest.raises(ValueError, match="top_k must be in"):
        smile_upscale(base, fts, gate_k=2, k=2, top_k=3)
    with pytest.raises(ValueError, match="gate_k must be in"):
        smile_upscale(base, fts, gate_k=100, k=2)
    other = nn.Sequential(nn.Linear(12, 10), nn.GELU(), nn.Linear(10, 9, bias=False), nn.LayerNorm(9))
    with pytest.raises(ValueError, match="mismatched base model"):
        smile_upscale(base, [other], gate_k=2, k=2)
    bad = copy.deepcopy(fts[0])
    with torch.no_grad():
        bad[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        smile_upscale(base, [bad], gate_k=2, k=2)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        smile_upscale(base, fts, gate_k=2, k=2, device="cuda")


def test_merges_of_identical_models_return_the_model():
    base = _mlp().state_dict()
    (ft,) = _finetuned(_mlp(), 1)
    for key, value in simple_average(base, [ft.state_dict()] * 3).items():
        torch.testing.assert_close(value, ft.state_dict()[key])
    merged = task_arithmetic(base, [ft.state_dict()], scaling_factor=1.0)
    for key, value in merged.items():
        torch.testing.assert_close(value, ft.state_dict()[key])


def test_projection_spaces_partition_the_delta():
    torch.manual_seed(0)
    w0, w = torch.randn(6, 9), torch.randn(6, 9)
    low = project_delta(w0, w, 2, "low")
    high = project_delta(w0, w, 2, "high", full_matrices=False)
    full = project_delta(w0, w, 2, "high", full_matrices=True)
    # Space I + Space II+III together hold ΔW projected on complementary subspaces on both sides; with
    # U, V full, I + (II+III) + the cross terms = ΔW, so low + full − w0 misses only the cross blocks.
    u, _, vh = torch.linalg.svd(w0)
    d = w - w0
    cross = u[:, :2] @ (u[:, :2].T @ d @ vh[2:].T) @ vh[2:] + u[:, 2:] @ (u[:, 2:].T @ d @ vh[:2].T) @ vh[:2]
    torch.testing.assert_close(low + full - w0 + cross, w, atol=1e-5, rtol=1e-5)
    # Space II lies inside Space II+III: with 6 rows, U[:, 2:6] is the same span, V differs by the null space
    assert not torch.allclose(high, full)
    assert energy_rank(torch.tensor([4.0, 3.0, 2.0, 1.0])) == 2  # cumsum 4 < 5, 7 ≥ 5


def test_projection_merge_keeps_biases_and_other_parameters_finetuned():
    base = _mlp()
    (ft,) = _finetuned(base, 1)
    merged = singular_projection_merge(base, ft, k=2, rank="low")
    assert torch.equal(merged[0].bias, ft[0].bias) and torch.equal(merged[3].weight, ft[3].weight)
    torch.testing.assert_close(merged[0].weight, project_delta(base[0].weight, ft[0].weight, 2, "low"))


def test_router_from_finetuned_weights_and_averaged_other_modules():
    base = _mlp()
    fts = _finetuned(base, 2)
    layer = smile_linear(base[0], [f[0] for f in fts], gate_k=2, k=2, routing_use_diff=False)
    for i, f in enumerate(fts):
        vh = torch.linalg.svd(f[0].weight)[2][:2]
        torch.testing.assert_close(layer.gate.weight[2 * i : 2 * i + 2], vh)
    up, _ = smile_upscale(base, fts, gate_k=2, k=2, average_experts=True)
    torch.testing.assert_close(up[3].weight, (fts[0][3].weight + fts[1][3].weight) / 2)
    kept, _ = smile_upscale(base, fts, gate_k=2, k=2)
    assert torch.equal(kept[3].weight, base[3].weight)


def test_linear_only_finetuning_selects_exactly_the_upscaled_layers():
    from projects.smile.finetune import trainable_parameters

    vision = micro_model("clip_vision")
    linear = trainable_parameters(vision, "linear")
    expected = {id(p) for m in vision.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    assert {id(p) for p in linear} == expected and len(linear) == len(expected)
    others = [n for n, p in vision.named_parameters() if id(p) not in expected]
    assert any("layer_norm" in n for n in others) and any("embeddings" in n for n in others)
    assert len(trainable_parameters(vision, "all")) == len(list(vision.parameters()))
    with pytest.raises(ValueError, match="trainable must be one of"):
        trainable_parameters(vision, "lora")


def test_upscaling_shows_a_labelled_progress_bar(capsys):
    base = _mlp()
    smile_upscale(base, _finetuned(base, 2), gate_k=2, k=2)
    err = capsys.readouterr().err
    assert re.search(r"SMILE upscaling \(2 experts\): +0%.*\| 0/2 ", err), err  # the _mlp's 2 Linears
