"""MaTS merges against closed forms and hand-computed cases (spec §1b, peers §3)."""

import re

import numpy as np
import pytest
import torch

from projects.mats.conjugate_gradient import cg_solve, conjugate_gradient
from projects.mats.merging import (
    MergeError,
    average,
    diagonal_fisher,
    masked_inverse,
    regmean,
    shrink_off_diagonal,
    task_arithmetic,
    ties,
)
from projects.mats.methods import METHODS


def _spd(n, gen, rank=None):
    a = torch.randn(n, rank or n, generator=gen, dtype=torch.float64)
    return a @ a.T / n + (0 if rank else 0.1) * torch.eye(n, dtype=torch.float64)


@pytest.fixture
def problem():
    """Three models of one Linear (out 5, in 4) + a bias, with Fisher, Grams and output Grams."""
    gen = torch.Generator().manual_seed(0)
    base = {
        "lin.weight": torch.randn(5, 4, generator=gen, dtype=torch.float64),
        "lin.bias": torch.zeros(5, dtype=torch.float64),
    }
    models = [
        {k: v + torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in base.items()}
        for _ in range(3)
    ]
    stats = [
        {
            "fisher": {
                k: torch.rand(v.shape, generator=gen, dtype=torch.float64) + 0.1 for k, v in base.items()
            },
            "input_gram": {"lin": _spd(4, gen)},
            "output_gram": {"lin": _spd(5, gen)},
            "blockwise_fisher": {k: _spd(v.numel(), gen) for k, v in base.items()},
        }
        for _ in range(3)
    ]
    return base, models, stats


def test_registry_lists_every_method():
    assert set(METHODS) == {
        "average",
        "task_arithmetic",
        "ties",
        "diagonal_fisher",
        "regmean",
        "conjugate_gradient",
    }


@pytest.mark.filterwarnings("ignore:The density 1.0")
@pytest.mark.parametrize(
    "method, hparams",
    [
        ("average", {}),
        ("task_arithmetic", {"model_lambda": 1 / 3}),
        ("ties", {"top_k": 100}),
        ("ties", {"top_k": 100, "variant": "mergekit"}),
        ("ties", {"top_k": 100, "variant": "peft"}),
        ("diagonal_fisher", {}),
        ("regmean", {"model_lambda": 0.7}),
        ("conjugate_gradient", {"objective": "average"}),
        ("conjugate_gradient", {"objective": "diagonal_fisher", "rtol": 1e-12}),
        ("conjugate_gradient", {"objective": "regmean", "model_lambda": 0.7, "rtol": 1e-12}),
        ("conjugate_gradient", {"objective": "blockwise_fisher", "model_lambda": 0.5, "rtol": 1e-12}),
        ("conjugate_gradient", {"objective": "kfac", "rtol": 1e-12}),
    ],
)
def test_merging_identical_models_returns_that_model(problem, method, hparams):
    base, models, stats = problem
    same = [models[0]] * 3
    merged = METHODS[method](base, same, stats=stats, **hparams)
    for k in base:
        torch.testing.assert_close(merged[k], models[0][k], atol=1e-6, rtol=1e-6)


def test_task_arithmetic_lambda_zero_is_base_and_sums(problem):
    base, models, _ = problem
    for k, v in task_arithmetic(base, models, model_lambda=0.0).items():
        torch.testing.assert_close(v, base[k])
    merged = task_arithmetic(base, models, model_lambda=0.5)
    expected = base["lin.weight"] + 0.5 * sum(m["lin.weight"] - base["lin.weight"] for m in models)
    torch.testing.assert_close(merged["lin.weight"], expected)


def test_average_of_two_is_lambda_weighted(problem):
    base, models, _ = problem
    merged = average(base, models[:2], model_lambda=0.3)
    torch.testing.assert_close(merged["lin.bias"], 0.3 * models[0]["lin.bias"] + 0.7 * models[1]["lin.bias"])


def test_diagonal_fisher_is_the_weighted_formula(problem):
    base, models, stats = problem
    merged = diagonal_fisher(base, models, stats=stats)
    f = [s["fisher"]["lin.weight"] for s in stats]
    expected = sum(fi * m["lin.weight"] for fi, m in zip(f, models)) / sum(f)
    torch.testing.assert_close(merged["lin.weight"], expected)
    # The 1e-8 floor makes an all-zero Fisher an average instead of 0/0.
    zero = [{"fisher": {k: torch.zeros_like(v) for k, v in base.items()}} for _ in models]
    torch.testing.assert_close(
        diagonal_fisher(base, models, stats=zero)["lin.bias"], average(base, models)["lin.bias"]
    )


