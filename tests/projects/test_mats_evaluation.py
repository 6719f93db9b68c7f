"""The encoder-once rank classification of `experiment.evaluate` against `common.evaluation`'s reference."""

import pytest
import torch

from common.evaluation import rank_classification
from projects.mats.experiment import choice_log_likelihoods, evaluate
from projects.mats.merge_run import lambdas
from projects.mats.model import build, encode, example_log_probs, merged_parameters

EXAMPLES = [
    {"question": "Problem: two apples and three pears", "choices": ["eng", "fra"], "label": 0},
    {"question": "Problem: deux", "choices": ["eng", "fra", "deu"], "label": 1},
    {"question": "Problem: tres manzanas y un poco de pan con queso", "choices": ["spa", "ita"], "label": 0},
    {"question": "Is it?", "choices": ["yes", "no", "maybe not", "x"], "label": 1},
    {"question": "Which one, the long or the short answer?", "choices": ["a long answer", "s"], "label": 0},
]


def _cfg(fmt, max_source_len=512, batch_size=2, length_normalization=False):
    return {
        "model": {"base": "t5", "scale": "micro", "format": fmt, "max_source_len": max_source_len},
        "eval_run": {"eval_batch_size": batch_size, "length_normalization": length_normalization},
    }


@pytest.fixture(scope="module", params=["full_model", "ia3"])
def model(request):
    torch.manual_seed(0)
    model, tok = build(_cfg(request.param)["model"])
    with torch.no_grad():  # move (IA)^3 away from 1 so that the adapters matter
        for p in merged_parameters(model, request.param).values():
            p.add_(0.5 * torch.randn_like(p))
    return model, tok


def _reference(model, tok, examples, length_normalize=False):
    return rank_classification(
        model,
        tok,
        [ex["question"] for ex in examples],
        [[" " + c for c in ex["choices"]] for ex in examples],
        [ex["label"] for ex in examples],
        length_normalize=length_normalize,
        append_eos=True,
        batch_size=3,
        disable=True,
    )


@pytest.mark.parametrize("batch_size", [1, 2, 32])
def test_scores_match_rank_classification(model, batch_size):
    model, tok = model
    ours = choice_log_likelihoods(model, tok, EXAMPLES, max_source_len=512, batch_size=batch_size)
    ref = _reference(model, tok, EXAMPLES)["scores"]
    for a, b in zip(ours, ref):
        assert a == pytest.approx(b, abs=1e-4)


@pytest.mark.parametrize("length_normalization", [False, True])
def test_accuracy_matches_rank_classification(model, length_normalization):
    model, tok = model
    cfg = _cfg("full_model", length_normalization=length_normalization)
    scores = evaluate(model, tok, {"a": EXAMPLES[:3], "b": EXAMPLES[3:]}, cfg)
    ref_a = _reference(model, tok, EXAMPLES[:3], length_normalization)["accuracy"]
    ref_b = _reference(model, tok, EXAMPLES[3:], length_normalization)["accuracy"]
    assert scores == pytest.approx({"a": ref_a, "b": ref_b, "average": (ref_a + ref_b) / 2})


def test_questions_are_truncated_as_in_training(model):
    # The scores are the (summed) training log-likelihoods of each choice, on the same truncated input.
    model, tok = model
    ours = choice_log_likelihoods(model, tok, EXAMPLES, max_source_len=4, batch_size=2)
    model.eval()
    with torch.no_grad():
        for ex, row in zip(EXAMPLES, ours):
            batch = encode(
                tok,
                [ex["question"]] * len(ex["choices"]),
                ex["choices"],
                encoder_decoder=True,
                max_source_len=4,
            )
            assert row == pytest.approx(example_log_probs(model, batch, reduction="sum").tolist(), abs=1e-4)


def test_lambda_grid():
    assert lambdas(None) == [round(0.1 * i, 1) for i in range(11)]  # the original's sweep
    assert lambdas(-1, 0.2) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert lambdas(0.3, 0.2) == [0.3]
    with pytest.raises(ValueError, match="does not divide 1"):
        lambdas(None, 0.3)
