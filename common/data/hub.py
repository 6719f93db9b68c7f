"""The papers' own datasets, by Hugging Face Hub id, formatted as each paper formats them.

For users with a network. On an offline machine (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set) every
loader fails at once with `HubOffline`, naming the offline equivalent in `common.data`.
Each loader returns `(DatasetDict, record)`, the record naming the hub id and the paper's split.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from datasets import Dataset, DatasetDict

_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of boolean environment variables


class HubOffline(ConnectionError):
    """A hub dataset was requested on a machine without access to the hub."""


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set to a true value (read at call time)."""
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _require_online(hub_id: str, offline_equivalent: str) -> None:
    if hub_offline():
        raise HubOffline(
            f"{hub_id} is on the Hugging Face Hub and this machine is offline; "
            f"the offline equivalent is {offline_equivalent}"
        )


def _load(hub_id: str, offline_equivalent: str, *args: Any, **kwargs: Any) -> Any:
    _require_online(hub_id, offline_equivalent)
    from datasets import load_dataset

    return load_dataset(hub_id, *args, **kwargs)


def config_names(hub_id: str, offline_equivalent: str) -> list[str]:
    """The configs (subsets) of a hub dataset; offline, `HubOffline` naming the offline equivalent."""
    _require_online(hub_id, offline_equivalent)
    from datasets import get_dataset_config_names

    return get_dataset_config_names(hub_id)


def _lm_text(
    hub_id: str, fields: tuple[str, str], test_size: float, seed: int, offline: str
) -> tuple[DatasetDict, dict]:
    """compatible_specialization's data scripts: text = a + ' ' + b, then train_test_split (§Data)."""
    a, b = fields
    ds: Dataset = _load(hub_id, offline, split="train")
    ds = ds.map(lambda r: {"text": r[a] + " " + r[b]})
    parts = ds.train_test_split(test_size=test_size, seed=seed)
    splits = DatasetDict(train=parts["train"], validation=parts["test"])
    record = {"hub_id": hub_id, "text": f"{a} + ' ' + {b}", "test_size": test_size, "seed": seed}
    return splits, record | {"sizes": {k: len(v) for k, v in splits.items()}}


def tiny_codes(seed: int = 2357, test_size: float = 0.005) -> tuple[DatasetDict, dict]:
    """nampdn-ai/tiny-codes: the code domain (text = prompt + ' ' + response)."""
    return _lm_text(
        "nampdn-ai/tiny-codes", ("prompt", "response"), test_size, seed, "common.data.load('stdlib_code')"
    )


def orca_math(seed: int = 2357, test_size: float = 0.005) -> tuple[DatasetDict, dict]:
    """microsoft/orca-math-word-problems-200k: the math domain (text = question + ' ' + answer)."""
    return _lm_text(
        "microsoft/orca-math-word-problems-200k",
        ("question", "answer"),
        test_size,
        seed,
        "common.data.load('gsm_variants')",
    )


def gsm_hard(seed: int = 2357, test_size: float = 0.1) -> tuple[DatasetDict, dict]:
    """reasoning-machines/gsm-hard: the cross-domain set (text = input + ' ' + code; target unused)."""
    return _lm_text(
        "reasoning-machines/gsm-hard", ("input", "code"), test_size, seed, "common.data.load('gsm_hard')"
    )


_TEXT_TASKS = "an offline text task from common/data/text_tasks.py, e.g. common.data.load('tweet_topic')"


def flan(
    task_names: Iterable[str] | None = None, hub_id: str = "sordonia/flan-10k-flat"
) -> tuple[DatasetDict, dict]:
    """sordonia/flan-10k-flat (mttl): <=10k examples per FLAN task, its `split` column made into splits;
    `hub_id="sordonia/flan-debug-flat"` reads the small copy in the same format (mttl's notebook config)."""
    ds: Dataset = _load(hub_id, _TEXT_TASKS, split="train")
    if task_names is not None:
        wanted = set(task_names)
        ds = ds.filter(lambda name: name in wanted, input_columns="task_name")
    ds = ds.rename_column("task_name", "task")
    splits = DatasetDict(
        {s: ds.filter(lambda v, s=s: v == s, input_columns="split") for s in ("train", "validation", "test")}
    )
    record = {"hub_id": hub_id, "task_names": sorted(task_names) if task_names is not None else "all"}
    return splits, record | {"sizes": {k: len(v) for k, v in splits.items()}}


def p3(config: str, local_path: str | os.PathLike | None = None) -> tuple[DatasetDict, dict]:
    """One bigscience/P3 prompted dataset (a dataset x promptsource template, e.g. 'cosmos_qa_..._answer').

    `local_path`: a copy of that config on disk, in the hub's columns (`inputs_pretokenized`,
    `targets_pretokenized`, `answer_choices` for multiple-choice templates), saved with `save_to_disk`;
    it is read the same way, online or not. P3 keeps the whitespace a template puts around its target
    (often leading newlines) but not around the answer choices, so the label is found after stripping.
    """
    hub_id = "bigscience/P3"
    if local_path is not None:
        from datasets import load_from_disk

        ds: DatasetDict = load_from_disk(str(local_path))
    else:
        ds = _load(hub_id, _TEXT_TASKS + " with common.data.as_multiple_choice", config)

    def fmt(r: Mapping[str, Any]) -> dict[str, Any]:
        choices = r.get("answer_choices") or []
        target = r["targets_pretokenized"].strip()
        stripped = [c.strip() for c in choices]
        return {
            "task": config,
            "source": r["inputs_pretokenized"],
            "target": target,
            "choices": choices,
            "label": stripped.index(target) if target in stripped else -1,
        }

    splits = DatasetDict({k: v.map(fmt, remove_columns=v.column_names) for k, v in ds.items()})
    record = {
        "hub_id": hub_id,
        "config": config,
        "local_path": None if local_path is None else str(local_path),
    }
    return splits, record | {"sizes": {k: len(v) for k, v in splits.items()}}


