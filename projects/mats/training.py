"""Fine-tune one expert (a single task) or the multitask model (a mixture), fully or with (IA)^3.

As the original (`src/training.py`): AdamW at a constant rate, evaluation every `checkpoint_frequency`
steps on the validation split, the best checkpoint kept as `checkpoint_{idx}/` (a PEFT (IA)^3 adapter folder or a `save_pretrained` folder), and early
stopping after `early_stopping_num_checkpoints_without_improvement` checkpoints without improvement.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from accelerate import PartialState
from datasets import Dataset

from common.io import read_json, write_json
from common.rundir import RunDir, seed_everything
from common.training import TrainConfig, latest_checkpoint, train
from projects.mats.experiment import eval_data, evaluate, name_of_model
from projects.mats.model import (
    build,
    encode,
    example_log_probs,
    is_encoder_decoder,
    merged_parameters,
    save_model,
)
from projects.mats.tasks import answer, load_mixture


class EarlyStop(Exception):
    """Raised from the evaluation hook when the validation score stopped improving."""


def run_dir_of(cfg: Mapping[str, Any]) -> Path:
    """{exp_out}/{format}/{dataset}/{model}/{descriptor}/{run_name or timestamp}."""
    e = cfg["experiment"]
    name = e["run_name"] or time.strftime("%Y-%m-%d-%H-%M-%S")
    return Path(
        e["exp_out"], e["instruction_format"], cfg["train_dataset"]["train_dataset"], name_of_model(cfg),
        cfg["model"]["format"], name,
    )  # fmt: skip


def train_config(cfg: Mapping[str, Any]) -> TrainConfig:
    r = cfg["train_run"]
    if r["train_batch_size"] % r["micro_train_batch_size"]:
        raise ValueError(
            f"train_batch_size {r['train_batch_size']} must be a multiple of micro_train_batch_size "
            f"{r['micro_train_batch_size']}"
        )
    return TrainConfig(
        lr=r["lr"],
        weight_decay=r["weight_decay"],
        max_steps=r["num_batches"],
        warmup_steps=r["warmup_steps"],
        schedule=r["schedule"],
        grad_accum=r["train_batch_size"] // r["micro_train_batch_size"],
        batch_size=r["micro_train_batch_size"],
        seed=r["seed"],
        eval_every=r["checkpoint_frequency"],
        log_every=max(1, min(10, r["checkpoint_frequency"])),
        mixed_precision=r["mixed_precision"],
        log_backend=r["log_backend"],
        max_grad_norm=None,
    )


def _validation_history(run_dir: Path, tcfg: TrainConfig) -> list[dict]:
    """The validations a previous run of this folder made up to the training checkpoint it resumes from
    (`checkpoints.json`; evaluation i ran at step (i+1)·eval_every); later ones are redone. Best-checkpoint
    files that no kept validation chose are removed, so the folder ends as an uninterrupted run's would."""
    done = latest_checkpoint(run_dir)
    path = run_dir / "checkpoints.json"
    history = read_json(path) if done is not None and path.is_file() else []
    step = read_json(done / "trainer_state.json")["step"] if done is not None else 0
    history = [h for h in history if (h["checkpoint_idx"] + 1) * tcfg.eval_every <= step]
    best = _best_of(history)["idx"]
    if PartialState().is_main_process:
        for f in run_dir.glob("checkpoint_*"):  # save_model folders (checkpoint_<idx>/)
            if f.is_dir() and re.fullmatch(r"checkpoint_\d+", f.name) and f.name != f"checkpoint_{best}":
                shutil.rmtree(f)
    if best is not None and not (run_dir / f"checkpoint_{best}").is_dir():
        raise FileNotFoundError(
            f"{run_dir}: checkpoints.json names checkpoint_{best} as the best, but it is gone; "
            "delete the run folder and train again"
        )
    return history


def _best_of(history: list[dict]) -> dict[str, Any]:
    """The first validation with the highest average (as the original's strict `>`)."""
    best: dict[str, Any] = {"score": -1.0, "idx": None}
    for h in history:
        if h["average"] > best["score"]:
            best.update(score=h["average"], idx=h["checkpoint_idx"])
    return best


def train_model(cfg: Mapping[str, Any], run_dir: str | Path | None = None, scale: str | None = None) -> Path:
    """Train as configured; returns the run dir (results.json names the best checkpoint)."""
    run_dir = Path(run_dir or run_dir_of(cfg))
    seed_everything(cfg["train_run"]["seed"])
    fmt = cfg["model"]["format"]
    model, tokenizer = build(cfg["model"])
    mixture = load_mixture(
        cfg["train_dataset"]["train_dataset"], "train", cfg["train_dataset"]["max_examples"]
    )
    # Multitask training concatenates the tasks' examples (each capped at max_examples), as the original.
    train_set = Dataset.from_list([ex for exs in mixture.values() for ex in exs])
    val = eval_data(cfg, split="validation")
    enc_dec = is_encoder_decoder(model)
    max_len = cfg["model"]["max_source_len"]

    def collate(examples: list[dict]) -> dict:
        return encode(
            tokenizer,
            [ex["question"] for ex in examples],
            [answer(ex) for ex in examples],
            encoder_decoder=enc_dec,
            max_source_len=max_len,
        )

    def loss_fn(m, batch):
        return -example_log_probs(m, batch).mean()

    rd = RunDir(run_dir, project="mats", experiment="train", scale=scale or cfg["model"]["scale"],
                seed=cfg["train_run"]["seed"], config=cfg)  # fmt: skip
    tcfg = train_config(cfg)
    history = _validation_history(run_dir, tcfg)
    best = _best_of(history)
    patience = cfg["train_run"]["early_stopping_num_checkpoints_without_improvement"]
    main_process = PartialState().is_main_process

    def eval_fn(m) -> dict[str, float]:
        scores = evaluate(m, tokenizer, val, cfg)
        idx = len(history)
        history.append({"checkpoint_idx": idx, **scores})
        improved = scores["average"] > best["score"]
        if improved:
            if main_process:
                old = run_dir / f"checkpoint_{best['idx']}"
                save_model(model, fmt, run_dir / f"checkpoint_{idx}", tokenizer)
                if best["idx"] is not None and old.is_dir():
                    shutil.rmtree(old)
            best.update(score=scores["average"], idx=idx)
        if main_process:  # on disk at once: a re-run or resumed run continues it (with the best's score)
            write_json(run_dir / "checkpoints.json", history)
        if not improved and idx - best["idx"] >= patience:
            raise EarlyStop
        return scores

    stopped_early = False
    try:
        train(model, loss_fn, train_set, tcfg, run_dir, collate_fn=collate,
              params=merged_parameters(model, fmt).values(), eval_fn=eval_fn,
              label=f"{fmt} {cfg['train_dataset']['train_dataset']}")  # fmt: skip
    except EarlyStop:
        stopped_early = True
    if best["idx"] is None:  # fewer steps than one checkpoint: evaluate the final model once
        eval_fn(model)
    write_json(run_dir / "checkpoints.json", history)
    rd.write_results(
        {
            "validation": history[best["idx"]],
            "best_checkpoint_idx": best["idx"],
            "stopped_early": stopped_early,
        },
        checkpoint=str(run_dir / f"checkpoint_{best['idx']}"),
    )
    return run_dir
