"""The one training loop shared by the projects: AdamW with warmup and a schedule, gradient accumulation,
clipping, mixed precision and multi-GPU through `accelerate`, atomic checkpoints and exact resumption.

Layout of a run directory:
    run_dir/train_log.jsonl                      one JSON line per logged step or evaluation
    run_dir/tensorboard/events.out.tfevents.*    the same scalars, with `log_backend: tensorboard`
    run_dir/checkpoints/step_<N>/                weights.safetensors, optimizer.pt, trainer_state.json
    run_dir/checkpoints/latest.json              {"step": N, "path": "step_<N>"}

A resumed run reproduces the uninterrupted one bitwise (at a fixed thread count and process count):
the data order depends only on (seed, epoch), randomness inside a step (dropout, sampling in `loss_fn`)
only on (seed, step, process), and the checkpoint holds the data position, optimizer and scheduler.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, send_to_device, set_seed
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm
from transformers import get_scheduler

from common.device import resolve_device
from common.io import (
    CorruptFileError,
    atomic_dir,
    load_tensors,
    read_json,
    save_tensors,
    torch_load_safe,
    write_json,
    write_text,
)
from common.registry import lookup

# Our schedule names -> `transformers.get_scheduler` names; each starts with `warmup_steps` of linear warmup.
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
MIXED_PRECISION = ("no", "bf16", "fp16")
# The dtype a model trained under each `mixed_precision` is evaluated in (as the originals: bf16 runs
# evaluate a bf16 model).
EVAL_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHTS, OPTIMIZER, STATE = "weights.safetensors", "optimizer.pt", "trainer_state.json"
# Config keys a resumed run may change: they extend the run or change bookkeeping, not the updates so far.
_RESUMABLE_CHANGES = {"max_steps", "log_every", "eval_every", "save_every", "keep_last", "log_backend"}
_DATA_ORDER, _STEP_RNG = 0, 1  # stream tags for `_derived_seed`


@dataclass
class TrainConfig:
    """Optimisation settings; a step is one optimizer update over `grad_accum` micro-batches per process."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_steps: int = 1000
    warmup_steps: int = 0
    schedule: str = "linear"  # a key of SCHEDULES
    min_lr_ratio: float = 0.0  # cosine only: decay to min_lr_ratio * lr instead of 0 (nanoGPT-style floors)
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0  # None: no clipping
    seed: int = 0
    batch_size: int = 8  # micro-batch size, used only when the data is a dataset of examples
    shuffle: bool = True  # reshuffle a dataset of examples every epoch
    log_every: int = 10
    eval_every: int | None = None  # None: never call eval_fn
    save_every: int | None = None  # None: only the last step is saved
    keep_last: int = 2
    save_full: bool = False  # save all weights, not just the trained parameters and the buffers
    mixed_precision: str = "no"  # passed to accelerate: "no", "bf16" or "fp16"
    log_backend: str = "jsonl"  # a key of LOG_BACKENDS: where logged scalars go besides train_log.jsonl

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives a list
        lookup(LOG_BACKENDS, self.log_backend, "log_backend")
        lookup(SCHEDULES, self.schedule, "schedule")
        if not 0.0 <= self.min_lr_ratio < 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1), got {self.min_lr_ratio}")
        if self.min_lr_ratio and self.schedule != "cosine":
            raise ValueError(
                f"TrainConfig.min_lr_ratio applies to the cosine schedule, not {self.schedule!r}"
            )
        lookup(dict.fromkeys(MIXED_PRECISION), self.mixed_precision, "mixed_precision")
        for name in ("max_steps", "grad_accum", "batch_size", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be None or >= 1, got {getattr(self, name)}")


def _fit_accelerator_state(mixed_precision: str, cpu: bool) -> None:
    """accelerate keeps one state per process and refuses an `Accelerator` in another precision or on
    another device; one process may train several models in different precisions (fp32 specialists then
    a bf16 routed model), so a single-process state that does not fit is cleared. Under a distributed
    launch the state is the launcher's and stays."""
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if not state or PartialState._shared_state.get("num_processes", 1) != 1:
        return
    if state.get("_mixed_precision") != mixed_precision or (cpu and state["device"].type != "cpu"):
        AcceleratorState._reset_state()  # accelerate's own tests reset it the same way


def eval_dtype(mixed_precision: str) -> torch.dtype:
    """The evaluation dtype that goes with a training `mixed_precision` ("no" -> float32, "bf16" -> bfloat16)."""
    return lookup(EVAL_DTYPES, mixed_precision, "mixed_precision")


class _TensorBoard:
    """Scalars to `run_dir/tensorboard` through torch's SummaryWriter (needs the `tensorboard` package)."""

    def __init__(self, run_dir: Path, step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "log_backend=tensorboard needs the tensorboard package: pip install 'moerging[tensorboard]' "
                "(make setup installs it), or set log_backend=jsonl"
            ) from e
        # purge_step: a resumed run drops the events a killed run wrote after its last checkpoint
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step or None)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class _NoSink:
    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