def test_regmean_equals_closed_form_and_cg_converges_to_it(problem):
    base, models, stats = problem
    lam = 0.6
    merged = regmean(base, models, stats=stats, model_lambda=lam)
    g = [shrink_off_diagonal(s["input_gram"]["lin"], lam) for s in stats]
    expected = (torch.linalg.inv(sum(g)) @ sum(gi @ m["lin.weight"].T for gi, m in zip(g, models))).T
    torch.testing.assert_close(merged["lin.weight"], expected)
    torch.testing.assert_close(merged["lin.bias"], average(base, models)["lin.bias"])  # no Gram: averaged
    log = []
    cg = conjugate_gradient(
        base, models, stats=stats, objective="regmean", model_lambda=lam, rtol=1e-12, dtype="float64", log=log
    )
    torch.testing.assert_close(cg["lin.weight"], expected, atol=1e-6, rtol=1e-5)
    assert [r["block"] for r in log] == ["lin.weight"] and log[0]["converged"]
    assert log[0]["final_residual"] < 1e-10 * log[0]["initial_residual"]


def test_shrink_off_diagonal():
    g = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    torch.testing.assert_close(shrink_off_diagonal(g, 0.25), torch.tensor([[2.0, 0.25], [0.25, 3.0]]))


def test_cg_average_and_diagonal_fisher_match_closed_forms(problem):
    base, models, stats = problem
    avg = conjugate_gradient(base, models, objective="average", initialization="pretrained")
    for k, v in average(base, models).items():
        torch.testing.assert_close(avg[k], v)
    # 20 unknowns per block and 100 iterations: CG is exact on the diagonal system.
    fisher_cg = conjugate_gradient(
        base, models, stats=stats, objective="diagonal_fisher", rtol=1e-12, dtype="float64"
    )
    for k, v in diagonal_fisher(base, models, stats=stats).items():
        torch.testing.assert_close(fisher_cg[k], v, atol=1e-6, rtol=1e-5)


def test_cg_blockwise_fisher_solves_the_block_system(problem):
    base, models, stats = problem
    merged = conjugate_gradient(
        base, models, stats=stats, objective="blockwise_fisher", model_lambda=0.5, rtol=1e-12, dtype="float64"
    )
    f = [shrink_off_diagonal(s["blockwise_fisher"]["lin.weight"], 0.5) for s in stats]
    rhs = sum(fi @ m["lin.weight"].reshape(-1) for fi, m in zip(f, models))
    torch.testing.assert_close(
        merged["lin.weight"].reshape(-1), torch.linalg.solve(sum(f), rhs), atol=1e-6, rtol=1e-5
    )


def test_kfac_cg_solves_the_kronecker_system(problem):
    base, models, stats = problem
    log = []
    merged = conjugate_gradient(
        base, models, stats=stats, objective="kfac", num_iterations=200, rtol=1e-10, dtype="float64", log=log
    )
    x = merged["lin.weight"].T  # (in, out)
    g = [s["input_gram"]["lin"] for s in stats]
    h = [s["output_gram"]["lin"] for s in stats]
    lhs = sum(gi @ x @ hi for gi, hi in zip(g, h))
    rhs = sum(gi @ m["lin.weight"].T @ hi for gi, hi, m in zip(g, h, models))
    assert (lhs - rhs).norm() <= 1e-9 * rhs.norm()
    assert log[0]["final_residual"] == pytest.approx((lhs - rhs).norm().item(), rel=1e-3, abs=1e-9)


def test_cg_keeps_the_initialisation_on_a_singular_direction():
    # Input dimension 1 is never excited (zero Gram row/column): CG leaves x0 there; RegMean zeroes it.
    gram = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    base = {"l.weight": torch.zeros(1, 2, dtype=torch.float64)}
    models = [
        {"l.weight": torch.tensor([[1.0, 5.0]], dtype=torch.float64)},
        {"l.weight": torch.tensor([[3.0, 7.0]], dtype=torch.float64)},
    ]
    stats = [{"input_gram": {"l": gram}}] * 2
    init = {"l.weight": torch.tensor([[0.0, 9.0]], dtype=torch.float64)}
    cg = conjugate_gradient(base, models, stats=stats, objective="regmean", initialization=init)
    torch.testing.assert_close(cg["l.weight"], torch.tensor([[2.0, 9.0]], dtype=torch.float64))
    torch.testing.assert_close(
        regmean(base, models, stats=stats)["l.weight"], torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        masked_inverse(gram), torch.tensor([[0.5, 0.0], [0.0, 0.0]], dtype=torch.float64)
    )


