"""MaTS merge fast paths (issue 9, rows 5-6) against the sort-based references, ties at the threshold included."""

import math

import pytest
import torch
from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge

import common.merging
import projects.mats.merging as merging
from common.merging import task_arithmetic_reference
from projects.mats.merging import (
    MergeError,
    _kth_largest_abs,
    _magnitude_keep,
    _ties_reference,
    task_arithmetic,
    ties,
)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # many chunks on small tensors: chunk edges and ties across them
    monkeypatch.setattr(merging, "_CHUNK", 64)
    monkeypatch.setattr(common.merging, "TA_CHUNK", 64)


def _models(n_models=4, ties_at_threshold=False, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (13, 17), "a.bias": (13,), "b.weight": (300,), "c": (2, 3, 5)}
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    if ties_at_threshold:  # a zero base and deltas on a coarse grid: many |τ| equal the threshold, and zeros
        base = {k: torch.zeros_like(v) for k, v in base.items()}
    models = []
    for _ in range(n_models):
        if ties_at_threshold:
            deltas = {k: torch.randint(-3, 4, s, generator=g).to(dtype) / 4 for k, s in shapes.items()}
        else:
            deltas = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
        models.append({k: base[k] + deltas[k] for k in shapes})
    return base, models


def test_kth_largest_abs_is_exact():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, generator=g)
    x[:100] = 0.0
    x[100:150] = -0.0
    x[150:200] = 1e-40  # subnormal
    x[200:300] = x[300]  # a block of equal values
    zero = torch.zeros_like(x)
    ranked = x.abs().sort(descending=True).values
    for k in (1, 2, 37, 500, 700, 900, 1000):
        t, greater, equal = _kth_largest_abs([(x[:600], zero[:600]), (x[600:], zero[600:])], k)
        assert t == ranked[k - 1].item()
        assert greater == int((x.abs() > t).sum()) and equal == int((x.abs() == t).sum())


@pytest.mark.parametrize("n_models", [1, 2, 4])
def test_task_arithmetic_matches_the_reference_to_rounding(n_models):
    # Σθi − Mθ0 rounds at the scale of |θ|: within M² ulp of max|θ| (times λ) of the reference, which is
    # far below |τ| (a wrong formula, e.g. a mean, would miss by ~|τ|)
    base, models = _models(n_models=n_models)
    eps = torch.finfo(torch.float32).eps
    for lam in (1.0, 0.3, -0.5):
        fast = task_arithmetic(base, models, model_lambda=lam)
        ref = task_arithmetic_reference(base, models, scaling=lam)
        scale = max(t.abs().max().item() for m in (base, *models) for t in m.values())
        for k in base:
            assert fast[k].dtype == torch.float32 and fast[k].shape == base[k].shape
            tol = 2 * n_models**2 * max(abs(lam), 1.0) * eps * scale
            torch.testing.assert_close(fast[k], ref[k], atol=tol, rtol=0)
    base64, models64 = _models(n_models=n_models, dtype=torch.float64)
    fast, ref = task_arithmetic(base64, models64), task_arithmetic_reference(base64, models64)
    assert all(torch.allclose(fast[k], ref[k], atol=1e-12, rtol=0) for k in base64)
    base16, models16 = _models(dtype=torch.bfloat16)  # other dtypes take the reference
    fast, ref = task_arithmetic(base16, models16), task_arithmetic_reference(base16, models16)
    assert all(torch.equal(fast[k], ref[k]) and fast[k].dtype == torch.bfloat16 for k in base16)


def test_task_arithmetic_names_a_non_finite_model():
    base, models = _models()
    models[2]["b.weight"][200] = float("nan")
    with pytest.raises(MergeError, match=r"model 2: b\.weight"):
        task_arithmetic(base, models)


@pytest.mark.parametrize("variant", ["mats", "mergekit", "peft"])
@pytest.mark.parametrize("ties_at_threshold", [False, True])
@pytest.mark.parametrize("top_k", [20.0, 50.0, 100.0])
def test_exact_ties_equals_the_reference(variant, ties_at_threshold, top_k):
    base, models = _models(ties_at_threshold=ties_at_threshold, seed=int(top_k))
    kw = dict(top_k=top_k, variant=variant, weights=[1.0, 2.0, 0.5, 1.5])
    fast = ties(base, models, **kw)
    w = torch.tensor(kw["weights"])
    if variant == "peft" and ties_at_threshold and top_k < 100:
        # peft's topk keeps an unspecified subset of tied entries: compare with its formula on the stable
        # sort's subset (lowest index first), which is what the fast path keeps
        density = top_k / 100
        ref_tau = {}
        for k in base:
            pruned = torch.stack([_magnitude_keep((m[k] - base[k]).float(), density) for m in models])
            mask = calculate_majority_sign_mask(pruned, method="total")
            ref_tau[k] = disjoint_merge(pruned * w.view((-1,) + (1,) * (pruned.dim() - 1)), mask)
    else:
        ref_tau = _ties_reference(base, models, top_k, variant, "mean", w)
    for k in base:
        assert torch.allclose(fast[k], base[k] + ref_tau[k], atol=1e-6, rtol=1e-6), k


@pytest.mark.parametrize("ties_at_threshold", [False, True])
def test_exact_kept_sets_have_the_size_each_variant_defines(ties_at_threshold):
    base, models = _models(n_models=1, ties_at_threshold=ties_at_threshold)
    # one model: TIES keeps its trimmed task vector (mergekit/peft: exactly int(k·n) per tensor)
    for variant in ("mergekit", "peft"):
        out = ties(base, models, top_k=20.0, variant=variant)
        for k in base:
            kept = int(((out[k] - base[k]) != 0).sum())
            nonzero = int(((models[0][k] - base[k]) != 0).sum())
            assert kept == min(int(0.2 * base[k].numel()), nonzero)


def test_mats_sum_merge_func_and_single_model():
    base, models = _models(ties_at_threshold=True)
    for merge_func in ("sum", "mean"):
        fast = ties(base, models, top_k=30.0, variant="mats", merge_func=merge_func)
        ref = _ties_reference(base, models, 30.0, "mats", merge_func, torch.ones(4))
        assert all(torch.allclose(fast[k], base[k] + ref[k], atol=1e-6) for k in base)


@pytest.mark.parametrize("variant", ["mats", "mergekit"])
def test_sampled_threshold_keeps_the_fraction_within_tolerance(variant, monkeypatch):
    monkeypatch.setattr(merging, "_CHUNK", 1 << 14)
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.zeros(400, 500)}
    model = {"w": torch.randn(400, 500, generator=g)}
    samples = 1 << 14
    out = ties(base, [model], top_k=20.0, variant=variant, threshold="sample", sample_size=samples)
    kept = (out["w"] != 0).float().mean().item()
    assert abs(kept - 0.2) <= 5 * math.sqrt(0.2 * 0.8 / samples)


def test_non_finite_models_are_refused_by_the_fast_paths():
    base, models = _models()
    models[2]["b.weight"][7] = float("nan")
    for merge in (lambda: task_arithmetic(base, models), lambda: ties(base, models, variant="mergekit")):
        with pytest.raises(MergeError, match=r"model 2: b\.weight has NaN or inf"):
            merge()
    with pytest.raises(MergeError, match="threshold"):
        ties(base, models[:2], threshold="approx")