# train_log.jsonl is always written; a backend adds a second sink for the same scalars.
LOG_BACKENDS: dict[str, Callable[[Path, int], Any]] = {
    "jsonl": lambda run_dir, step: _NoSink(),
    "tensorboard": _TensorBoard,
}


@dataclass
class TrainResult:
    """Where training stopped, with the loss and eval history (including steps before a resumption)."""

    step: int
    losses: list[tuple[int, float]]
    evals: list[tuple[int, dict[str, float]]]
    checkpoint: Path


def train(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    data: Any,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    params: Iterable[nn.Parameter] | None = None,
    eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
    callbacks: Sequence[Callable[[int, Mapping[str, float]], None]] = (),
    resume: bool = True,
    device: str | torch.device | None = None,
    label: str = "train",
    run_key: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Minimise `loss_fn(model, batch)` with AdamW over `params` (default: those with requires_grad).

    `data` is one of: a dataset of examples (`__getitem__` + `__len__`; batched here with `cfg.batch_size`
    and `collate_fn`, reshuffled each epoch from the seed), a callable `epoch -> iterable of batches`, or
    an iterable of batches re-read every epoch. The last two must give the same batches for the same
    epoch for a resumed run to match. Across processes each one takes every `num_processes`-th batch.
    `loss_fn` gets the prepared model (DDP-wrapped under multi-GPU); `eval_fn` the plain model, in eval
    mode under no_grad. Callbacks run after every step, before its checkpoint is saved, as
    `cb(step, {"loss", "lr", ["grad_norm"]})`. Training resets the global RNGs (torch, numpy, random) at every
    step. `device`: None or "auto" lets accelerate choose (the GPU when there is one); "cpu" keeps a run on
    the CPU on a GPU machine. `label` names the progress bar (the expert or stage being trained). `run_key`
    is what the weights are trained for beyond `cfg` (the resolved data, task, base model and model
    settings): it is saved in every checkpoint, and a checkpoint made for another key is never resumed (nor,
    when finished, reused). A corrupt newest checkpoint is moved aside and the previous one is resumed.
    """
    run_dir = Path(run_dir)
    trained = _trained_parameters(model, params)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None and not resume:
        raise FileExistsError(
            f"{run_dir} already has checkpoints ({checkpoint.name}): pass resume=True or use a new run_dir"
        )
    # accelerate places the model on its own device (cuda when available); it only takes a CPU override.
    on_cpu = device is not None and resolve_device(device).type == "cpu" and torch.cuda.is_available()
    _fit_accelerator_state(cfg.mixed_precision, on_cpu)
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=cfg.mixed_precision,
        # Steps are counted across epochs, never cut short at the end of an epoch.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.grad_accum, sync_with_dataloader=False
        ),
    )
    main = accelerator.is_main_process
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    prepared = model
    sink: Any = _NoSink()
    try:
        # Freeze what is not optimised: no gradients are computed or kept for it, and DDP ignores it.
        trained_ids = {id(p) for p in trained.values()}
        for p in model.parameters():
            p.requires_grad_(id(p) in trained_ids)
        optimizer = torch.optim.AdamW(
            list(trained.values()), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        # Not given to `accelerator.prepare`: its wrapper steps the schedule once per process per update,
        # while `max_steps` counts updates.
        scheduler = get_scheduler(
            "cosine_with_min_lr" if cfg.min_lr_ratio else SCHEDULES[cfg.schedule],
            optimizer,
            num_warmup_steps=cfg.warmup_steps,
            num_training_steps=cfg.max_steps,
            scheduler_specific_kwargs={"min_lr_rate": cfg.min_lr_ratio} if cfg.min_lr_ratio else None,
        )
        step, epoch, consumed = 0, 0, 0
        if checkpoint is not None:
            checkpoint = _restore_newest_readable(
                run_dir, model, optimizer, scheduler, accelerator, cfg, run_key
            )
        if checkpoint is not None:
            step, epoch, consumed = _position(checkpoint)
        prepared, optimizer = accelerator.prepare(model, optimizer)

        log_path = run_dir / "train_log.jsonl"
        history = _read_log(log_path, upto=step) if checkpoint is not None else []
        if main:  # drop what a killed run logged after its last checkpoint: those steps are redone
            write_text(log_path, "".join(json.dumps(entry) + "\n" for entry in history))
        losses = [(e["step"], e["loss"]) for e in history if "loss" in e]
        evals = [(e["step"], e["eval"]) for e in history if "eval" in e]

        rank, world = accelerator.process_index, accelerator.num_processes
        batches = _micro_batches(data, cfg, collate_fn, epoch, consumed, rank, world)
        if main:
            sink = LOG_BACKENDS[cfg.log_backend](run_dir, step)
        bar = tqdm(
            total=cfg.max_steps, initial=step, desc=label, disable=not accelerator.is_local_main_process
        )
        prepared.train()
        window: list[float] = []  # losses of the micro-batches of the current step
        while step < cfg.max_steps:
            if not window:
                set_seed(_derived_seed(cfg.seed, _STEP_RNG, step, rank))
            epoch, consumed, batch = next(batches)
            with accelerator.accumulate(prepared):
                loss = loss_fn(prepared, send_to_device(batch, accelerator.device))
                window.append(_loss_value(loss, step + 1))
                accelerator.backward(loss)  # divides by grad_accum: the step's loss is the micro-batch mean
            if not accelerator.sync_gradients:
                continue
            logs = {"loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0]}
            if cfg.max_grad_norm is not None:
                logs["grad_norm"] = accelerator.clip_grad_norm_(trained.values(), cfg.max_grad_norm).item()
                if not math.isfinite(logs["grad_norm"]) and accelerator.scaler is None:
                    raise FloatingPointError(f"gradient norm is {logs['grad_norm']} at step {step + 1}")
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:  # fp16 skips steps whose gradients overflowed
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, window = step + 1, []

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                loss_mean = _mean_over_processes(accelerator, logs["loss"])
                losses.append((step, loss_mean))
                if main:
                    _append_log(log_path, {"step": step, **logs, "loss": loss_mean})
                    sink.log(step, {f"train/{k}": v for k, v in {**logs, "loss": loss_mean}.items()})
                bar.set_postfix(loss=f"{loss_mean:.4g}")
            if eval_fn is not None and cfg.eval_every is not None and step % cfg.eval_every == 0:
                metrics = _evaluate(eval_fn, accelerator.unwrap_model(prepared))
                evals.append((step, metrics))
                if main:
                    _append_log(log_path, {"step": step, "eval": metrics})
                    sink.log(step, {f"eval/{k}": v for k, v in metrics.items()})
            # Callbacks before the checkpoint: what they write (snapshots) exists whenever the checkpoint
            # does, so a run killed right after saving step N never resumes past a snapshot it lacks.
            for callback in callbacks:
                callback(step, logs)
            if main and (
                step == cfg.max_steps or (cfg.save_every is not None and step % cfg.save_every == 0)
            ):
                _save_checkpoint(
                    run_dir,
                    step,
                    accelerator.unwrap_model(prepared),
                    trained,
                    optimizer,
                    scheduler,
                    accelerator,
                    (epoch, consumed),
                    cfg,
                    run_key,
                )
            bar.update(1)
        bar.close()
        return TrainResult(step, losses, evals, run_dir / "checkpoints" / f"step_{step}")
    finally:
        sink.close()
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)  # undo the mixed-precision forward patch
        model.train(was_training)


def _as_json(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples -> lists, paths -> str), so saved and current keys compare."""
    return json.loads(json.dumps(obj, default=str))


def check_run_key(checkpoint: str | os.PathLike, run_key: Mapping[str, Any] | None) -> None:
    """Refuse a checkpoint trained for another run key (see `train`); checkpoints saved before run keys
    existed, or a caller that gives none, are not compared."""
    saved = read_json(Path(checkpoint) / STATE).get("run_key")
    if run_key is None or saved is None:
        return
    now = _as_json(run_key)
    changed = {
        k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)
    }
    if changed:
        raise ValueError(
            f"cannot resume from {checkpoint}: it was trained for another run (key: saved, now): {changed}; "
            f"use a new output folder or delete {Path(checkpoint).parents[1]}"
        )


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete `run_dir/checkpoints/step_<N>`; half-written ones (temp dirs, missing files) are skipped."""
    complete = _complete_checkpoints(Path(run_dir) / "checkpoints")
    return complete[-1][1] if complete else None


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, oldest first."""
    steps = []
    for path in root.glob("step_*"):
        match = re.fullmatch(r"step_(\d+)", path.name)
        if match and all((path / name).is_file() for name in (WEIGHTS, OPTIMIZER, STATE)):
            steps.append((int(match.group(1)), path))
    return sorted(steps)


