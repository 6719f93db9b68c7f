"""Fine-tune the CLIP vision tower on one task with frozen zero-shot text heads: the tiny-scale experts.

Stands in for tanganke's `clip-vit-base-patch32_<task>` checkpoints: fine-tuning of the vision tower
(every weight, or with `trainable=linear` only its nn.Linear layers), the class embeddings of "a photo of a {class}." from the CLIP text tower, the visual
projection and the temperature frozen. Each expert is saved as a `CLIPVisionModel` folder.

    python -m projects.smile.finetune --config projects/smile/configs/tiny_finetune.yaml seed=0 \
        out=runs/smile/tiny/experts/seed_0
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

from common.cli import run_main
from common.config import load_config
from common.io import atomic_dir
from common.models import load_model
from common.rundir import RunDir, check_same_config, seed_everything
from common.training import TrainConfig, train
from projects.smile.pools import CLIPTaskPool, clip_logits, resolve_path

DEFAULTS: dict[str, Any] = {
    "clip_model": "tiny:clip",  # the base whose vision tower is fine-tuned and whose heads are used
    "data": "tiny",  # tiny (common.data image tasks) or hub
    "tasks": [],
    "templates": ["a photo of a {}."],
    "seed": 0,
    "scale": "tiny",
    "out": "runs/smile/tiny/experts/seed_0",
    "train": {
        "lr": 1e-4,
        "weight_decay": 0.1,
        "max_steps": 200,
        "warmup_steps": 20,
        "batch_size": 64,
        "log_backend": "jsonl",
    },
    "trainable": "all",  # all: the whole vision tower; linear: only the nn.Linear layers SMILE upscales
    "max_train_examples": None,
    "max_eval_examples": None,
}
TRAINABLE = ("all", "linear")


def trainable_parameters(model: torch.nn.Module, which: str) -> list[torch.nn.Parameter]:
    """The parameters fine-tuned: all of them, or only those of the nn.Linear layers (SMILE upscales
    exactly these and keeps every other module pretrained, spec §"Which layers are upscaled")."""
    if which not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {which!r}")
    if which == "all":
        return list(model.parameters())
    return [p for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()]


def finetune_task(cfg: dict[str, Any], task: str, out: Path) -> dict[str, float]:
    """Fine-tune one expert, save it to `out`, and return its validation metrics on its own task."""
    train_pool = _task_pool(cfg, task, "train")  # the train split and the frozen heads
    pixels, labels = train_pool.data[task]
    text, projection, scale = train_pool.text[task], train_pool.projection, train_pool.logit_scale
    vision = load_model(resolve_path(cfg["clip_model"]), "clip_vision").train()
    tc = TrainConfig(**{**cfg["train"], "seed": cfg["seed"], "schedule": "cosine", "log_every": 20})

    def epoch_batches(epoch: int) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch)
        order = torch.randperm(len(labels), generator=g)
        step = tc.batch_size
        return [
            {"pixel_values": pixels[order[i : i + step]], "labels": labels[order[i : i + step]]}
            for i in range(0, len(order) - step + 1, step)
        ]

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(
            clip_logits(model, projection, scale, text, batch["pixel_values"]), batch["labels"]
        )

    run = out.with_name(out.name + ".training")
    params = trainable_parameters(vision, cfg["trainable"])
    train(vision, loss_fn, epoch_batches, tc, run, params=params, label=f"expert {task}")
    with atomic_dir(out) as tmp:  # a crash mid-write leaves no folder that a later run would reuse
        vision.eval().save_pretrained(tmp)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return validate(cfg, task, out)


def validate(cfg: dict[str, Any], task: str, expert: Path) -> dict[str, float]:
    """An expert's accuracy and loss on its own task's validation split."""
    return _task_pool(cfg, task, "validation").evaluate(load_model(expert, "clip_vision"))[task]


def _task_pool(cfg: dict[str, Any], task: str, split: str) -> CLIPTaskPool:
    """One task's data on `split` (capped by max_train_examples / max_eval_examples) and its frozen heads."""
    cap = cfg["max_train_examples"] if split == "train" else cfg["max_eval_examples"]
    return CLIPTaskPool(
        {
            "clip_model": resolve_path(cfg["clip_model"]),
            "tasks": [task],
            "data": cfg["data"],
            "templates": cfg["templates"],
            "max_examples": cap,
            "split": split,
        }
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", action="append", default=[], help="YAML config file(s)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=1 train.max_steps=50")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()  # loading a tower from a full CLIP folder lists the other's keys
    cfg = load_config(DEFAULTS, args.config, args.overrides)
    if not cfg["tasks"]:
        raise ValueError("no tasks to fine-tune on: set tasks=[...] or pass a config with tasks")
    finetune_experts(
        cfg,
        "finetune",
        cfg["tasks"],
        train_one=lambda task, folder: finetune_task(cfg, task, folder),
        validate_one=lambda task, folder: validate(cfg, task, folder),
    )


def finetune_experts(
    cfg: dict[str, Any],
    experiment: str,
    tasks: Sequence[str],
    train_one: Callable[[str, Path], dict[str, float]],
    validate_one: Callable[[str, Path], dict[str, float]],
    may_change: Sequence[str] = ("tasks",),
) -> None:
    """One expert per task in `cfg["out"]/<task>`; an expert already there (made under the same config, up to
    the keys `may_change`) is reused and only validated. Writes each expert's metrics as the run's results."""
    seed_everything(cfg["seed"])
    out = Path(cfg["out"])
    check_same_config(out, cfg, may_change=may_change)  # experts in `out` are reused below
    run = RunDir(
        out, project="smile", experiment=experiment, scale=cfg["scale"], seed=cfg["seed"], config=cfg
    )
    metrics = {}
    for task in tasks:
        folder = out / task
        if any(
            (folder / f).is_file()
            for f in ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
        ):
            print(f"expert {task}: exists at {folder}, reused")
            metrics[task] = validate_one(task, folder)
        else:
            metrics[task] = train_one(task, folder)
        if metrics[task]:
            print(f"expert {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics[task].items()))
    run.write_results(metrics)


if __name__ == "__main__":
    sys.exit(run_main(main))
