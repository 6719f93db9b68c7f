"""Configs resolve, paper configs fit the paper model (on meta), and tied-A training shares one lora_A."""

import pytest
import torch
from peft import get_peft_model

from common.adapters import lora_config, lora_factors
from common.config import ConfigError, load_config
from common.models import build_meta
from projects.mbc_arrow.main import DEFAULTS
from projects.mbc_arrow.train_expert import peft_targets, tie_lora_a

CONFIGS = ["paper_gptneo_125m", "paper_phi2", "tiny_notebook", "real_notebook", "micro_notebook"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_resolves(name):
    cfg = load_config(DEFAULTS, [f"projects/mbc_arrow/configs/{name}.yaml"], ["top_k=3"])
    assert cfg["top_k"] == 3 and cfg["lora_rank"] >= 1


def test_unknown_key_names_close_match():
    with pytest.raises(ConfigError, match="top_k"):
        load_config(DEFAULTS, [], ["topk=4"])


def test_paper_gptneo_config_adapts_qkv_of_every_layer_on_meta():
    cfg = load_config(DEFAULTS, ["projects/mbc_arrow/configs/paper_gptneo_125m.yaml"])
    model = build_meta(cfg["base_model"])
    lcfg = lora_config("gpt_neo", r=cfg["lora_rank"], alpha=cfg["lora_alpha"])
    lcfg.target_modules = peft_targets(cfg["modify_layers"])
    pm = get_peft_model(model, lcfg)
    names = [
        n for n, _ in pm.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj")) and "lora" not in n
    ]
    assert len(names) == 12 * 3
    assert peft_targets(".*dense|.*q_proj") == ".*dense|.*q_proj"  # Phi-2's regex goes to peft as a regex


def test_tied_lora_a_is_one_parameter_per_layer():
    from projects.mbc_arrow.expert_model import load_base

    model, _ = load_base("micro:gpt_neo")
    pm = get_peft_model(model, lora_config("gpt_neo", r=2, init_lora_weights=False))
    n_untied = sum(p.numel() for n, p in pm.named_parameters() if "lora_A" in n)
    assert tie_lora_a(pm, "q_proj.lora_a|k_proj.lora_a|v_proj.lora_a") == 2  # 2 micro layers
    f = lora_factors(pm)
    attn = "base_model.model.transformer.h.0.attn.attention"
    assert torch.equal(f[f"{attn}.q_proj"].A, f[f"{attn}.v_proj"].A)
    n_a = sum(p.numel() for n, p in pm.named_parameters() if "lora_A" in n)
    assert 3 * n_a == n_untied  # parameters() deduplicates: one A per layer instead of three


# -- the paper's zero-shot table and FLAN library (issue 19) -----------------------------------------------
PAPER_TABLE = [
    "arc_challenge", "arc_easy", "boolq", "hellaswag", "humaneval",
    "mbpp", "openbookqa", "piqa", "bbh_fewshot", "winogrande",
]  # fmt: skip


def _paper_phi2(*overrides):
    return load_config(DEFAULTS, ["projects/mbc_arrow/configs/paper_phi2.yaml"], list(overrides))


def test_paper_phi2_names_the_ten_lm_eval_tasks_and_the_256_flan_tasks():
    from projects.mbc_arrow.tasks import FLAN_IDS, PAPER_ZERO_SHOT, downstream_tasks

    cfg = _paper_phi2("allow_code_execution=true")
    assert downstream_tasks(cfg) == PAPER_TABLE == list(PAPER_ZERO_SHOT)
    tasks = cfg["tasks"]
    assert len(tasks) == len(set(tasks)) == 256 and FLAN_IDS[cfg["dataset"]] == "sordonia/flan-10k-flat"
    # the library leaves out the FLAN copies of the evaluation tasks (mttl's flan256 = flan264 less them)
    held_out = ("ai2_arc", "bool_q", "hellaswag", "openbookqa", "piqa", "winogrande")
    assert not [t for t in tasks if t.startswith(held_out)]
    assert {"glue_sst2_2_0_0", "squad_v1_1_3_0_0", "cot_gsm8k", "wiki_hop_original_explain_relation"} <= set(
        tasks
    )


def test_paper_scale_no_longer_falls_back_to_the_tiny_task():
    from projects.mbc_arrow.tasks import downstream_tasks

    assert DEFAULTS["downstream_task"] == "tweet_sentiment_other"  # the tiny default
    with pytest.raises(ValueError, match=r"offline tiny task .* at paper\s+scale name lm-eval tasks"):
        downstream_tasks(_paper_phi2("downstream_task=[tweet_sentiment_other]"))
    micro = load_config(DEFAULTS, ["projects/mbc_arrow/configs/micro_notebook.yaml"])
    assert downstream_tasks(micro) == ["tweet_sentiment_other"]


def test_code_tasks_run_only_when_allowed():
    from projects.mbc_arrow.tasks import downstream_tasks

    with pytest.raises(ValueError, match=r"\['humaneval', 'mbpp'\].*allow_code_execution=true"):
        downstream_tasks(_paper_phi2())
    assert downstream_tasks(_paper_phi2("downstream_task=[arc_easy,piqa]")) == ["arc_easy", "piqa"]


def test_paper_downstream_evaluates_lm_eval_builtin_tasks(monkeypatch):
    """The paper-scale downstream step asks lm-eval for its own tasks (not the local tiny file) and
    reports each task's headline metric and their mean."""
    from projects.mbc_arrow import evaluators

    seen = {}
    fake = {t: {"acc": 0.1 * i, "acc_stderr": 0.01} for i, t in enumerate(PAPER_TABLE)}
    fake["humaneval"] = {"pass@1": 0.25, "alias": "humaneval"}
    fake["mbpp"] = {"pass_at_1": 0.5}
    fake["bbh_fewshot"] = {"exact_match": 0.3}

    def fake_eval(model, tokenizer, tasks, **kw):
        seen.update(tasks=tasks, **kw)
        return fake

    monkeypatch.setattr(evaluators, "evaluate_in_memory", fake_eval)
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    scores = evaluators.downstream_scores(
        None, None, _paper_phi2("allow_code_execution=true", "downstream_limit=5")
    )
    assert seen["tasks"] == PAPER_TABLE and seen["builtin_tasks"] and seen["confirm_run_unsafe_code"]
    assert seen["limit"] == 5
    expected = {t: fake[t].get("acc") for t in PAPER_TABLE} | {
        "humaneval": 0.25,
        "mbpp": 0.5,
        "bbh_fewshot": 0.3,
    }
    assert {k: v for k, v in scores.items() if k != "average"} == pytest.approx(expected)
    assert scores["average"] == pytest.approx(sum(expected.values()) / 10)
    import os

    assert os.environ["HF_ALLOW_CODE_EVAL"] == "1"


def test_headline_metric_names_what_is_missing():
    from projects.mbc_arrow.evaluators import headline

    with pytest.raises(KeyError, match=r"none of .*acc.* in lm-eval's metrics \['f1'\]"):
        headline({"f1": 0.5})


def test_gptneo_config_reads_the_notebooks_flan_debug_data(monkeypatch):
    """gptneo_125m_fast.json's `dataset: sordonia/flan-debug-flat`, read through common.data by that id."""
    from datasets import Dataset, DatasetDict

    from projects.mbc_arrow import tasks as T

    cfg = load_config(DEFAULTS, ["projects/mbc_arrow/configs/paper_gptneo_125m.yaml"])
    assert cfg["dataset"] == "sordonia/flan-debug-flat" and cfg["downstream_task"] == "arc_easy"
    assert T.downstream_tasks(cfg) == ["arc_easy"]
    asked = []

    def fake_load(name, **kw):
        asked.append((name, kw["task_names"]))
        rows = [{"task": t, "source": f"q {t}", "target": "a"} for t in kw["task_names"]]
        return DatasetDict({s: Dataset.from_list(rows) for s in ("train", "validation", "test")}), {}

    monkeypatch.setattr(T, "load", fake_load)
    data = T.task_data(cfg["tasks"][:2], dataset=cfg["dataset"])
    assert asked == [("sordonia/flan-debug-flat", cfg["tasks"][:2])] and len(data["test"]) == 2
    from common.data import DATASETS

    assert "sordonia/flan-debug-flat" in DATASETS


@pytest.mark.slow
def test_paper_table_tasks_exist_in_lm_evals_index():
    """lm-eval's own task index (offline, ~10 s of indexing) holds every task the paper config names."""
    from lm_eval.tasks import TaskManager

    assert set(PAPER_TABLE) <= set(TaskManager().all_tasks)