def load_weights(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Copy a checkpoint's weights (the trained ones, or all with `save_full`) into `model`, in place."""
    _copy_weights(model, load_tensors(Path(checkpoint) / WEIGHTS), checkpoint)


def _copy_weights(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], checkpoint: str | os.PathLike
) -> None:
    state = model.state_dict(keep_vars=True)
    unknown = sorted(set(tensors) - set(state))
    if unknown:
        raise KeyError(f"{checkpoint} holds weights that the model does not have: {unknown[:5]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            state[name].copy_(tensor)


def _trained_parameters(model: nn.Module, params: Iterable[nn.Parameter] | None) -> dict[str, nn.Parameter]:
    """The parameters to optimise by name, in model order (so optimizer state lines up on resume)."""
    if params is None:
        trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    else:
        ids = {id(p) for p in params}
        trained = {name: p for name, p in model.named_parameters() if id(p) in ids}
        if len(trained) != len(ids):
            raise ValueError("`params` holds tensors that are not parameters of `model`")
    if not trained:
        raise ValueError("nothing to train: no parameter requires grad and no `params` were given")
    return trained


def _derived_seed(*key: int) -> int:
    """A 32-bit seed for `key`; numpy's SeedSequence keeps the streams of nearby keys independent."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def _micro_batches(
    data: Any, cfg: TrainConfig, collate_fn: Callable | None, epoch: int, consumed: int, rank: int, world: int
) -> Iterator[tuple[int, int, Any]]:
    """Yield (epoch, micro-batches consumed in that epoch, batch) forever, after `consumed` of `epoch`."""
    while True:
        empty = True
        for position, batch in enumerate(
            _epoch_batches(data, cfg, collate_fn, epoch, consumed, rank, world), start=consumed + 1
        ):
            empty = False
            yield epoch, position, batch
        if empty and consumed == 0:
            raise ValueError(_no_batches_message(data, cfg, rank, world, epoch))
        epoch, consumed = epoch + 1, 0


def _no_batches_message(data: Any, cfg: TrainConfig, rank: int, world: int, epoch: int) -> str:
    """Why an epoch is empty: with a dataset of examples, usually fewer examples than one batch needs."""
    if _is_examples(data):
        n, per_step = len(data), cfg.batch_size * world
        return (
            f"the training data yields no batches: {n} examples, fewer than the batch size {cfg.batch_size}"
            + (f" times {world} processes" if world > 1 else "")
            + f" ({per_step} examples per micro-batch across processes; only full batches are used); "
            "add examples or lower the batch size"
        )
    return f"the training data yields no batches for process {rank} of {world} in epoch {epoch} (it is empty)"


def _epoch_batches(
    data: Any, cfg: TrainConfig, collate_fn: Callable | None, epoch: int, skip: int, rank: int, world: int
) -> Iterable[Any]:
    """This process's micro-batches of `epoch` without its first `skip`."""
    if callable(data):
        batches = data(epoch)
    elif _is_examples(data):
        # We draw the order ourselves so that it depends only on (seed, epoch), and batch indices so that
        # resuming skips indices, not loaded batches. Full batches only, as many on every process (DDP
        # needs all processes to step together).
        n = len(data)
        generator = torch.Generator().manual_seed(_derived_seed(cfg.seed, _DATA_ORDER, epoch))
        order = torch.randperm(n, generator=generator) if cfg.shuffle else torch.arange(n)
        indices = order[: n - n % cfg.batch_size].view(-1, cfg.batch_size).tolist()
        indices = indices[: len(indices) - len(indices) % world]
        # The generator keeps DataLoader from drawing its base seed from the global RNG, which would shift
        # the step's dropout masks depending on where epochs start.
        mine = indices[rank::world][skip:]
        return DataLoader(data, batch_sampler=mine, collate_fn=collate_fn, generator=generator)
    else:
        batches = data
    return itertools.islice(batches, rank + skip * world, None, world)


def _is_examples(data: Any) -> bool:
    """A map-style dataset of examples (torch or `datasets`), as opposed to a list or stream of batches."""
    return (
        hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
        and not isinstance(data, (list, tuple, IterableDataset))
    )


def _loss_value(loss: torch.Tensor, step: int) -> float:
    """The loss as a float; NaN/inf stops training before the update, so no checkpoint gets bad weights."""
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise ValueError(
            f"loss_fn must return a scalar tensor, got {type(loss).__name__} {getattr(loss, 'shape', '')}"
        )
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} at step {step}; stopped before updating the weights")
    return value


