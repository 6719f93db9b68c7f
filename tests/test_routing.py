"""Top-k routing and the routed low-rank mixture: every impl against a dense formula, gradients, errors."""

import pytest
import torch

from common import routing
from common.routing import IMPLS, routed_lowrank, top_k_route

TORCH_IMPLS = ["reference", "vectorized", "dense", "grouped"]
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-4}, torch.float64: {"atol": 1e-10, "rtol": 1e-9}}


def dense_mixture(x, A, B, weights, indices, scaling, bias=None):
    """Every expert's dense ΔW_e = s_e B_e A_e applied to every token, then Σ_e (Σ_j w_j [e_j = e]) ΔW_e x."""
    n_experts = A.shape[0]
    delta = scaling[:, None, None] * (B @ A)  # (E, d_out, d_in)
    per_expert = torch.einsum("...i,eoi->...eo", x, delta)  # (..., E, d_out)
    route = (torch.nn.functional.one_hot(indices, n_experts).to(x.dtype) * weights[..., None]).sum(-2)
    y = torch.einsum("...e,...eo->...o", route, per_expert)  # (..., d_out)
    return y if bias is None else y + route @ bias


def make_problem(n_experts, k, rank, dtype=torch.float32, lead=(3, 5), d_in=12, d_out=10, bias=True):
    """Random factors, per-expert scaling and bias; random indices, repeats within a token allowed."""
    return {
        "x": torch.randn(*lead, d_in, dtype=dtype),
        "A": torch.randn(n_experts, rank, d_in, dtype=dtype),
        "B": torch.randn(n_experts, d_out, rank, dtype=dtype),
        "weights": torch.rand(*lead, k, dtype=dtype),
        "indices": torch.randint(0, n_experts, (*lead, k)),
        "scaling": torch.rand(n_experts, dtype=dtype) + 0.5,
        "bias": torch.randn(n_experts, d_out, dtype=dtype) if bias else None,
    }


def run(problem, impl):
    p = dict(problem)
    return routed_lowrank(
        p.pop("x"), p.pop("A"), p.pop("B"), p.pop("weights"), p.pop("indices"), **p, impl=impl
    )


# (E, k, r): one expert; typical; k = E; many experts (past the grouped/dense cost rule); rank 1.
SHAPES = [(1, 1, 3), (4, 2, 3), (8, 2, 4), (6, 6, 5), (64, 1, 8), (5, 3, 1)]


