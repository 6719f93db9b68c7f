"""Fisher and Gram collection against slow per-example references on the micro T5; (IA)^3 at init."""

import pytest
import torch
from torch import nn

from projects.mats.metadata import INPUT_MASK_MODULES, answers, fisher, gram_matrices
from projects.mats.model import build, encode, merged_parameters, state_of

EXAMPLES = [
    {"question": "Problem: two apples and three pears", "choices": ["eng", "fra"], "label": 0},
    {"question": "Problem: deux", "choices": ["eng", "fra"], "label": 1},
    {
        "question": "Problem: tres manzanas y un poco de pan con queso",
        "choices": ["spa", "ita", "por"],
        "label": 0,
    },
    {"question": "Is it?", "choices": ["yes", "no"], "label": 1},
]


def _cfg(fmt):
    return {"base": "t5", "scale": "micro", "format": fmt, "max_source_len": 64}


@pytest.fixture(scope="module")
def full():
    torch.manual_seed(0)
    model, tok = build(_cfg("full_model"))
    return model, tok


def _batch(tok, ex, target=None):
    return encode(
        tok, [ex["question"]], [target or ex["choices"][ex["label"]]], encoder_decoder=True, max_source_len=64
    )


def test_diagonal_fisher_matches_per_example_reference(full):
    model, tok = full
    params = merged_parameters(model, "full_model")
    got = fisher(model, tok, EXAMPLES, params, kind="diagonal", max_source_len=64)
    ref = {k: torch.zeros_like(p) for k, p in params.items()}
    model.eval()
    for ex in EXAMPLES:
        b = _batch(tok, ex)
        # transformers' own loss is the mean target-token NLL, i.e. −log p as MaTS defines it.
        loss = model(**b).loss
        for k, g in zip(params, torch.autograd.grad(-loss, list(params.values()))):
            ref[k] += g**2
    for k in ref:
        torch.testing.assert_close(got[k], ref[k] / len(EXAMPLES), atol=1e-9, rtol=1e-4)
    assert got["lm_head.weight"].abs().sum() > 0


def test_blockwise_fisher_diagonal_is_the_diagonal_fisher():
    model, tok = build(_cfg("ia3"))
    params = merged_parameters(model, "ia3")
    assert params and all("ia3_l" in k for k in params)
    diag = fisher(model, tok, EXAMPLES, params, kind="diagonal", max_source_len=64)
    block = fisher(model, tok, EXAMPLES, params, kind="blockwise", max_source_len=64)
    for k, p in params.items():
        assert block[k].shape == (p.numel(), p.numel())
        torch.testing.assert_close(torch.diagonal(block[k]), diag[k].reshape(-1), atol=1e-10, rtol=1e-5)
        torch.testing.assert_close(block[k], block[k].T)


def test_gram_matrices_match_per_example_reference(full):
    model, tok = full
    G, H = gram_matrices(model, tok, EXAMPLES, batch_size=3, max_source_len=64)  # batches with padding
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    refG = {n: torch.zeros_like(g) for n, g in G.items()}
    refH = {n: torch.zeros_like(h) for n, h in H.items()}
    n_enc = n_dec = 0
    model.eval()
    for ex in EXAMPLES:
        b = _batch(tok, ex)  # one example: no padding, every position counts
        n_enc += b["input_ids"].shape[1]
        n_dec += b["labels"].shape[1]
        seen = {}

        def keep(name, seen=seen):
            def hook(mod, inputs, output):
                output.retain_grad()
                seen[name] = (inputs[0].detach()[0], output)

            return hook

        handles = [m.register_forward_hook(keep(n)) for n, m in linears.items()]
        (-model(**b).loss).backward()
        model.zero_grad()
        for h in handles:
            h.remove()
        for n, (x, out) in seen.items():
            refG[n] += x.T @ x
            if n in refH:
                refH[n] += out.grad[0].T @ out.grad[0]
    assert "lm_head" in G and "lm_head" not in H
    for n in G:
        count = n_enc if INPUT_MASK_MODULES.fullmatch(n) else n_dec
        torch.testing.assert_close(G[n], refG[n] / count, atol=1e-6, rtol=1e-4)
        if n in H:
            torch.testing.assert_close(H[n], refH[n] / count, atol=1e-9, rtol=1e-4)
    assert INPUT_MASK_MODULES.fullmatch("decoder.block.0.layer.1.EncDecAttention.k")
    assert not INPUT_MASK_MODULES.fullmatch("decoder.block.0.layer.1.EncDecAttention.q")


