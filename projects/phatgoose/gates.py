"""Gate training (§3): with base model and LoRA frozen, learn one sigmoid gate vector per adapted module.

For each module's input token u: y = W u + σ(gᵀu) · B A u / r, g initialised to zero (so the expert's
output starts halved); only the gates are trained, with the expert's own data and optimizer settings
(the original's `FFNExperts.learn_input_gate="only_sigmoid"`, 100 steps). The trained gate then becomes the
expert's routing key (`library.use_input_gate_as_router`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from datasets import Dataset

from common.training import train
from projects.phatgoose.experts import (
    CHECKPOINT,
    TrainSettings,
    cap_examples,
    load_base,
    seq2seq_collate,
    seq2seq_loss,
)
from projects.phatgoose.library import adapter_config, read_expert, write_expert
from projects.phatgoose.moe import attach_experts


def train_gate(
    base: str,
    expert_path: str | os.PathLike,
    data: Dataset,
    out: str | os.PathLike,
    settings: TrainSettings,
    *,
    seed: int | None = None,
    device: str | torch.device = "auto",
    mixed_precision: str = "no",
    log_backend: str | None = None,
) -> Path:
    """Train the gates of the expert at `expert_path` on `data`; write expert + gates to `out/checkpoint`."""
    model, tokenizer = load_base(base, device)
    expert = read_expert(expert_path)
    modules = attach_experts(model, [expert])  # freezes everything
    gates = {name: m.add_gate() for name, m in modules.items()}
    model.train()  # dropout active, as in the original
    data = cap_examples(data, settings.max_train_examples)
    out = Path(out)
    train(
        model,
        seq2seq_loss,
        data,
        dataclasses.replace(settings.train_config(seed, log_backend), mixed_precision=mixed_precision),
        out / "training",
        collate_fn=seq2seq_collate(tokenizer, settings.max_length),
        params=list(gates.values()),
        resume=True,
        device=device,
        label=f"gates {Path(expert_path).name}",
    )
    model.eval()
    expert.gate = {name: g.detach().clone() for name, g in gates.items()}
    return write_expert(out / CHECKPOINT, adapter_config(expert_path), expert, {"stage": "gate"})
