"""The zoo's classification tasks through lm-eval: the same per-choice log-likelihoods and accuracy as
`zoo.score`'s rank classification on the same model and records."""

from __future__ import annotations

import dataclasses
import json

import pytest

from common import zoo, zoo_lm_eval
from common.evaluation import sequence_logprobs
from common.lm_eval_bridge import run_lm_eval
from tests.test_zoo import MICRO

SETTINGS = dataclasses.replace(MICRO, sizes={"validation": 3, "test": 24})
TASKS = ["sentiment_deflategate", "language_id_union"]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return zoo.load_base(SETTINGS)


@pytest.mark.filterwarnings("ignore:.*inputs are longer than")
def test_lm_eval_scores_the_zoo_records_as_zoo_score_does(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    names = zoo_lm_eval.write_tasks(TASKS, "test", tmp_path, SETTINGS)
    assert names == ["zoo_sentiment_deflategate", "zoo_language_id_union"]
    raw = run_lm_eval(model, tok, names, include_path=tmp_path, log_samples=True)
    for task, name in zip(TASKS, names):
        records = zoo.splits(task, SETTINGS)["test"]
        samples = sorted(raw["samples"][name], key=lambda s: s["doc_id"])
        assert len(samples) == len(records) == 24
        theirs = [ll for s in samples for ll, _ in s["filtered_resps"]]
        pairs = [(r["source"], " " + c) for r in records for c in r["choices"]]
        ours = sequence_logprobs(model, tok, *zip(*pairs), disable=True)
        assert theirs == pytest.approx([s.logprob for s in ours], abs=1e-4)
        accuracy = sum(s["acc"] for s in samples) / len(samples)
        assert accuracy == pytest.approx(zoo.score(model, tok, records))
        assert 0 < accuracy < 1 or task == "language_id_union"  # a random model: not all one answer


@pytest.mark.filterwarnings("ignore:.*inputs are longer than")
def test_lm_eval_accuracy_and_the_task_files(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    scores = zoo_lm_eval.lm_eval_accuracy(model, tok, TASKS, "test", tmp_path, SETTINGS)
    for task in TASKS:
        assert scores[task] == pytest.approx(zoo.score(model, tok, zoo.splits(task, SETTINGS)["test"]))
    first = json.loads((tmp_path / "zoo_sentiment_deflategate.jsonl").read_text().splitlines()[0])
    assert set(first) == {"source", "choices", "label"} and first["choices"][first["label"]]


def test_generation_tasks_are_refused_and_skipped_by_the_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="Rouge-L"):
        zoo_lm_eval.write_tasks(["translate_unseen"], "test", tmp_path, SETTINGS)
    zoo_lm_eval.main(["--tasks", "translate_unseen", "sentiment_deflategate", "--out", str(tmp_path / "t")])
    assert "generation tasks skipped: ['translate_unseen']" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "zoo_sentiment_deflategate.jsonl",
        "zoo_sentiment_deflategate.yaml",
    ]
    with pytest.raises(SystemExit):
        zoo_lm_eval.main(["--tasks", "nope", "--out", str(tmp_path)])
