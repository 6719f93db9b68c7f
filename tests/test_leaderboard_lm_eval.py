"""leaderboard.lm_eval_check on a micro zoo: each entry's model, rebuilt with the hyperparameters it chose,
gets from lm-eval the held-out accuracy the leaderboard wrote."""

from __future__ import annotations

import dataclasses
import json

import pytest

from common.io import read_json
from leaderboard import lm_eval_check, run
from tests.test_zoo import MICRO, micro_context

SETTINGS = dataclasses.replace(MICRO, sizes={"validation": 3, "test": 24})
LIBRARY = ("breast_cancer", "champ_category")
HELD_OUT = ("language_id_union", "translate_unseen")  # the generative one is not re-read


@pytest.mark.filterwarnings("ignore:.*inputs are longer than")
def test_lm_eval_reads_the_same_held_out_accuracy_for_each_entry(tmp_path):
    micro_context(LIBRARY, SETTINGS)  # trains the micro experts (seconds)
    results = {
        r["entry"]: r
        for r in run.run([0], ["base", "task_arithmetic"], tmp_path, SETTINGS, LIBRARY, HELD_OUT)
    }
    record = lm_eval_check.run_checks(
        [0], ["base", "task_arithmetic"], tmp_path, HELD_OUT, SETTINGS, LIBRARY
    )[0]
    assert record == read_json(tmp_path / "lm_eval" / "seed_0.json")
    for name in ("base", "task_arithmetic"):
        rows = record["entries"][name]["tasks"]
        assert list(rows) == ["language_id_union"]
        assert rows["language_id_union"]["ours"] == results[name]["test"]["language_id_union"]
        assert rows["language_id_union"]["lm_eval"] == pytest.approx(rows["language_id_union"]["ours"])
    assert record["max_abs_difference"] == pytest.approx(0.0)
    assert record["entries"]["task_arithmetic"]["provenance"]["seed"] == 0
    stale = {k: v for k, v in results["base"].items() if k != "models"}  # not known to be on these experts
    (tmp_path / "seed_0" / "base.json").write_text(json.dumps(stale))
    with pytest.raises(SystemExit, match=r"results for \['base'\] were not computed on the cached experts"):
        lm_eval_check.run_checks([0], ["base"], tmp_path, HELD_OUT, SETTINGS, LIBRARY)


def test_a_missing_or_stale_result_is_refused_with_the_command(tmp_path):
    with pytest.raises(SystemExit, match=r"run `python -m leaderboard.run --seeds 0 --entries base` first"):
        lm_eval_check.run_checks([0], ["base"], tmp_path, HELD_OUT, SETTINGS, LIBRARY)
    (tmp_path / "seed_0").mkdir()
    (tmp_path / "seed_0" / "base.json").write_text('{"entry": "base", "zoo_settings": {"rank": 99}}')
    with pytest.raises(SystemExit, match="other zoo settings"):
        lm_eval_check.run_checks([0], ["base"], tmp_path, HELD_OUT, SETTINGS, LIBRARY)
