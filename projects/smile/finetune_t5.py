"""Fine-tune a T5 on each task of a text-generation task pool: the tiny stand-ins for tanganke's
`flan-t5-base_glue-<task>` (full fine-tuning) and `..._lora-16` (LoRA on q and v) experts.

Full experts are saved with `save_pretrained`; LoRA experts as PEFT adapter folders, which the model pool
(`adapters: true`) merges into full weights (`pools.merge_lora`) before upscaling, as fusion_bench does.
Seq2seq cross-entropy on the answer; the seed varies training only (splits use split seed 0).

    python -m projects.smile.finetune_t5 --config projects/smile/configs/tiny_finetune_t5.yaml seed=0 \
        out=runs/smile/tiny/t5_full/experts/seed_0
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import transformers
from torch import nn

from common.adapters import add_adapter, lora_config, save_adapter
from common.cli import run_main
from common.config import load_config, read_config_file
from common.io import atomic_dir
from common.models import load_model
from common.training import TrainConfig, train
from projects.smile.finetune import finetune_experts, trainable_parameters
from projects.smile.main import group_file
from projects.smile.pools import merge_lora, resolve_path
from projects.smile.text_generation import TextGenerationTaskPool, encode_pairs, task_specs, task_split

DEFAULTS: dict[str, Any] = {
    "base": "tiny:t5",
    "taskpool": "FlanT5GLUETextGenerationTaskPool/tiny_t5_text8",  # the tasks (data and prompts) to learn
    "tasks": None,  # a subset of the task pool's tasks (null: all of them)
    "method": "full",  # full: the Linear layers (trainable) or every weight; lora: adapters on lora.targets
    "trainable": "linear",  # full only: linear (the layers SMILE upscales) or all
    "lora": {"r": 4, "alpha": 4, "targets": ["q", "v"]},
    "max_source_length": 256,
    "max_train_examples": 4000,  # a fixed random subset of each task's train split
    "max_eval_examples": 200,
    "seed": 0,
    "scale": "tiny",
    "out": "runs/smile/tiny/t5_full/experts/seed_0",
    "train": {
        "lr": 1e-3,
        "weight_decay": 0.01,
        "max_steps": 150,
        "warmup_steps": 15,
        "batch_size": 16,
        "log_backend": "jsonl",
    },
}
METHODS = ("full", "lora")


def _pool_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    return read_config_file(group_file("taskpool", cfg["taskpool"]))


def finetune_task(cfg: dict[str, Any], task: str, spec: Any, out: Path) -> dict[str, float]:
    """Fine-tune one expert on `task`, save it to `out`; returns its validation metrics on its own task."""
    from transformers import AutoTokenizer

    if cfg["method"] not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {cfg['method']!r}")
    base = resolve_path(cfg["base"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    pool = _pool_cfg(cfg)
    data = task_split(task, spec, pool["data"], "train", cfg["max_train_examples"])
    model: nn.Module = load_model(base, "t5").train()
    if cfg["method"] == "lora":
        lora = cfg["lora"]
        model = add_adapter(
            model, lora_config("t5", lora["r"], lora["alpha"], target_modules=lora["targets"])
        )
        params = None  # the adapters' weights, the only ones peft leaves trainable
    else:
        params = trainable_parameters(model, cfg["trainable"])
    tc = TrainConfig(**{**cfg["train"], "seed": cfg["seed"], "schedule": "cosine", "log_every": 25})

    def collate(rows: list[dict[str, str]]) -> dict:
        sources, targets = [r["source"] for r in rows], [r["target"] for r in rows]
        return encode_pairs(tokenizer, sources, targets, cfg["max_source_length"])

    run = out.with_name(out.name + ".training")
    loss_fn = lambda m, batch: m(**batch).loss  # noqa: E731
    train(model, loss_fn, data, tc, run, collate_fn=collate, params=params, label=f"expert {task}")
    if cfg["method"] == "lora":
        save_adapter(model, out)
    else:
        with atomic_dir(out) as tmp:  # a crash mid-write leaves no folder that a later run would reuse
            model.eval().save_pretrained(tmp)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return validate(cfg, task, spec, out)


def load_expert(cfg: dict[str, Any], path: Path) -> nn.Module:
    """A saved expert as a full T5 (a LoRA adapter merged into the base)."""
    base = resolve_path(cfg["base"])
    return merge_lora(load_model(base, "t5"), path) if cfg["method"] == "lora" else load_model(path, "t5")


def validate(cfg: dict[str, Any], task: str, spec: Any, expert: Path) -> dict[str, float]:
    """An expert's metrics on its own task's validation split."""
    pool = _pool_cfg(cfg) | {
        "tasks": {task: spec},
        "split": "validation",
        "max_examples": cfg["max_eval_examples"],
    }
    return TextGenerationTaskPool(pool).evaluate(load_expert(cfg, expert))[task]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", action="append", default=[], help="YAML config file(s)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=1 train.max_steps=50")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    cfg = load_config(DEFAULTS, args.config, args.overrides)
    specs = task_specs(_pool_cfg(cfg))
    for task in cfg["tasks"] or []:
        if task not in specs:
            raise ValueError(f"task {task!r} is not in task pool {cfg['taskpool']}: {sorted(specs)}")
    finetune_experts(
        cfg,
        "finetune_t5",
        cfg["tasks"] or list(specs),
        train_one=lambda task, folder: finetune_task(cfg, task, specs[task], folder),
        validate_one=lambda task, folder: validate(cfg, task, specs[task], folder),
    )


if __name__ == "__main__":
    sys.exit(run_main(main))
