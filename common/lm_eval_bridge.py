"""Evaluate an in-memory model (merged, routed, adapter-wrapped) with lm-eval 0.4 on local task files, offline.

A task is data: lm-eval's YAML (or the same dict) reading a local jsonl/csv/parquet file through
`datasets`. The data path is written absolute, because lm-eval resolves a relative `data_files` path
against the working directory, not against the YAML. `datasets` caches under `HF_DATASETS_CACHE`
(the tests point it at a temp dir).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lm_eval
import yaml
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from torch import nn

from common.device import resolve_device
from common.evaluation import eval_mode
from common.io import write_text

OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood", "loglikelihood_rolling")
# The `datasets` builder that reads each data-file suffix.
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Metrics used when a task names none, with lm-eval's own aggregation and direction (written out so
# that lm-eval does not warn about guessing them).
DEFAULT_METRICS: dict[str, list[dict[str, Any]]] = {
    "multiple_choice": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    # A generation keeps its leading space (" 4" after "Answer:"): compare without outer whitespace.
    "generate_until": [
        {
            "metric": "exact_match",
            "aggregation": "mean",
            "higher_is_better": True,
            "regexes_to_ignore": [r"^\s+", r"\s+$"],
        }
    ],
    "loglikelihood": [
        {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
        {"metric": "acc", "aggregation": "mean", "higher_is_better": True},  # continuation is greedy
    ],
    "loglikelihood_rolling": [
        {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
        {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
        {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
    ],
}
DEFAULT_GENERATION_KWARGS = {"until": ["\n"], "max_gen_toks": 32, "do_sample": False}


def task_config(
    name: str,
    data_path: str | os.PathLike,
    output_type: str,
    *,
    doc_to_text: str,
    doc_to_target: str,
    doc_to_choice: str | None = None,
    metric_list: Sequence[Mapping[str, Any]] | None = None,
    generation_kwargs: Mapping[str, Any] | None = None,
    split: str = "test",
    **extra: Any,
) -> dict[str, Any]:
    """An lm-eval task config (the dict form of a task YAML) that reads `data_path` by its absolute path.

    `doc_to_*` are lm-eval's Jinja templates or field names, e.g. doc_to_text="Question: {{question}}\\nAnswer:",
    doc_to_choice="{{choices}}", doc_to_target="label". `extra` adds any other lm-eval key
    (`target_delimiter`, `filter_list`, `num_fewshot`, ...).
    """
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; expected one of {OUTPUT_TYPES}")
    path = Path(data_path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"task {name!r}: no data file at {path}")
    if path.suffix not in _BUILDERS:
        raise ValueError(f"task {name!r}: cannot read {path.name}; expected one of {sorted(_BUILDERS)}")
    if (doc_to_choice is None) == (output_type == "multiple_choice"):
        raise ValueError(f"task {name!r}: doc_to_choice is needed by, and only by, multiple_choice tasks")
    if generation_kwargs is not None and output_type != "generate_until":
        raise ValueError(f"task {name!r}: generation_kwargs only apply to generate_until tasks")
    config: dict[str, Any] = {
        "task": name,
        "dataset_path": _BUILDERS[path.suffix],
        "dataset_kwargs": {"data_files": {split: str(path)}},
        "test_split": split,
        "output_type": output_type,
        "doc_to_text": doc_to_text,
        "doc_to_target": doc_to_target,
        "metric_list": copy.deepcopy(list(metric_list or DEFAULT_METRICS[output_type])),
        "metadata": {"version": 1.0},
    }
    if doc_to_choice is not None:
        config["doc_to_choice"] = doc_to_choice
    if output_type == "generate_until":
        config["generation_kwargs"] = copy.deepcopy(
            {**DEFAULT_GENERATION_KWARGS, **(generation_kwargs or {})}
        )
    return config | extra


def write_task_yaml(
    task_dir: str | os.PathLike, name: str, data_path: str | os.PathLike, output_type: str, **kwargs: Any
) -> Path:
    """Write `task_config(...)` to `task_dir/<name>.yaml`, for `include_path=task_dir` or the lm_eval CLI."""
    path = Path(task_dir) / f"{name}.yaml"
    write_text(path, yaml.safe_dump(task_config(name, data_path, output_type, **kwargs), sort_keys=False))
    return path


def run_lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str | Mapping[str, Any]],
    *,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    batch_size: int = 8,
    limit: int | float | None = None,
    device: str | None = None,
    log_samples: bool = False,
    builtin_tasks: bool = False,
    **simple_evaluate_kwargs: Any,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on an in-memory model; its raw output (with per-doc `samples` if `log_samples`).

    Tasks are names found under `include_path` or config dicts (`task_config`); with `builtin_tasks`, also
    lm-eval's own task names ("arc_easy", "boolq"; indexing them costs seconds, so they are off by
    default). The model moves to `device` if one is given, else stays where it is; lm-eval puts each
    batch on the model's device.
    """
    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path or [])
    task_manager = TaskManager(include_path=[str(p) for p in paths] or None, include_defaults=builtin_tasks)
    if device is not None:
        model.to(resolve_device(device))
    with eval_mode(model):
        # A copy of the tokenizer, because HFLM gives a tokenizer without one a pad token.
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=[dict(t) if isinstance(t, Mapping) else t for t in tasks],
            task_manager=task_manager,
            limit=limit,
            log_samples=log_samples,
            **simple_evaluate_kwargs,
        )


def task_metrics(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{task: {metric: value}} from lm-eval's output, without ",none" suffixes, names or numpy scalars."""
    return {
        task: {
            key.removesuffix(",none"): value.item() if hasattr(value, "item") else value
            for key, value in metrics.items()
            if key not in ("alias", "name")
        }
        for task, metrics in raw["results"].items()
    }


def evaluate_in_memory(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str | Mapping[str, Any]],
    *,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    batch_size: int = 8,
    limit: int | float | None = None,
    device: str | None = None,
    **run_kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Per-task lm-eval metrics of an in-memory model, e.g. {"arith_mc": {"acc": 0.75, "acc_stderr": 0.1}};
    `run_kwargs` go to `run_lm_eval` (`builtin_tasks`, `confirm_run_unsafe_code`, ...)."""
    raw = run_lm_eval(
        model,
        tokenizer,
        tasks,
        include_path=include_path,
        batch_size=batch_size,
        limit=limit,
        device=device,
        **run_kwargs,
    )
    return task_metrics(raw)