# fusion_bench's Flan-T5 GLUE prompts (fusion_bench/tasks/flan_t5_text_generation/glue_prompt_templates.py),
# kept word for word, typos included, since the released experts were trained on exactly these strings.
GLUE_PROMPTS = {
    "cola": (
        'Indicate if the following sentence is grammatically correct or not: "{sentence}". '
        "Answere 'acceptable' or 'unacceptable'.",
        ("unacceptable", "acceptable"),
    ),
    "mnli": (
        "Does the premise: '{premise}' logically imply, contradict, or is neutral to the hypothesis: "
        "'{hypothesis}'? Answere with 'entailment', 'contradiction', or 'neutral'.",
        ("entailment", "neutral", "contradiction"),
    ),
    "mrpc": (
        "Are the following sentences '{sentence1}' and '{sentence2}' conveying the same meaning? "
        "Answere with 'yes' or 'no'.",
        ("no", "yes"),
    ),
    "qnli": (
        "Given the context: '{sentence}', does the question '{question}' have an answer based on the "
        "information provided? Answer with 'yes' or 'no'.",
        ("yes", "no"),
    ),
    "qqp": (
        "Do the questions '{question1}' and '{question2}' have the same intent? Answere with 'yes' or 'no'.",
        ("no", "yes"),
    ),
    "rte": (
        "Does the text: '{sentence1}' entail that '{sentence2}' is true? Provide 'yes' or 'no'.",
        ("yes", "no"),
    ),
    "sst2": (
        "Given the sentence '{sentence}', determine the sentiment. Is it positive or negative?",
        ("negative", "positive"),
    ),
    "stsb": (
        "Consider the sentences '{sentence1}' and '{sentence2}'. On a scale from 1 (completely different) "
        "to 5 (completely similar), rate the similarity.",
        (),  # regression: the target is the score written with one decimal
    ),
}
GLUE_EVAL_SPLITS = {task: "validation_matched" if task == "mnli" else "validation" for task in GLUE_PROMPTS}


def glue_record(task: str, example: Mapping[str, Any]) -> dict[str, Any]:
    """A GLUE example as SMILE's Flan-T5 text-to-text record (test examples, label -1, get target '')."""
    prompt, choices = GLUE_PROMPTS[task]
    label = example["label"]
    if task == "stsb":
        target, index = ("" if label < 0 else f"{label:.1f}"), -1
    else:
        target, index = ("" if label < 0 else choices[label]), label
    return {
        "task": task,
        "source": prompt.format(**example),
        "target": target,
        "choices": list(choices),
        "label": index,
    }


def glue(task: str) -> tuple[DatasetDict, dict]:
    """nyu-mll/glue `task` in SMILE's Flan-T5 format; the paper scores the `GLUE_EVAL_SPLITS` split."""
    if task not in GLUE_PROMPTS:
        raise ValueError(f"unknown GLUE task {task!r}; choices: {sorted(GLUE_PROMPTS)}")
    hub_id = "nyu-mll/glue"
    ds: DatasetDict = _load(hub_id, _TEXT_TASKS, task)
    splits = DatasetDict(
        {k: v.map(lambda r: glue_record(task, r), remove_columns=v.column_names) for k, v in ds.items()}
    )
    record = {"hub_id": hub_id, "task": task, "eval_split": GLUE_EVAL_SPLITS[task]}
    return splits, record | {"sizes": {k: len(v) for k, v in splits.items()}}


# SMILE's eight CLIP tasks, as fusion_bench's taskpool loads them (task -> hub id, config). fusion_bench
# writes 'svhn' and 'mnist', the legacy names of the ids below.
CLIP_TASKS = {
    "sun397": ("tanganke/sun397", None),
    "stanford-cars": ("tanganke/stanford_cars", None),
    "resisc45": ("tanganke/resisc45", None),
    "eurosat": ("tanganke/eurosat", None),
    "svhn": ("ufldl-stanford/svhn", "cropped_digits"),
    "gtsrb": ("tanganke/gtsrb", None),
    "mnist": ("ylecun/mnist", None),
    "dtd": ("tanganke/dtd", None),
}
_IMAGES = "the image tasks in common/data/images.py: common.data.load('digits'), 'mnist5k', 'animal_mnist'"


def clip_task(task: str) -> tuple[DatasetDict, dict]:
    """One of the eight CLIP-ViT tasks (image, label); the paper evaluates on `test`."""
    if task not in CLIP_TASKS:
        raise ValueError(f"unknown CLIP task {task!r}; choices: {sorted(CLIP_TASKS)}")
    hub_id, config = CLIP_TASKS[task]
    ds: DatasetDict = _load(hub_id, _IMAGES, *([config] if config else []))
    record = {"hub_id": hub_id, "config": config, "task": task, "eval_split": "test"}
    return ds, record | {"sizes": {k: len(v) for k, v in ds.items()}}
