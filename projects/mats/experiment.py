"""One experiment's settings and places: the config groups of the original (`-m`, `-td`, `-ed`, `-tr`,
`-er`), the output layout, the checkpoint registry, and rank-classification evaluation of a mixture.

Layout (as the original):
    {exp_out}/{format}/{dataset}/{model}/{descriptor}/{run_name}/       a training run
        checkpoint_{idx}.safetensors                                    its best checkpoint
        gram_matrix/checkpoint_{idx}_*.safetensors                      its metadata
    {exp_out}/merging/{format}/{mixture}/{model}/{descriptor}/{method}/[model_lambda_{x}/]merged_model.safetensors
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from common.config import load_config
from common.evaluation import rank_classification
from projects.mats.model import is_encoder_decoder, model_name
from projects.mats.tasks import load_mixture

CONFIGS = Path(__file__).resolve().parent / "configs"
# The paper's settings (spec §1c); configs/ and overrides change them.
DEFAULTS: dict[str, Any] = {
    "model": {
        "base": "google/t5-large-lm-adapt",
        "scale": "paper",  # paper | tiny | micro
        "format": "full_model",  # full_model | ia3 (the checkpoint descriptor)
        "max_source_len": 512,
    },
    "train_dataset": {"train_dataset": "p3_eight_qa", "max_examples": None},
    "eval_dataset": {
        "evaluation_dataset": "p3_eight_qa",
        "evaluation_split": "validation",
        "max_examples": 1000,
    },
    "train_run": {
        "lr": 1e-4,
        "train_batch_size": 1024,
        "micro_train_batch_size": 16,
        "num_batches": 5000,
        "checkpoint_frequency": 100,
        "early_stopping_num_checkpoints_without_improvement": 5,
        "warmup_steps": 0,
        "schedule": "constant",
        "weight_decay": 0.0,
        "seed": 42,
        "mixed_precision": "bf16",
    },
    "eval_run": {"eval_batch_size": 32, "length_normalization": False},
    "metadata": {"num_examples": 1000, "gram_batch_size": 8, "seed": 0},
    "experiment": {
        "exp_out": "exp_out",
        "instruction_format": "p3",
        "run_name": None,  # None: a timestamp, as the original
        "checkpoint_registry": str(CONFIGS / "checkpoints.yaml"),
    },
}
GROUP_FLAGS = {"td": "train_dataset", "ed": "eval_dataset", "tr": "train_run", "er": "eval_run", "m": "model"}


def _alias(flag: str, kv: str) -> str:
    # The original's inference reads `-ed split=...`; its training configs say `evaluation_split`.
    return "evaluation_" + kv if flag == "ed" and kv.startswith("split=") else kv


def resolve(
    config_files: Sequence[str | os.PathLike],
    groups: Mapping[str, Sequence[str]],
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """DEFAULTS < config files < `-td/-ed/-tr/-er/-m key=value` (each into its group) < dotted overrides."""
    scoped = [f"{GROUP_FLAGS[flag]}.{_alias(flag, kv)}" for flag, kvs in groups.items() for kv in kvs or ()]
    return load_config(DEFAULTS, config_files, [*scoped, *overrides])


def name_of_model(cfg: Mapping[str, Any]) -> str:
    return model_name(cfg["model"]["base"], cfg["model"]["scale"])


def merge_dir(cfg: Mapping[str, Any], mixture: str, descriptor: str, method_dir: str) -> Path:
    """exp_out/merging/{format}/{mixture}/{model}/{descriptor}/{method}."""
    e = cfg["experiment"]
    return Path(
        e["exp_out"], "merging", e["instruction_format"], mixture, name_of_model(cfg), descriptor, method_dir
    )


def read_registry(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint registry: {model: {format: {descriptor: {dataset: checkpoint path}}}}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint registry {path} not found (set experiment.checkpoint_registry)")
    return yaml.safe_load(path.read_text()) or {}


def checkpoint_paths(cfg: Mapping[str, Any], descriptor: str, tasks: Sequence[str]) -> dict[str, Path]:
    """{task: checkpoint} of `descriptor` for the configured model, with a clear error for a missing expert."""
    registry = read_registry(cfg["experiment"]["checkpoint_registry"])
    model, fmt = name_of_model(cfg), cfg["experiment"]["instruction_format"]
    try:
        entries = registry[model][fmt][descriptor]
    except KeyError:
        raise KeyError(
            f"checkpoint registry {cfg['experiment']['checkpoint_registry']} has no {model}/{fmt}/{descriptor}"
        ) from None
    missing = [t for t in tasks if t not in entries]
    if missing:
        raise KeyError(f"no {descriptor} expert registered for {missing} (registered: {sorted(entries)})")
    root = Path(cfg["experiment"]["checkpoint_registry"]).parent
    return {t: (root / entries[t]) if not Path(entries[t]).is_absolute() else Path(entries[t]) for t in tasks}


def register_checkpoint(
    path: str | os.PathLike,
    model: str,
    fmt: str,
    descriptor: str,
    dataset: str,
    checkpoint: str | os.PathLike,
) -> None:
    """Add one entry to a registry file (created if absent), written atomically."""
    from common.io import write_text

    path = Path(path)
    registry = read_registry(path) if path.is_file() else {}
    registry.setdefault(model, {}).setdefault(fmt, {}).setdefault(descriptor, {})[dataset] = str(checkpoint)
    write_text(path, yaml.safe_dump(registry, sort_keys=True))


def evaluate(
    model: nn.Module, tokenizer: Any, data: Mapping[str, Sequence[Mapping[str, Any]]], cfg: Mapping[str, Any]
) -> dict[str, float]:
    """Rank-classification accuracy per task (summed log-likelihood by default) and their mean, `average`."""
    scores = {}
    for task, examples in data.items():
        scores[task] = rank_classification(
            model,
            tokenizer,
            [ex["question"] for ex in examples],
            [[" " + c for c in ex["choices"]] for ex in examples],
            [ex["label"] for ex in examples],
            length_normalize=cfg["eval_run"]["length_normalization"],
            batch_size=cfg["eval_run"]["eval_batch_size"],
            append_eos=is_encoder_decoder(model),
            disable=True,
        )["accuracy"]
    scores["average"] = statistics.fmean(scores[t] for t in data)
    return scores


def eval_data(
    cfg: Mapping[str, Any], split: str | None = None, dataset: str | None = None
) -> dict[str, list]:
    e = cfg["eval_dataset"]
    return load_mixture(dataset or e["evaluation_dataset"], split or e["evaluation_split"], e["max_examples"])
