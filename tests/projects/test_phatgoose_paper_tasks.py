"""Paper-scale datasets without the hub: the original's expert settings and order, P3 template selection and
pooling, BIG-bench records, and scoring of generative and several-correct-answer rows."""

from __future__ import annotations

import gin
import pytest
from datasets import Dataset, DatasetDict

from projects.phatgoose import configurables as C
from projects.phatgoose import paper_tasks as PT
from projects.phatgoose.configurables import CONFIGS


def test_expert_settings_follow_the_original_concatenate_order():
    s = PT.PAPER_SETTINGS
    assert [len(s[k]) for k in ("P3", "Flanv2", "Niv2", "Add1", "All", "P3flanv2", "Full")] == [
        36,
        36,
        75,
        19,
        147,
        72,
        166,
    ]
    full = s["Full"]
    assert len(set(full)) == 166
    # expert i of a concatenated / released checkpoint (scripts/concatenate.py's dict order)
    assert (full[0], full[9], full[35]) == ("P3AGNEWS", "P3SOCIALIQA", "P3DBPEDIA14")
    assert (full[36], full[71]) == ("FLAN2021AI2ARCEASY/ZS", "FLAN2021WORDSEGMENT/ZS")
    assert (full[72], full[146]) == ("NIV2TRANSLATION/ZS", "NIV2MISC/ZS")
    assert (full[147], full[154], full[165]) == (
        "P3WSCFIXED",
        "DIALOGQRECC/ZS",
        "FLAN2021WMT14TRANSLATEFREN/ZS",
    )
    assert all(name in PT.P3_SOURCES for name in s["P3"])


def test_heldout_suites_have_the_papers_sizes_and_loaders():
    from projects.phatgoose.tasks import DATASETS

    assert (len(PT.T0_HELDOUT), len(PT.BBH), len(PT.BBLITE)) == (11, 22, 17)
    assert set(PT.BBH) & set(PT.BBLITE) == {"BBFORMALFALLACIES", "BBLOGICALDEDUCTION"}
    assert all(name in DATASETS for name in (*PT.T0_HELDOUT, *PT.BBH, *PT.BBLITE))
    assert not set(PT.T0_HELDOUT) & set(PT.PAPER_SETTINGS["P3"])  # held out of the P3 setting


def test_paper_gin_binds_the_three_suites_and_setting_names_resolve_by_scale():
    from projects.phatgoose import procedures as P
    from projects.phatgoose.tasks import TINY_EXPERTS, dataset_name

    C.parse([CONFIGS / "paper_p3.gin"])
    try:
        for proc, suite in (
            ("P/EVALUATE/T0", PT.T0_HELDOUT),
            ("P/EVALUATE/BBH", PT.BBH),
            ("P/EVALUATE/BBLITE", PT.BBLITE),
        ):
            assert [dataset_name(d) for d in C.scoped(proc, C.eval_settings).datasets] == list(suite)
        assert P.expert_names("Full") == PT.PAPER_SETTINGS["Full"]
        assert P.expert_names("P3") == list(PT.P3_EXPERTS)
        with pytest.raises(KeyError, match="unknown dataset setting"):
            P.expert_names("P4")
        C.parse([CONFIGS / "micro.gin"], ["DatasetSetting.experts=[]"])
        assert P.expert_names("Full") == list(TINY_EXPERTS)
    finally:
        gin.clear_config()


def test_dataset_names_with_sub_scopes():
    from projects.phatgoose.tasks import dataset_name

    assert dataset_name("D/P3ANLI/R1/EVAL") == "P3ANLI/R1"
    assert dataset_name("FLAN2021BOOLQ/ZS") == "FLAN2021BOOLQ/ZS"
    assert dataset_name("D/P3RTE/EVAL") == "P3RTE"
    with pytest.raises(ValueError, match="cannot read a dataset name"):
        dataset_name("D/EVAL")


def test_p3_templates_selects_one_dataset_without_score_eval_variants():
    configs = [
        "super_glue_rte_GPT_3_style",
        "super_glue_rte_GPT_3_style_score_eval",
        "super_glue_rte_can_we_infer",
        "super_glue_rtex_other",
        "anli_GPT_3_style_r1",
        "anli_GPT_3_style_r1_score_eval",
        "anli_GPT_3_style_r2",
        "anli_can_we_infer_r1",
    ]
    assert PT.p3_templates("super_glue_rte", config_names=configs) == [
        "super_glue_rte_GPT_3_style",
        "super_glue_rte_can_we_infer",
    ]
    assert PT.p3_templates("anli", "_r1", configs) == ["anli_GPT_3_style_r1", "anli_can_we_infer_r1"]
    with pytest.raises(ValueError, match="no bigscience/P3 config"):
        PT.p3_templates("hotpot_qa_fullwiki", config_names=configs)


def test_p3_dataset_pools_every_template_and_maps_the_eval_split():
    def rows(config, split, n):
        return Dataset.from_dict(
            {"source": [f"{config} {split} {i}" for i in range(n)], "label": list(range(n))}
        )

    def load(config):  # ANLI's eval splits are dev_r1/2/3
        return DatasetDict({"train": rows(config, "train", 3), "dev_r1": rows(config, "dev", 2)})

    configs = ["anli_a_r1", "anli_b_r1", "anli_a_r2", "super_glue_rte_a"]
    out = PT.p3_dataset("P3ANLI/R1", load=load, config_names=configs, include_templates="all")
    assert sorted(out) == ["test", "train", "validation"]
    assert len(out["train"]) == 6 and len(out["test"]) == 4
    assert out["test"]["template"] == ["anli_a_r1"] * 2 + ["anli_b_r1"] * 2
    assert out["test"]["source"][2] == "anli_b_r1 dev 0"