def _mean_over_processes(accelerator: Accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(torch.tensor(value, device=accelerator.device), "mean").item()


def _evaluate(eval_fn: Callable[[nn.Module], Mapping[str, float]], model: nn.Module) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        metrics = {key: float(value) for key, value in eval_fn(model).items()}
    model.train()
    return metrics


def _read_log(path: Path, upto: int) -> list[dict[str, Any]]:
    """Entries of a previous run's log up to step `upto`; a line cut short by a kill is dropped."""
    entries = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry["step"] <= upto:
            entries.append(entry)
    return entries


def _append_log(path: Path, entry: Mapping[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")


def _saved_weights(
    model: nn.Module, trained: Mapping[str, nn.Parameter], full: bool
) -> dict[str, torch.Tensor]:
    """Trained parameters and persistent buffers (e.g. BatchNorm statistics), or the whole state dict."""
    state = model.state_dict()
    if not full:
        buffers = {name for name, _ in model.named_buffers()}
        state = {name: t for name, t in state.items() if name in trained or name in buffers}
    # safetensors refuses tensors sharing memory (tied embeddings); copy all but the first of each.
    seen, weights = set(), {}
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        weights[name] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return weights


def _save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    trained: Mapping[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Accelerator,
    position: tuple[int, int],
    cfg: TrainConfig,
    run_key: Mapping[str, Any] | None = None,
) -> None:
    """Write `checkpoints/step_<step>` atomically, point `latest.json` at it and prune to `keep_last`."""
    root = run_dir / "checkpoints"
    with atomic_dir(root / f"step_{step}") as tmp:
        save_tensors(
            tmp / WEIGHTS, _saved_weights(model, trained, cfg.save_full), metadata={"step": str(step)}
        )
        # Plain dicts of tensors and numbers, read back with weights_only=True.
        extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        if accelerator.scaler is not None:
            extra["scaler"] = accelerator.scaler.state_dict()
        torch.save(extra, tmp / OPTIMIZER)
        write_json(
            tmp / STATE,
            {
                "step": step,
                "epoch": position[0],
                "batches_in_epoch": position[1],
                "num_processes": accelerator.num_processes,
                "config": asdict(cfg),
                **({"run_key": _as_json(run_key)} if run_key is not None else {}),
            },
        )
    write_json(root / "latest.json", {"step": step, "path": f"step_{step}"})
    for _, path in _complete_checkpoints(root)[: -cfg.keep_last]:
        shutil.rmtree(path)


def _restore_newest_readable(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Accelerator,
    cfg: TrainConfig,
    run_key: Mapping[str, Any] | None = None,
) -> Path | None:
    """Restore the newest checkpoint that reads back; a corrupt one (e.g. a disk filled up after the
    rename) is moved aside to `.step_<N>.corrupt` with a warning, and the one before it is tried."""
    for _, checkpoint in reversed(_complete_checkpoints(run_dir / "checkpoints")):
        try:
            _restore(checkpoint, model, optimizer, scheduler, accelerator, cfg, run_key)
            return checkpoint
        except CorruptFileError as e:
            aside = checkpoint.with_name(f".{checkpoint.name}.corrupt")
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(checkpoint, aside)
            warnings.warn(
                f"checkpoint {checkpoint} is corrupt ({e}); moved it to {aside.name} and resuming from the "
                "previous complete checkpoint",
                stacklevel=3,
            )
    return None


def _position(checkpoint: Path) -> tuple[int, int, int]:
    """(step, epoch, micro-batches consumed in that epoch) saved in `checkpoint`."""
    state = read_json(checkpoint / STATE)
    return state["step"], state["epoch"], state["batches_in_epoch"]


def _restore(
    checkpoint: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Accelerator,
    cfg: TrainConfig,
    run_key: Mapping[str, Any] | None = None,
) -> None:
    """Load a checkpoint into the training state. Every file is read before anything is changed, so a
    corrupt file (CorruptFileError) leaves the model and optimizer as they were."""
    state = read_json(checkpoint / STATE)
    check_run_key(checkpoint, run_key)
    now = json.loads(json.dumps(asdict(cfg)))
    changed = {
        k: (state["config"].get(k), v)
        for k, v in now.items()
        if k not in _RESUMABLE_CHANGES and state["config"].get(k) != v
    }
    if changed:
        raise ValueError(f"cannot resume from {checkpoint}: the config changed (saved, now): {changed}")
    if state["num_processes"] != accelerator.num_processes:
        raise ValueError(
            f"cannot resume from {checkpoint}: saved with {state['num_processes']} processes, "
            f"now {accelerator.num_processes} (the data position is per process)"
        )
    tensors = load_tensors(checkpoint / WEIGHTS)
    extra = torch_load_safe(checkpoint / OPTIMIZER)
    _copy_weights(model, tensors, checkpoint)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(extra["scaler"])