@pytest.mark.parametrize("impl", TORCH_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n_experts", "k", "rank"), SHAPES)
def test_impls_match_dense_formula(impl, dtype, n_experts, k, rank):
    problem = make_problem(n_experts, k, rank, dtype)
    y = run(problem, impl)
    assert y.shape == (3, 5, 10) and y.dtype == dtype
    torch.testing.assert_close(y, dense_mixture(**problem), **TOL[dtype])


@pytest.mark.parametrize("impl", TORCH_IMPLS)
@pytest.mark.parametrize("scaling", [None, 0.25, torch.tensor(2.0)])
def test_scalar_or_missing_scaling_applies_to_every_expert(impl, scaling):
    problem = make_problem(4, 2, 3, bias=False) | {"scaling": scaling}
    expected_scale = torch.full((4,), 1.0 if scaling is None else float(scaling))
    torch.testing.assert_close(run(problem, impl), dense_mixture(**problem | {"scaling": expected_scale}))


@pytest.mark.parametrize("impl", TORCH_IMPLS)
def test_routing_every_token_to_one_expert_equals_that_expert(impl):
    problem = make_problem(5, 2, 3, bias=True)
    x, A, B, s, b = (problem[key] for key in ("x", "A", "B", "scaling", "bias"))
    # Slot 0 carries expert 2 with weight 1; slot 1 names expert 4 with weight 0.
    indices = torch.tensor([2, 4]).expand(3, 5, 2)
    weights = torch.tensor([1.0, 0.0]).expand(3, 5, 2)
    y = run(problem | {"indices": indices, "weights": weights}, impl)
    torch.testing.assert_close(y, s[2] * (x @ A[2].T @ B[2].T) + b[2])


@pytest.mark.parametrize("impl", TORCH_IMPLS)
@pytest.mark.parametrize(("n_experts", "k", "rank"), [(4, 2, 3), (64, 2, 4)])
def test_gradients_match_dense_formula(impl, n_experts, k, rank):
    problem = make_problem(n_experts, k, rank, torch.float64)
    leaves = ["x", "A", "B", "weights", "scaling", "bias"]
    for key in leaves:
        problem[key].requires_grad_(True)
    probe = torch.randn(3, 5, 10, dtype=torch.float64)
    grads = torch.autograd.grad((run(problem, impl) * probe).sum(), [problem[key] for key in leaves])
    expected = torch.autograd.grad((dense_mixture(**problem) * probe).sum(), [problem[key] for key in leaves])
    for key, got, want in zip(leaves, grads, expected):
        torch.testing.assert_close(got, want, **TOL[torch.float64], msg=f"gradient w.r.t. {key}")


def test_no_tokens_gives_empty_output():
    problem = make_problem(4, 2, 3, lead=(0,))
    assert run(problem, "auto").shape == (0, 10)


def test_auto_uses_vectorized_on_cpu(monkeypatch):
    calls = []
    vectorized = IMPLS["vectorized"]
    monkeypatch.setitem(IMPLS, "vectorized", lambda *args: calls.append(1) or vectorized(*args))
    run(make_problem(4, 2, 3), "auto")
    assert calls == [1]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"A": torch.randn(3, 12)}, r"A must be \(E, r, d_in\)"),
        ({"B": torch.randn(4, 10, 2)}, r"B \(4, 10, 2\) does not match A \(4, 3, 12\)"),
        ({"x": torch.randn(3, 5, 11)}, r"x \(3, 5, 11\) must end in d_in=12"),
        ({"weights": torch.rand(3, 5, 3)}, r"weights \(3, 5, 3\) and indices \(3, 5, 2\) must have the same"),
        ({"weights": torch.rand(3, 4, 2), "indices": torch.zeros(3, 4, 2, dtype=torch.long)}, "leading dims"),
        ({"indices": torch.full((3, 5, 2), 4)}, r"indices must be in \[0, 4\).*\[4, 4\]"),
        ({"indices": torch.full((3, 5, 2), -1)}, r"indices must be in \[0, 4\)"),
        ({"indices": torch.zeros(3, 5, 2)}, "indices must be an integer tensor"),
        ({"weights": torch.ones(3, 5, 2, dtype=torch.long)}, "weights must be floating point"),
        ({"A": torch.randn(4, 3, 12, dtype=torch.float64)}, "must share one floating dtype"),
        ({"scaling": torch.ones(3)}, r"scaling must be a float or an \(E,\) = \(4,\) tensor"),
        ({"bias": torch.ones(4, 9)}, r"bias must be \(E, d_out\) = \(4, 10\), got \(4, 9\)"),
    ],
)
def test_bad_inputs_name_the_problem(change, match):
    with pytest.raises(ValueError, match=match):
        run(make_problem(4, 2, 3) | change, "auto")


def test_unknown_impl_suggests_close_match():
    with pytest.raises(KeyError, match="Did you mean 'vectorized'"):
        run(make_problem(4, 2, 3), "vectorised")


def test_triton_impl_without_triton_says_how_to_install(monkeypatch):
    monkeypatch.setattr(routing.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"needs the triton package"):
        run(make_problem(4, 2, 3), "triton")


@pytest.mark.triton
@pytest.mark.parametrize(
    ("n_experts", "k", "rank", "bias"), [(4, 2, 3, True), (3, 1, 1, False), (5, 3, 4, True)]
)
def test_triton_matches_dense_formula(n_experts, k, rank, bias):
    pytest.importorskip("triton")
    # 37 tokens and d_out = 20: partial token and feature blocks; d_in = 40 spans several BLOCK_D chunks.
    problem = make_problem(n_experts, k, rank, lead=(37,), d_in=40, d_out=20, bias=bias)
    y = run(problem, "triton")
    assert y.shape == (37, 20) and y.dtype == torch.float32
    torch.testing.assert_close(y, dense_mixture(**problem), **TOL[torch.float32])


