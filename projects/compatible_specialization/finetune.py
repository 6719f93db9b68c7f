"""Specialists: GPT-2 fine-tuned with only its MLPs trainable (`--train_mlp`), snapshots at chosen steps;
routers trained on the target with everything else frozen; the test loss of either."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.evaluation import lm_loss
from common.training import TrainConfig, check_run_key, latest_checkpoint, train
from projects.compatible_specialization.checkpoints import save_specialist
from projects.compatible_specialization.data import RandomWindows
from projects.compatible_specialization.mixture import router_parameters


def _causal_lm(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over the window (no prompt masking, as the original)."""
    return model(input_ids=batch, labels=batch).loss


def train_config(opt: dict[str, Any], seed: int) -> TrainConfig:
    """`train_tokens` windows in steps of `batch_size` (split into `grad_accum` micro-batches), AdamW β=(0.9, 0.99)."""
    if opt["batch_size"] % opt["grad_accum"]:
        raise ValueError(
            f"batch_size {opt['batch_size']} is not a multiple of grad_accum {opt['grad_accum']}"
        )
    steps = opt["train_tokens"] // opt["batch_size"]
    if steps < 1:
        raise ValueError(f"train_tokens {opt['train_tokens']} is less than one batch of {opt['batch_size']}")
    return TrainConfig(
        lr=opt["lr"],
        weight_decay=opt["wd"],
        betas=(0.9, 0.99),
        max_steps=steps,
        schedule=opt["schedule"],
        min_lr_ratio=opt["min_lr_ratio"],
        grad_accum=opt["grad_accum"],
        max_grad_norm=opt["clip"],
        seed=seed,
        batch_size=opt["batch_size"] // opt["grad_accum"],
        shuffle=False,  # the windows are already at random starts
        log_every=max(1, steps // 20),
        mixed_precision=opt.get("mixed_precision", "no"),
        log_backend=opt.get("log_backend", "jsonl"),
        save_every=opt.get("save_every"),
    )


def finetune_mlps(
    model: nn.Module,
    stream: torch.Tensor,
    opt: dict[str, Any],
    context: int,
    run_dir: str | os.PathLike,
    seed: int,
    snapshot_steps: Iterable[int],
    meta: dict[str, Any],
    device: str | None = None,
    run_key: Mapping[str, Any] | None = None,
) -> dict[int, Path]:
    """Fine-tune the MLPs in place; write `snapshots/step_<N>.safetensors` at step 0 and each snapshot step.
    A run folder whose checkpoints were trained for another `run_key` is refused before anything is read."""
    cfg = train_config(opt, seed)
    run_dir = Path(run_dir)
    done = latest_checkpoint(run_dir)
    if done is not None:
        check_run_key(done, run_key)
    wanted = sorted({0, *(s for s in snapshot_steps if s <= cfg.max_steps)})
    paths = {s: run_dir / "snapshots" / f"step_{s}.safetensors" for s in wanted}
    meta = {**meta, "n_layer": model.config.n_layer, "n_embd": model.config.n_embd}
    if not paths[0].exists():
        save_specialist(paths[0], model, {**meta, "step": 0})

    def snapshot(step: int, _logs: Any) -> None:
        if step in paths:
            save_specialist(paths[step], model, {**meta, "step": step})

    windows = RandomWindows(stream, context, cfg.max_steps * opt["batch_size"], seed)
    mlp_params = [p for n, p in model.named_parameters() if ".mlp." in n]  # `train` freezes the rest
    train(
        model,
        _causal_lm,
        windows,
        cfg,
        run_dir,
        params=mlp_params,
        callbacks=[snapshot],
        device=device,
        label="finetune MLPs",
        run_key=run_key,
    )
    missing = [s for s, p in paths.items() if not p.exists()]
    if missing:  # a finished run resumed from its final checkpoint cannot rewrite lost snapshots
        raise RuntimeError(
            f"snapshots {missing} are missing under {run_dir}; delete the run folder and rerun"
        )
    return paths


def train_routers(
    model: nn.Module,
    stream: torch.Tensor,
    opt: dict[str, Any],
    context: int,
    run_dir: str | os.PathLike,
    seed: int,
    device: str | None = None,
) -> list[tuple[int, float]]:
    """Train only the routers of a routed model in place (plain mean CE, no load balancing); the loss curve."""
    cfg = train_config(opt, seed)
    params = router_parameters(model)  # `train` freezes every other parameter
    windows = RandomWindows(stream, context, cfg.max_steps * opt["batch_size"], seed)
    return train(
        model, _causal_lm, windows, cfg, run_dir, params=list(params.values()), device=device, label="routers"
    ).losses


def test_loss(model: nn.Module, windows: torch.Tensor, batch_size: int, dtype: str = "float32") -> float:
    """Mean token NLL over held-out windows (N, T); `dtype="bfloat16"` evaluates as the original (bf16)."""
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    loss = lm_loss(model, batches, disable=True)["loss"]
    if dtype != "float32":
        model.float()
    return loss