def test_cg_solve_stops_at_scipy_tolerance():
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    b = torch.ones(3, dtype=torch.float64)
    x, rec = cg_solve(lambda v: a @ v, b, torch.zeros(3, dtype=torch.float64), num_iterations=1)
    assert rec["iterations"] == 1 and not rec["converged"]
    x, rec = cg_solve(lambda v: a @ v, b, torch.zeros(3, dtype=torch.float64), num_iterations=10)
    torch.testing.assert_close(x, torch.tensor([1.0, 0.5, 1 / 3], dtype=torch.float64))
    assert rec["converged"] and rec["iterations"] == 3


def _lm_head_problem():
    # One-output head on 2 inputs; G1 = I, G2 = diag(3, 1): RegMean gives Wᵀ = diag(4, 2)⁻¹ (W1ᵀ + G2 W2ᵀ)
    # = diag(4, 2)⁻¹ [1 + 15, 2 + 6] = [4, 4]; the average is [3, 4]; the pretrained head is [9, 9].
    base = {"lm_head.weight": torch.tensor([[9.0, 9.0]]), "lin.weight": torch.zeros(1, 2)}
    models = [
        {"lm_head.weight": torch.tensor([[1.0, 2.0]]), "lin.weight": torch.tensor([[1.0, 2.0]])},
        {"lm_head.weight": torch.tensor([[5.0, 6.0]]), "lin.weight": torch.tensor([[5.0, 6.0]])},
    ]
    grams = [torch.eye(2), torch.diag(torch.tensor([3.0, 1.0]))]
    stats = [  # lm_head has an input Gram but no output Gram, as in the original's metadata
        {"input_gram": {"lm_head": g, "lin": g}, "output_gram": {"lin": torch.eye(1)}} for g in grams
    ]
    return base, models, stats


@pytest.mark.parametrize(
    "objective, lm_head, expected",
    [
        ("regmean", "original", [[9.0, 9.0]]),  # left out of the solve: the pretrained head is kept
        ("kfac", "original", [[3.0, 4.0]]),  # skipped by the K-FAC solve: averaged
        ("regmean", "solve", [[4.0, 4.0]]),
        ("kfac", "solve", [[4.0, 4.0]]),  # no output Gram: RegMean's system
    ],
)
def test_cg_lm_head_follows_the_original(objective, lm_head, expected):
    base, models, stats = _lm_head_problem()
    merged = conjugate_gradient(base, models, stats=stats, objective=objective, lm_head=lm_head)
    torch.testing.assert_close(merged["lm_head.weight"], torch.tensor(expected))
    torch.testing.assert_close(merged["lin.weight"], torch.tensor([[4.0, 4.0]]))  # solved either way


def _scipy_cg_regmean(grams, weights, num_iterations, dtype):
    """The original's call: scipy's cg on the flattened system Σ G X = Σ G Wᵀ, in `dtype`, x0 = 0."""
    from scipy.sparse.linalg import LinearOperator, cg

    total = sum(grams).to(dtype)
    b = sum(g.to(dtype) @ w.to(dtype).T for g, w in zip(grams, weights))  # (in, out)
    as_np = {torch.float32: np.float32, torch.float64: np.float64}[dtype]

    def matvec(v):
        return (total @ torch.from_numpy(np.asarray(v, dtype=as_np)).reshape(b.shape)).reshape(-1).numpy()

    op = LinearOperator((b.numel(), b.numel()), matvec=matvec, dtype=as_np)
    x, _ = cg(op, b.reshape(-1).numpy(), x0=np.zeros(b.numel(), dtype=as_np), maxiter=num_iterations)
    return torch.from_numpy(np.asarray(x)).double().reshape(b.shape).T


def test_cg_runs_in_float32_as_the_original_with_float64_an_option():
    # Grams with condition number 1e6, stopped after 10 iterations: scipy's float32 and float64 solutions
    # differ by ~10% (the original's float32 is the default); ours follows each precision.
    gen = torch.Generator().manual_seed(0)

    def gram():
        q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
        return (q * torch.logspace(0, 6, 16, dtype=torch.float64)) @ q.T / 1e6

    grams = [gram(), gram()]
    base = {"l.weight": torch.zeros(3, 16, dtype=torch.float64)}
    models = [{"l.weight": torch.randn(3, 16, generator=gen, dtype=torch.float64)} for _ in range(2)]
    stats = [{"input_gram": {"l": g}} for g in grams]
    weights = [m["l.weight"] for m in models]
    ref32 = _scipy_cg_regmean(grams, weights, 10, torch.float32)
    ref64 = _scipy_cg_regmean(grams, weights, 10, torch.float64)

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert rel(ref32, ref64) > 0.05  # the precisions give visibly different merges
    ours32 = conjugate_gradient(base, models, stats=stats, objective="regmean", num_iterations=10)
    ours64 = conjugate_gradient(
        base, models, stats=stats, objective="regmean", num_iterations=10, dtype="float64"
    )
    assert rel(ours32["l.weight"], ref32) < 0.02
    assert rel(ours64["l.weight"], ref64) < 1e-6


