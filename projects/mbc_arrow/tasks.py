"""Expert tasks as text-to-text data, cluster unions, and the held-out multiple-choice task.

Tiny scale: the offline text tasks of `common.data` (two natural groups: tweet sentiment per topic, and
classification of other texts). Paper scale: FLAN tasks from `sordonia/flan-10k-flat` (mttl's data; the notebook's
`sordonia/flan-debug-flat` for GPT-Neo) and lm-eval's tasks for the zero-shot table.
Prompt format (both scales): mttl's "<source> <target>" + EOS (`prompt_format=mttl`), or our earlier
"<source>\\nAnswer:" then " <target>" + EOS (`prompt_format=answer`); the loss is on the target.
The held-out task (the notebook's Arc-Easy step): sentiment of tweets on none of the five topics, as
multiple choice through lm-eval; it shares no text with any expert task (checked with assert_disjoint_text).
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets

from common.data import DATASETS, assert_disjoint_text, load
from common.data.text_tasks import SENTIMENTS, records, tweet_key, tweets
from common.io import read_json, write_text
from common.tiny_world import PRETRAIN_SPLIT_SEED

TINY_TASKS = (
    "tweet_sentiment_airline",
    "tweet_sentiment_apple",
    "tweet_sentiment_coachella",
    "tweet_sentiment_deflategate",
    "tweet_sentiment_self_driving",
    "tweet_topic",
    "shakespeare_genre",
    "gsm_language_id",
    "champ_category",
)
HELDOUT_TASK = "tweet_sentiment_other"
# The paper's zero-shot table (Ostapenko et al. 2024, Table 2; mttl's `pipeline_eval_tasks=all` without
# MMLU) as lm-eval task names. mttl's BBH evaluator answers directly after few-shot examples, which is
# lm-eval's `bbh_fewshot` (its `bbh` group is chain-of-thought).
PAPER_ZERO_SHOT = (
    "arc_challenge",
    "arc_easy",
    "boolq",
    "hellaswag",
    "humaneval",
    "mbpp",
    "openbookqa",
    "piqa",
    "bbh_fewshot",
    "winogrande",
)
CODE_TASKS = ("humaneval", "mbpp")  # lm-eval scores these by executing the generated code
# mttl's `dataset` values: the FLAN library (<=10k examples per task) and the notebook's small copy.
FLAN_IDS = {"flan": "sordonia/flan-10k-flat", "sordonia/flan-10k-flat": "sordonia/flan-10k-flat"}
FLAN_IDS["sordonia/flan-debug-flat"] = "sordonia/flan-debug-flat"
FLAN_ID = FLAN_IDS["flan"]
PROMPT = "{source}\nAnswer:"
# How a (source, target) pair becomes a prompt and an answer: mttl's `source + " " + target + eos`
# (`DefaultCollator.add_space_and_eos`), or ours before, "<source>\nAnswer:" + " <target>" + eos.
PROMPT_FORMATS = ("mttl", "answer")


def prompt_and_answer(source: str, target: str, prompt_format: str = "mttl") -> tuple[str, str]:
    """(prompt, answer text before EOS). mttl: a trailing space of the source moves to the target (GPT-2-family
    BPE merges it with the next word), and a space separates them unless one side already has one."""
    if prompt_format == "answer":
        return f"{source}\nAnswer:", " " + target
    if prompt_format != "mttl":
        raise ValueError(f"prompt_format={prompt_format!r}: choose one of {PROMPT_FORMATS}")
    if source.endswith(" "):
        source, target = source[:-1], " " + target
    if not source.endswith((" ", "\n")) and target and not target.startswith((" ", "\n")):
        target = " " + target
    return source, target


def resolve_task_names(finetune_task_name: str, finetune_task_path: str | None = None) -> list[str]:
    """'t1,t2' -> [t1, t2]; with a clusters JSON (`finetune_task_path`), 'cluster_0' -> its tasks (as mttl)."""
    names = [t.strip() for t in str(finetune_task_name).split(",") if t.strip()]
    if not names:
        raise ValueError("finetune_task_name is empty")
    if not finetune_task_path:
        return names
    clusters = read_json(finetune_task_path)
    out = []
    for n in names:
        if n not in clusters:
            raise KeyError(f"{n!r} is not a cluster of {finetune_task_path}; clusters: {sorted(clusters)}")
        out += clusters[n]
    return out


def _subsample(ds: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or len(ds) <= n:
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def task_data(
    task_names: Sequence[str],
    *,
    dataset: str = "offline",
    max_train: int | None = None,
    max_eval: int | None = None,
) -> DatasetDict:
    """Train/validation/test (task, source, target) over the union of `task_names`, each task capped."""
    if dataset in FLAN_IDS:
        splits, _ = load(FLAN_IDS[dataset], task_names=list(task_names))
        per_task = {t: splits.filter(lambda x, t=t: x == t, input_columns="task") for t in task_names}
    elif dataset == "offline":
        unknown = [t for t in task_names if t not in DATASETS]
        if unknown:
            raise KeyError(f"unknown offline task(s) {unknown}; tiny tasks: {list(TINY_TASKS)}")
        per_task = {t: load(t, seed=PRETRAIN_SPLIT_SEED)[0] for t in task_names}
    else:
        raise ValueError(f"dataset must be 'offline' or one of {sorted(FLAN_IDS)}, got {dataset!r}")
    out = {}
    for split, cap in (("train", max_train), ("validation", max_eval), ("test", max_eval)):
        parts = [
            _subsample(d[split], cap, 42).select_columns(["task", "source", "target"])
            for d in per_task.values()
        ]
        out[split] = concatenate_datasets(parts)
    return DatasetDict(out)


def heldout_task(n: int = 300, seed: int = 0) -> Dataset:
    """Sentiment of tweets about none of the expert topics (multiple choice, classes balanced up to n/3 each);
    disjoint from every expert task."""
    t = tweets().to_dict()
    keep = [i for i, topic in enumerate(t["topic"]) if topic is None and t["sentiment"][i] in SENTIMENTS]
    random.Random(seed).shuffle(keep)
    # one tweet per retweet group, at most n/3 per sentiment (83% of these tweets are neutral)
    seen, texts, labels, per_label = set(), [], [], dict.fromkeys(SENTIMENTS, 0)
    for i in keep:
        key, label = tweet_key(t["text"][i]), t["sentiment"][i]
        if key not in seen and per_label[label] < n // 3:
            seen.add(key)
            per_label[label] += 1
            texts.append(t["text"][i])
            labels.append(label)
    return records(HELDOUT_TASK, "tweet_sentiment", texts, labels, SENTIMENTS, texts)


def downstream_tasks(cfg: Mapping[str, Any]) -> list[str]:
    """`downstream_task` as a list of names: ours offline (`tweet_sentiment_other`), or lm-eval task names
    (the paper's zero-shot table, `PAPER_ZERO_SHOT`; the notebook's `arc_easy`). A paper-scale run that
    names the offline task is refused: it would report a tiny task as the paper's table."""
    spec = cfg["downstream_task"]
    names = [spec] if isinstance(spec, str) else list(spec or [])
    if not names:
        raise ValueError("downstream_task is empty: name the held-out task(s)")
    if HELDOUT_TASK in names and (len(names) > 1 or cfg.get("scale") == "paper"):
        raise ValueError(
            f"downstream_task={spec!r}: {HELDOUT_TASK!r} is the offline tiny task and runs alone; at paper "
            f"scale name lm-eval tasks, e.g. downstream_task=[{','.join(PAPER_ZERO_SHOT)}]"
        )
    code = sorted(set(names) & set(CODE_TASKS))
    if code and not cfg.get("allow_code_execution"):
        raise ValueError(
            f"downstream_task includes {code}, which lm-eval scores by running the generated code: "
            "set allow_code_execution=true to run it (in a sandbox you trust), or leave them out"
        )
    return names


