"""Fine-tune copies of a causal LM on text domains: the tiny stand-ins for the Mistral-7B experts
(MetaMath: math, speechless-code: code). `method: full` fine-tunes every weight and saves the model with
`save_pretrained`; `method: lora` trains a PEFT LoRA and saves the adapter folder, which a model pool with
`adapters: true` merges into full deltas before upscaling (the SmolLM2-135M arm).

    python -m projects.smile.finetune_lm --config projects/smile/configs/tiny_finetune_lm.yaml seed=0 \
        out=runs/smile/tiny/lm_experts/seed_0
    python -m projects.smile.finetune_lm --config projects/smile/configs/tiny_finetune_lm_smollm2.yaml seed=0 \
        out=runs/smile/tiny/smollm2/experts/seed_0
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoTokenizer

from common.adapters import add_adapter, lora_config, save_adapter
from common.cli import run_main
from common.config import load_config
from common.data import load
from common.io import atomic_dir
from common.models import load_model
from common.tiny_world import PRETRAIN_SPLIT_SEED, token_windows
from common.training import TrainConfig, train
from projects.smile.finetune import finetune_experts
from projects.smile.pools import resolve_path

DEFAULTS: dict[str, Any] = {
    "base": "tiny:mistral",
    # expert name -> the dataset (common.data) and the fields joined into one text per example
    "experts": {
        "math": {"dataset": "gsm_variants", "fields": ["question", "answer"]},
        "code": {"dataset": "stdlib_code", "fields": ["text"]},
    },
    "seq_len": 128,
    "method": "full",  # full: every weight; lora: a PEFT LoRA (lora.r, lora.alpha, lora.targets)
    "lora": {"r": 16, "alpha": 16, "targets": None},  # targets null: the family's defaults
    "seed": 0,
    "scale": "tiny",
    "out": "runs/smile/tiny/lm_experts/seed_0",
    "train": {
        "lr": 5e-4,
        "weight_decay": 0.01,
        "max_steps": 200,
        "warmup_steps": 20,
        "batch_size": 16,
        "log_backend": "jsonl",
    },
}


def domain_texts(spec: dict[str, Any], split: str) -> list[str]:
    """One text per example of `spec['dataset']`'s split (split seed 0), the fields joined by newlines."""
    ds = load(spec["dataset"], seed=PRETRAIN_SPLIT_SEED)[0][split]
    return ["\n".join(str(row[f]) for f in spec["fields"]) for row in ds]


METHODS = ("full", "lora")


def finetune_expert(cfg: dict[str, Any], spec: dict[str, Any], out: Path) -> float:
    """Fine-tune one copy of the base on a domain, save it to `out`; returns the final training loss."""
    if cfg["method"] not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {cfg['method']!r}")
    base = resolve_path(cfg["base"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = load_model(base).train()
    if cfg["method"] == "lora":  # peft leaves only the adapters trainable
        lora = cfg["lora"]
        model = add_adapter(
            model,
            lora_config(model.config.model_type, lora["r"], lora["alpha"], target_modules=lora["targets"]),
        )
    data = token_windows(tokenizer, domain_texts(spec, "train"), cfg["seq_len"], tokenizer.eos_token_id)
    tc = TrainConfig(**{**cfg["train"], "seed": cfg["seed"], "schedule": "cosine", "log_every": 20})
    run = out.with_name(out.name + ".training")
    loss_fn = lambda m, batch: m(input_ids=batch, labels=batch).loss  # noqa: E731
    result = train(model, loss_fn, data, tc, run, label=f"expert {out.name}")
    if cfg["method"] == "lora":
        save_adapter(model.eval(), out)
    else:
        with atomic_dir(out) as tmp:  # a crash mid-write leaves no folder that a later run would reuse
            model.eval().save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return result.losses[-1][1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    cfg = load_config(DEFAULTS, args.config, args.overrides)
    experts = cfg["experts"]
    finetune_experts(
        cfg,
        "finetune_lm",
        list(experts),
        train_one=lambda name, folder: {"final_train_loss": finetune_expert(cfg, experts[name], folder)},
        validate_one=lambda name, folder: {},  # a reused expert is not scored again (bits per byte: the pools)
        may_change=("experts",),
    )


if __name__ == "__main__":
    sys.exit(run_main(main))