@pytest.mark.triton
def test_triton_refuses_gradients_and_float64(monkeypatch):
    pytest.importorskip("triton")
    problem = make_problem(4, 2, 3, lead=(6,))
    problem["A"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="forward-only"):
        run(problem, "triton")
    with torch.no_grad():
        torch.testing.assert_close(run(problem, "triton"), dense_mixture(**problem), **TOL[torch.float32])
    with pytest.raises(ValueError, match="float64"):
        run(make_problem(4, 2, 3, torch.float64, lead=(6,)), "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        run(make_problem(4, 2, 3, lead=(6,)), "triton")


@pytest.mark.parametrize("softmax_first", [True, False])
def test_top_k_route_renormalized_weights_sum_to_one(softmax_first):
    logits = torch.randn(2, 7, 6)
    weights, indices = top_k_route(logits, 3, renormalize=True, softmax_first=softmax_first)
    assert weights.shape == indices.shape == (2, 7, 3) and indices.dtype == torch.long
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 7))
    assert (weights[..., :-1] >= weights[..., 1:]).all()


def test_top_k_route_variants_against_formulas():
    logits = torch.randn(4, 9, 8)
    top_logits, top_indices = logits.topk(3)  # random logits: no ties, so topk's order is well defined
    # Softmax over the kept logits (Arrow) == softmax over all, top-k, renormalised (SMILE, PHATGOOSE).
    arrow = top_k_route(logits, 3, renormalize=True, softmax_first=False)
    renormalized = top_k_route(logits, 3, renormalize=True, softmax_first=True)
    for weights, indices in (arrow, renormalized):
        torch.testing.assert_close(weights, top_logits.softmax(-1))
        assert torch.equal(indices, top_indices)
    # Not renormalised (compatible_specialization): the full softmax's probabilities at the top k.
    weights, indices = top_k_route(logits, 3, renormalize=False)
    torch.testing.assert_close(weights, logits.softmax(-1).gather(-1, top_indices))
    assert torch.equal(indices, top_indices)


def test_top_k_route_breaks_ties_toward_lowest_index_and_keeps_dtype():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]], dtype=torch.float16)
    for softmax_first in (True, False):
        weights, indices = top_k_route(logits, 2, renormalize=True, softmax_first=softmax_first)
        assert indices.tolist() == [[1, 2], [0, 1]]
        assert weights.dtype == torch.float16
        torch.testing.assert_close(weights, torch.full((2, 2), 0.5, dtype=torch.float16))


def test_top_k_route_rejects_bad_k_and_meaningless_flags():
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        top_k_route(torch.randn(2, 4), 5, renormalize=True)
    with pytest.raises(ValueError, match="always sum to 1"):
        top_k_route(torch.randn(2, 4), 2, renormalize=False, softmax_first=False)


def test_experts_b_rows_keeps_values_and_lets_dense_read_b_without_a_copy():
    from common.routing import experts_b_rows

    g = torch.Generator().manual_seed(0)
    B = torch.randn(4, 6, 3, generator=g)
    rows = experts_b_rows(B)
    assert torch.equal(rows, B)
    flat = rows.transpose(1, 2).reshape(12, 6)  # what `_dense` multiplies by
    assert flat.data_ptr() == rows.data_ptr()  # a view, not a copy
    assert B.transpose(1, 2).reshape(12, 6).data_ptr() != B.data_ptr()  # the plain layout copies
    x, A = torch.randn(5, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    w, idx = top_k_route(torch.randn(5, 4, generator=g), 2, renormalize=True)
    for impl in ("dense", "grouped", "reference"):
        torch.testing.assert_close(
            routed_lowrank(x, A, rows, w, idx, impl=impl), routed_lowrank(x, A, B, w, idx, impl=impl)
        )
    assert rows.to(torch.float64).transpose(1, 2).is_contiguous()  # `.to` keeps the layout