def downstream_task(name: str, n: int) -> Dataset:
    """Our offline held-out multiple-choice task as data (the lm-eval tasks are read by lm-eval itself)."""
    if name != HELDOUT_TASK:
        raise KeyError(f"{name!r} is not the offline held-out task {HELDOUT_TASK!r}")
    return heldout_task(n)


def check_heldout(heldout: Dataset, task_names: Sequence[str]) -> None:
    """AssertionError if the held-out task shares a text with any (offline) expert task."""
    for name in task_names:
        assert_disjoint_text(load(name, seed=PRETRAIN_SPLIT_SEED)[0], heldout, "input")


def write_heldout_task(task_dir: str | os.PathLike, heldout: Dataset) -> dict[str, Any]:
    """The held-out task as a local jsonl + lm-eval task config (multiple choice, accuracy)."""
    from common.lm_eval_bridge import task_config

    name = heldout[0]["task"]
    data = Path(task_dir) / f"{name}.jsonl"
    rows = heldout.select_columns(["source", "choices", "label"]).to_pandas()
    write_text(data, rows.to_json(orient="records", lines=True))
    return task_config(
        name,
        data,
        "multiple_choice",
        doc_to_text="{{source}}\nAnswer:",
        doc_to_choice="{{choices}}",
        doc_to_target="label",
        target_delimiter=" ",
    )
