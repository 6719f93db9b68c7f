"""Training a LoRA expert on one dataset (train_single_task_loralinear) and the multitask baseline.

Expert (§3, `moe_lora_rank16.gin`): LoRA on q, k, v, o, wi_0, wi_1, wo of encoder and decoder,
W' = W + B A / r (lora_alpha = 1), A ~ N(0, init_scale²), B = 0; seq2seq cross-entropy on the target.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, concatenate_datasets
from peft.tuners.lora import LoraLayer
from torch import nn

from common.adapters import add_adapter, lora_config, save_adapter
from common.cache import content_hash
from common.models import load_model
from common.tiny_world import resolve_base
from common.training import TrainConfig, check_run_key, latest_checkpoint, load_weights, train
from projects.phatgoose.tasks import subsample

T5_TARGETS = ("q", "k", "v", "o", "wi_0", "wi_1", "wo")
CHECKPOINT = (
    "checkpoint"  # exp_out/<exp_name>/checkpoint: an expert or library folder (the original's best.pt)
)


@dataclass
class TrainSettings:
    """The knobs of the original's Trainer (effective batch = batch_size × gradient_accumulation_factor)."""

    num_steps: int = 1000
    lr: float = 5e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    batch_size: int = 32
    gradient_accumulation_factor: int = 32
    grad_clip: float = 1.0
    max_length: int = 512
    max_train_examples: int = 500_000
    seed: int = 42
    # the original validates every 100 steps and keeps the best step (`best.pt`); None: keep the last step
    validation_step_interval: int | None = None

    def train_config(self, seed: int | None = None, log_backend: str | None = None) -> TrainConfig:
        """`log_backend`: main.logging_backend (None: train_log.jsonl only)."""
        if log_backend == "wandb":
            raise ValueError(
                'main.logging_backend="wandb" is not wired here: use "tensorboard" (pip install '
                "'moerging[tensorboard]') or None (train_log.jsonl only)"
            )
        interval = self.validation_step_interval
        return TrainConfig(
            log_backend=log_backend or "jsonl",
            lr=self.lr,
            weight_decay=self.weight_decay,
            max_steps=self.num_steps,
            warmup_steps=math.ceil(self.warmup_ratio * self.num_steps),
            schedule="constant",
            grad_accum=self.gradient_accumulation_factor,
            max_grad_norm=self.grad_clip,
            seed=self.seed if seed is None else seed,
            batch_size=self.batch_size,
            log_every=max(1, self.num_steps // 10),
            eval_every=interval,
            save_every=interval,
            keep_last=2 if interval is None else math.ceil(self.num_steps / interval) + 1,
        )


def load_base(
    name_or_path: str, device: str | torch.device = "auto", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any]:
    """(T5 model, tokenizer) from a tiny-base spec, a local folder or a hub id, on `device` in `dtype`."""
    from transformers import AutoTokenizer

    path = resolve_base(name_or_path)
    model = load_model(path, device=device, dtype=dtype)
    if not model.config.is_encoder_decoder:
        raise ValueError(
            f"PHATGOOSE needs an encoder-decoder (T5) base, {name_or_path} is {model.config.model_type}"
        )
    return model, AutoTokenizer.from_pretrained(path)


def seq2seq_collate(tokenizer: Any, max_length: int):
    """Examples with `source`/`target` -> (input_ids, attention_mask, labels), labels padded with -100."""

    def collate(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        enc = tokenizer(
            [r["source"] for r in rows],
            max_length=max_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )
        dec = tokenizer(
            [r["target"] for r in rows],
            max_length=max_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )
        labels = dec["input_ids"].masked_fill(dec["attention_mask"] == 0, -100)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}

    return collate


def seq2seq_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def init_lora(model: nn.Module, init_scale: float) -> None:
    """The original's LoRA init: A ~ N(0, init_scale²), B = 0 (so the expert starts as the base)."""
    for m in model.modules():
        if isinstance(m, LoraLayer):
            for name in m.lora_A:
                nn.init.normal_(m.lora_A[name].weight, std=init_scale)
                nn.init.zeros_(m.lora_B[name].weight)


def train_lora_expert(
    base: str,
    data: Dataset,
    out: str | os.PathLike,
    settings: TrainSettings,
    *,
    rank: int = 16,
    init_scale: float = 0.01,
    target_modules: Sequence[str] = T5_TARGETS,
    name: str = "expert",
    seed: int | None = None,
    validate: Callable[[nn.Module, Any], float] | None = None,
    device: str | torch.device = "auto",
    mixed_precision: str = "no",
    log_backend: str | None = None,
) -> Path:
    """Train one LoRA (base frozen) on `data` (source, target); the PEFT adapter goes to `out/checkpoint`.

    With `settings.validation_step_interval` and `validate(model, tokenizer) -> accuracy`, the model is
    validated every that many steps and the best step's weights are kept (the first of equals), as the
    original's `best.pt`; otherwise the last step's. The weights stay float32; `mixed_precision="bf16"`
    trains under bf16 autocast (the original's `Model.mix_precision`).
    """
    model, tokenizer = load_base(base, device)
    model = add_adapter(model, lora_config("t5", rank, 1.0, target_modules=list(target_modules)))
    model.peft_config["default"].base_model_name_or_path = resolve_base(base)
    torch.manual_seed(settings.seed if seed is None else seed)
    init_lora(model, init_scale)
    model.train()  # T5 dropout is active while training, as in the original
    data = cap_examples(data, settings.max_train_examples)
    out = Path(out)
    # What the weights are trained for (the optimiser settings are checked by `train` itself): a folder
    # holding another task's or base's expert is refused, never resumed or shipped under this name.
    run_key = {
        "base": resolve_base(base), "name": name, "rank": rank, "init_scale": init_scale,
        "target_modules": list(target_modules), "max_length": settings.max_length,
        "data": content_hash({c: data[c] for c in data.column_names}),
    }  # fmt: skip
    done = latest_checkpoint(out / "training")
    if done is not None:
        check_run_key(done, run_key)
    eval_fn = None
    if validate is not None and settings.validation_step_interval:
        eval_fn = lambda m: {"accuracy": validate(m, tokenizer)}  # noqa: E731
    result = train(
        model,
        seq2seq_loss,
        data,
        dataclasses.replace(settings.train_config(seed, log_backend), mixed_precision=mixed_precision),
        out / "training",
        collate_fn=seq2seq_collate(tokenizer, settings.max_length),
        eval_fn=eval_fn,
        resume=True,
        device=device,
        label=f"expert {name}",
        run_key=run_key,
    )
    meta = {"name": name, "stage": "lora", "base": base}
    if eval_fn is not None and result.evals:
        best_step = max(result.evals, key=lambda e: e[1]["accuracy"])[0]  # max keeps the first of equals
        checkpoints = out / "training" / "checkpoints"
        load_weights(model, checkpoints / f"step_{best_step}")
        meta["best_step"] = str(best_step)
        # only the best and the last step stay on disk (a T5-XL LoRA checkpoint with its optimizer is ~0.4 GB)
        for ckpt in checkpoints.glob("step_*"):
            if ckpt.name not in (f"step_{best_step}", f"step_{result.step}"):
                shutil.rmtree(ckpt)
    model.eval()
    return save_adapter(model, out / CHECKPOINT, extras_meta=meta)


def cap_examples(data: Dataset, cap: int) -> Dataset:
    """At most `cap` training examples, a fixed random subset (split seed 0), as (source, target).

    Random, not the first `cap`: the offline tasks' train splits are stored sorted by label, so the first
    3,200 tweets of the airline, deflategate and topic sets all have ONE label (a bug of the first tiny
    table, whose experts then learned a constant answer).
    """
    return subsample(data, cap, seed=0).select_columns(["source", "target"])


def multitask_data(datasets: Sequence[Dataset], cap: int) -> Dataset:
    """The union of the experts' training sets, each capped at `cap` (temperature-1 mixing = proportional)."""
    return concatenate_datasets([cap_examples(d, cap) for d in datasets])