def test_ia3_at_init_leaves_outputs_unchanged(full):
    model, tok = full
    ia3, _ = build(_cfg("ia3"))
    assert all(torch.all(v == 1) for v in state_of(ia3, "ia3").values())
    b = _batch(tok, EXAMPLES[2])
    model.eval()
    ia3.eval()
    with torch.no_grad():
        torch.testing.assert_close(ia3(**b).logits, model(**b).logits)


def test_true_fisher_samples_choices_deterministically(full):
    model, tok = full
    a = answers(model, tok, EXAMPLES * 3, true_fisher=True, seed=3, max_source_len=64)
    assert a == answers(model, tok, EXAMPLES * 3, true_fisher=True, seed=3, max_source_len=64)
    assert all(y in ex["choices"] for y, ex in zip(a, EXAMPLES * 3))
    assert answers(model, tok, EXAMPLES, true_fisher=False, seed=0, max_source_len=64) == [
        "eng",
        "fra",
        "spa",
        "no",
    ]


def test_metadata_errors(full):
    model, tok = full
    with pytest.raises(ValueError, match="unknown Fisher approximation"):
        fisher(model, tok, EXAMPLES, merged_parameters(model, "full_model"), kind="kfac")
    with pytest.raises(ValueError, match="at least one example"):
        gram_matrices(model, tok, [])


@pytest.mark.parametrize(
    ("base", "fmt", "kind"),
    [("t5", "ia3", "blockwise"), ("t5", "full_model", "diagonal"), ("gpt_neo", "full_model", "diagonal")],
)
def test_batched_fisher_equals_the_per_example_loop(base, fmt, kind):
    # batch_size=3 pads examples of different lengths (encoder, decoder and, for GPT-Neo, the causal mask);
    # batch_size=1 is the plain loop with one backward per example. Tolerance: float32 rounding of padded
    # vs unpadded attention, so entries are compared at 1e-4 relative or 1e-5 of the largest entry (off-diagonal
    # blockwise entries cancel: measured 2.5e-10 absolute on entries ~1e-4 of the largest).
    torch.manual_seed(0)
    model, tok = build({"base": base, "scale": "micro", "format": fmt, "max_source_len": 64})
    params = merged_parameters(model, fmt)
    loop = fisher(model, tok, EXAMPLES, params, kind=kind, max_source_len=64, batch_size=1)
    batched = fisher(model, tok, EXAMPLES, params, kind=kind, max_source_len=64, batch_size=3)
    assert sum(v.abs().sum() for v in loop.values()) > 0
    for k in loop:
        scale = float(loop[k].abs().max())
        torch.testing.assert_close(batched[k], loop[k], atol=1e-5 * scale + 1e-12, rtol=1e-4)


def test_fisher_rejects_a_bad_batch_size(full):
    model, tok = full
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        fisher(model, tok, EXAMPLES, merged_parameters(model, "full_model"), batch_size=0)


def test_fisher_caps_the_batch_by_gradient_memory(full, monkeypatch):
    import projects.mats.metadata as metadata

    model, tok = full
    params = merged_parameters(model, "full_model")
    size = sum(p.numel() * p.element_size() for p in params.values())
    seen = []
    real = metadata._vmap_grads
    monkeypatch.setattr(
        metadata, "_vmap_grads", lambda m, b, p: seen.append(len(b["input_ids"])) or real(m, b, p)
    )
    monkeypatch.setattr(metadata, "FISHER_GRAD_BUDGET", 2 * size)  # room for two examples' gradients
    fisher(model, tok, EXAMPLES, params, batch_size=8, max_source_len=64)
    assert seen == [2, 2]
