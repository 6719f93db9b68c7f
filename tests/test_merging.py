"""`common.merging.task_arithmetic`, the one task arithmetic of MaTS and SMILE, against its formula
θ = θ0 + λ Σ_i (θ_i − θ0), and the two projects' wrappers against it under their hyperparameter names."""

import pytest
import torch

import common.merging
from common.merging import MergeError, task_arithmetic, task_arithmetic_reference
from projects.mats.methods import METHODS as MATS_METHODS
from projects.smile.merging import MERGES as SMILE_MERGES


def _state(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(37, 11, generator=g).to(dtype),  # several chunks with TA_CHUNK = 64
        "b": torch.randn(5, generator=g).to(dtype),
        "position_ids": torch.arange(7),  # an integer buffer: never merged
    }


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(common.merging, "TA_CHUNK", 64)


def test_task_arithmetic_by_hand():
    base = {"w": torch.tensor([1.0, 2.0]), "step": torch.tensor(3)}
    models = [
        {"w": torch.tensor([2.0, 2.0]), "step": torch.tensor(9)},
        {"w": torch.tensor([1.0, 4.0]), "step": torch.tensor(5)},
    ]
    # θ0 + 0.5 · ((2 − 1) + (1 − 1), (2 − 2) + (4 − 2)) = (1.5, 3.0); integer tensors stay the base's
    out = task_arithmetic(base, models, scaling=0.5)
    assert out["w"].tolist() == [1.5, 3.0] and out["step"].item() == 3


@pytest.mark.parametrize("n_models", [1, 2, 5])
@pytest.mark.parametrize("scaling", [1.0, 0.3, -0.7])
def test_task_arithmetic_equals_the_formula_in_float64(n_models, scaling):
    base, models = _state(0), [_state(1 + i) for i in range(n_models)]
    out = task_arithmetic(base, models, scaling=scaling)
    eps, scale = torch.finfo(torch.float32).eps, 4.0 * n_models  # |θ| of a few standard deviations
    for k in ("w", "b"):
        want = base[k].double() + scaling * sum(m[k].double() - base[k].double() for m in models)
        assert out[k].dtype == torch.float32
        # Σθi − Mθ0 rounds at the scale of |θ|: ~M ulp of it; a mean instead of a sum misses by ~|τ|
        torch.testing.assert_close(out[k].double(), want, atol=2 * n_models * eps * scale, rtol=0)
    assert torch.equal(out["position_ids"], base["position_ids"])
    ref = task_arithmetic_reference(base, models, scaling=scaling)
    assert all(torch.allclose(out[k], ref[k], atol=1e-5, rtol=0) for k in ("w", "b"))


def test_bfloat16_takes_the_formula_term_by_term():
    base, models = _state(0, torch.bfloat16), [_state(1, torch.bfloat16), _state(2, torch.bfloat16)]
    out = task_arithmetic(base, models, scaling=0.3)
    for k in ("w", "b"):
        assert out[k].dtype == torch.bfloat16
        assert torch.equal(out[k], base[k] + 0.3 * ((models[0][k] - base[k]) + (models[1][k] - base[k])))


def test_both_projects_call_the_common_task_arithmetic():
    base, models = _state(0), [_state(1), _state(2), _state(3)]
    mats = MATS_METHODS["task_arithmetic"](base, models, model_lambda=0.4)
    smile = SMILE_MERGES["task_arithmetic"](base, models)  # fusion_bench's default scaling_factor 0.3
    for k in base:
        assert torch.equal(mats[k], task_arithmetic(base, models, scaling=0.4)[k])
        assert torch.equal(smile[k], task_arithmetic(base, models, scaling=0.3)[k])


def test_task_arithmetic_refuses_mismatched_and_non_finite_models():
    base = _state(0)
    with pytest.raises(MergeError, match=r"model 1 does not match the base model: missing \['b'\]"):
        task_arithmetic(base, [_state(1), {k: v for k, v in _state(2).items() if k != "b"}])
    bad = _state(1)
    bad["w"][30, 3] = float("inf")
    with pytest.raises(MergeError, match=r"model 1: w has NaN or inf"):
        task_arithmetic(base, [_state(2), bad])
