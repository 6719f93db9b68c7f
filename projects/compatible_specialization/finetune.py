"""Specialists: GPT-2 fine-tuned with only its MLPs trainable (`--train_mlp`), snapshots at chosen steps;
routers trained on the target with everything else frozen; the test loss of either."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.evaluation import lm_loss
from common.io import load_tensors, read_json, save_tensors, write_json
from common.training import TrainConfig, check_run_key, latest_checkpoint, train
from projects.compatible_specialization.checkpoints import base_shape, save_specialist
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
    meta = {**meta, **base_shape(model)}
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
    select_windows: torch.Tensor | None = None,
    eval_batch_size: int = 16,
    run_key: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train only the routers of a routed model in place (plain mean CE, no load balancing).

    `opt["keep"]`: "best" (the original's main.py) evaluates the routers on `select_windows` before the first
    update and after every `eval_every` updates short of the last, in the model's own dtype, and keeps those
    of the lowest loss (the first of equals), as the original keeps its best-test-loss `_routed.pt`;
    "last" keeps the final routers. The best routers are written to `best_routers.safetensors` with the
    evaluations in `router_selection.json`, so a killed run resumes its selection too.
    Returns {"losses": [(step, loss)], "evals": [(step, loss)], "best_step": int}.
    """
    cfg = train_config(opt, seed)
    params = router_parameters(model)  # `train` freezes every other parameter
    windows = RandomWindows(stream, context, cfg.max_steps * opt["batch_size"], seed)
    keep = opt.get("keep", "last")
    if keep not in ("best", "last"):
        raise ValueError(f"routing.keep must be 'best' or 'last', got {keep!r}")
    run = dict(params=list(params.values()), device=device, label="routers", run_key=run_key)
    if keep == "last":
        result = train(model, _causal_lm, windows, cfg, run_dir, **run)
        return {"losses": result.losses, "evals": [], "best_step": result.step}
    if select_windows is None:
        raise ValueError("routing.keep='best' needs held-out windows to select the routers on")
    best_path, record_path = (
        Path(run_dir) / "best_routers.safetensors",
        Path(run_dir) / "router_selection.json",
    )
    record: dict[str, Any] = {"evals": [], "best_step": None, "best_loss": math.inf}
    if record_path.exists() and latest_checkpoint(run_dir) is not None:  # a resumed run: its selection so far
        record = read_json(record_path)
        record.update(best_loss=float(record["best_loss"]), evals=[(s, v) for s, v in record["evals"]])

    def consider(m: nn.Module, step: int) -> None:
        if step >= cfg.max_steps or any(s == step for s, _ in record["evals"]):
            return  # the original never evaluates after the last update; a resumed step is not redone
        with torch.no_grad():
            loss = test_loss(m, select_windows, eval_batch_size, dtype=None)
        record["evals"].append((step, loss))
        if loss < record["best_loss"]:
            record.update(best_loss=loss, best_step=step)
            save_tensors(best_path, {k: v.detach() for k, v in params.items()}, {"step": str(step)})
        write_json(record_path, record)  # after the weights: the record never names routers not on disk

    every = opt["eval_every"]

    def evaluate_every(step: int, _logs: Any) -> None:  # before the step's checkpoint is saved
        if step % every == 0:
            consider(model, step)

    consider(model, 0)  # the original evaluates (and may keep) the routers before the first update
    result = train(model, _causal_lm, windows, cfg, run_dir, callbacks=[evaluate_every], **run)
    if record["best_step"] is None:
        raise FloatingPointError(f"every router evaluation in {run_dir} was NaN: {record['evals']}")
    best = load_tensors(best_path)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(best[name])
    return {"losses": result.losses, "evals": record["evals"], "best_step": record["best_step"]}


def test_loss(
    model: nn.Module, windows: torch.Tensor, batch_size: int, dtype: str | None = "float32"
) -> float:
    """Mean token NLL over held-out windows (N, T) with the weights in `dtype` ("bfloat16": as the original;
    None: the model's own). A model in another dtype is evaluated on a cast copy: casting in place and back
    would round a float32 model's weights to bf16 for good."""
    if dtype is not None and next(model.parameters()).dtype != getattr(torch, dtype):
        model = copy.deepcopy(model).to(getattr(torch, dtype))
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    return lm_loss(model, batches, disable=True)["loss"]