# TIES by hand (see the derivations in each test): base 0, one tensor of 6 entries.
TAU1 = torch.tensor([5.0, -4.0, 3.0, 1.0, -2.0, 0.5])
TAU2 = torch.tensor([-1.0, -6.0, -3.0, 2.0, 4.0, 0.2])
BASE = {"t": torch.zeros(6)}
MODELS = [{"t": TAU1}, {"t": TAU2}]


def test_ties_mats_global_trim_and_majority_fallback():
    # Keep |τ| >= 3rd smallest |τ| (d - ⌊0.5·6⌋ = 3): 4 entries each. τ̂1 = [5,-4,3,0,-2,0],
    # τ̂2 = [0,-6,-3,2,4,0]; Σ = [5,-10,0,2,2,0] -> signs [+,-,0,+,+,0]; the zeros take the global
    # majority sign(+1-1+1+1) = +1. Disjoint mean: [5, -5, 3, 2, 4, 0]; sum: [5, -10, 3, 2, 4, 0].
    merged = ties(BASE, MODELS, top_k=50)
    torch.testing.assert_close(merged["t"], torch.tensor([5.0, -5.0, 3.0, 2.0, 4.0, 0.0]))
    merged = ties(BASE, MODELS, top_k=50, merge_func="sum", model_lambda=0.5)
    torch.testing.assert_close(merged["t"], 0.5 * torch.tensor([5.0, -10.0, 3.0, 2.0, 4.0, 0.0]))


def test_ties_peft_unweighted_election_then_weights():
    # Exactly 3 kept: τ̂1 = [5,-4,3,0,0,0], τ̂2 = [0,-6,-3,0,4,0]; sign of the unweighted Σ with 0 -> +:
    # [+,-,+,+,+,+]. Weights (1, 2) after: idx1 (-4-12)/2 = -8, idx2 only τ1 agrees: 3, idx4 2·4 = 8.
    merged = ties(BASE, MODELS, top_k=50, variant="peft", weights=[1.0, 2.0])
    torch.testing.assert_close(merged["t"], torch.tensor([5.0, -8.0, 3.0, 0.0, 8.0, 0.0]))


def test_ties_mergekit_weighted_election_and_weighted_mean():
    # Weighted τ̂: [5,-4,3,0,0,0] and [0,-12,-6,0,8,0]; Σ = [5,-16,-3,0,8,0] -> [+,-,-,+,+,+] (idx2 now
    # negative: the weights decide). Divisor Σ w over agreeing: [1,3,2,1,2,1] -> [5,-16/3,-3,0,4,0].
    merged = ties(BASE, MODELS, top_k=50, variant="mergekit", weights=[1.0, 2.0])
    torch.testing.assert_close(merged["t"], torch.tensor([5.0, -16 / 3, -3.0, 0.0, 4.0, 0.0]))


def test_clear_errors(problem):
    base, models, _ = problem
    with pytest.raises(MergeError, match="does not match the base model"):
        average(base, [models[0], {"other.weight": torch.zeros(1)}])
    bad = {k: v.clone() for k, v in models[0].items()}
    bad["lin.bias"][0] = float("nan")
    with pytest.raises(MergeError, match="NaN"):
        task_arithmetic(base, [bad])
    with pytest.raises(MergeError, match="input_gram"):
        regmean(base, models, stats=[{"fisher": {}}] * 3)
    with pytest.raises(MergeError, match="needs 'fisher' metadata"):
        diagonal_fisher(base, models)
    with pytest.raises(MergeError, match="unknown TIES variant"):
        ties(base, models, variant="dare")
    with pytest.raises(MergeError, match="unknown CG objective"):
        conjugate_gradient(base, models, objective="kfca")
    with pytest.raises(MergeError, match="nothing to merge"):
        average(base, [])


def test_conjugate_gradient_shows_a_labelled_progress_bar(problem, capsys):
    base, models, stats = problem
    conjugate_gradient(base, models, stats=stats, objective="regmean", num_iterations=3)
    err = capsys.readouterr().err
    assert re.search(r"conjugate gradient \(regmean\): +0%.*\| 0/2 ", err), err  # one bar over the 2 blocks