def test_t0_heldout_evaluates_original_task_templates_round_robin():
    # HellaSwag: 2 original-task templates kept, 2 others (promptsource original_task: false) dropped from
    # evaluation; example j is scored with template j mod 2 (as the original's include_templates="original").
    def load(config):
        rows = {"source": [f"{config} {i}" for i in range(5)], "label": list(range(5))}
        return DatasetDict({"train": Dataset.from_dict(rows), "validation": Dataset.from_dict(rows)})

    configs = [
        "hellaswag_Appropriate_continuation_Yes_or_No",
        "hellaswag_Predict_ending_with_hint",
        "hellaswag_complete_first_then",
        "hellaswag_how_ends",
    ]
    out = PT.p3_dataset("P3HSWAG", load=load, config_names=configs)
    assert len(out["train"]) == 20  # training keeps every template
    assert out["test"]["source"] == [
        "hellaswag_Predict_ending_with_hint 0",
        "hellaswag_Predict_ending_with_hint 2",
        "hellaswag_Predict_ending_with_hint 4",
        "hellaswag_complete_first_then 1",
        "hellaswag_complete_first_then 3",
    ]
    pooled = PT.p3_dataset("P3HSWAG", load=load, config_names=configs, include_templates="all")
    assert len(pooled["test"]) == 20
    with pytest.raises(ValueError, match="include_templates"):
        PT.p3_dataset("P3HSWAG", load=load, config_names=configs, include_templates="some")


def test_bigbench_records_multiple_choice_and_generative():
    rows = Dataset.from_dict(
        {
            "inputs": ["Q1", "Q2"],
            "targets": [["b"], ["c"]],
            "multiple_choice_targets": [["a", "b", "c"], ["a", "b", "c"]],
            "multiple_choice_scores": [[0, 1, 0], [0, 1, 1]],
        }
    )
    mc = PT.bigbench_records(rows, "t")
    assert mc["label"] == [1, 1] and mc["correct"] == [[1], [1, 2]] and mc["target"] == ["b", "b"]
    gen = PT.bigbench_records(
        Dataset.from_dict(
            {
                "inputs": ["2+2"],
                "targets": [["4", "four"]],
                "multiple_choice_targets": [[]],
                "multiple_choice_scores": [[]],
            }
        ),
        "t",
    )
    assert gen[0]["choices"] == [] and gen[0]["answers"] == ["4", "four"] and gen[0]["target"] == "4"
    bad = rows.map(lambda r: {"multiple_choice_scores": [0, 0, 0]})
    with pytest.raises(ValueError, match="without a correct choice"):
        PT.bigbench_records(bad, "t")


def test_evaluate_rows_counts_any_correct_choice_and_scores_generative_rows_by_exact_match(monkeypatch):
    from common.models import micro_model
    from projects.phatgoose import evaluate as E

    class Tok:
        bos_token_id, eos_token_id = None, 1

        def encode(self, text, add_special_tokens=True):
            return [2 + (ord(c) % 200) for c in text] + ([1] if add_special_tokens else [])

    model = micro_model("t5")
    # identical choices tie, and ties go to the first: prediction 0 for every row
    mc = [
        {"source": "q", "choices": ["x", "x"], "label": 1, "target": "x", "correct": [0, 1]},
        {"source": "r", "choices": ["x", "x"], "label": 1, "target": "x"},
    ]
    res = E.evaluate_rows(model, Tok(), mc, generation=False)
    assert res["predictions"] == ["x", "x"] and res["accuracy"] == 0.5  # row 1: only label 1 is correct

    monkeypatch.setattr(E, "generate", lambda model, tok, sources, n, **kw: ["Four", "5", "six"])
    gen = [
        {"source": "2+2", "choices": [], "label": -1, "target": "4", "answers": ["4", "four"]},
        {"source": "2+3", "choices": [], "label": -1, "target": "5"},
        {"source": "3+3", "choices": [], "label": -1, "target": "6", "answers": ["6"]},
    ]
    res = E.evaluate_rows(model, Tok(), gen)
    assert res["accuracy"] == res["exact_match"] == pytest.approx(2 / 3)
    assert "balanced_accuracy" not in res and res["predictions"] == ["Four", "5", "six"]
    with pytest.raises(ValueError, match="needs generation"):
        E.evaluate_rows(model, Tok(), gen, generation=False)
    with pytest.raises(ValueError, match="mix multiple-choice and generative"):
        E.evaluate_rows(model, Tok(), [mc[0], gen[0]])


def test_paper_datasets_fail_offline_naming_the_tiny_tasks():
    from common.data.hub import HubOffline
    from projects.phatgoose.tasks import load_task

    with pytest.raises(HubOffline, match="TINY_TASKS"):
        load_task("D/P3RTE/EVAL")
    with pytest.raises(HubOffline, match="TINY_TASKS"):
        load_task("D/BBSNARKS/EVAL")
