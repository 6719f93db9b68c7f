"""Defaults (the paper's settings) and config resolution: flags > `key=value` overrides > files > defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.config import check_at_least, load_config

CONFIG_DIR = Path(__file__).parent / "configs"
SCALES = ("micro", "tiny", "paper", "real")
# Each scale's config file: GPT-2 for the paper and its offline stand-ins, SmolLM2-135M for the real arm.
CONFIG_FILES = {
    "micro": "micro_gpt2.yaml",
    "tiny": "tiny_gpt2.yaml",
    "paper": "paper_gpt2.yaml",
    "real": "real_smollm2.yaml",
}

DEFAULTS: dict[str, Any] = {
    "scale": "paper",
    "arch": "gpt2",
    "seed": 0,
    "context": 1024,
    "eval_batch_size": 16,
    "eval_dtype": "bfloat16",  # the original casts the model to bf16 for routed/interpolated evaluation
    "device": "auto",  # where the models live: auto (cuda if available, else cpu), cpu, cuda, cuda:N
    "out_dir": "runs/compatible_specialization",
    "model": {
        "base": "gpt2",  # a hub id (paper), a tiny-world base name (tiny, micro) or a spec ('real:smollm2-135m')
        "activation_function": "gelu",  # the original's exact nn.GELU; null keeps the base's
        "untie_head": True,  # the original's lm_head is a separate (frozen) copy of wte
        "random_layers": None,  # micro only: a random base of this depth with the micro base's config
        "attn_implementation": None,  # transformers' choice; "eager" for SmolLM2 on CPU, as the zoo
    },
    "data": {
        "code": "nampdn-ai/tiny-codes",
        "math": "microsoft/orca-math-word-problems-200k",
        "target": "reasoning-machines/gsm-hard",
        "split_seed": 2357,  # offline sets: the GSM template split seed (0 = the one all tasks share)
        # builder kwargs of the offline sets (problems drawn per GSM template); the hub sets take none
        "build_kwargs": {
            "gsm_variants": {"n_per_template": 8},
            "gsm_hard": {"n_per_template": 4},
            "zoo_gsm_hard": {"n_per_template": 4},  # the real arm's target (data.zoo_gsm_hard_texts)
        },
        "select_split": "validation",  # where α is chosen (the original has one held-out split)
        "test_split": "validation",  # where losses are reported
        "max_train_tokens": None,  # cap on each domain's training stream (null: all of it)
        "max_eval_windows": 800,  # the original: 50 micro-batches of 16 windows
    },
    "finetune": {
        "train_tokens": 560000,  # windows, as the original's --train_tokens: 8750 steps of 64
        "batch_size": 64,
        "grad_accum": 2,
        "lr": 8.0e-4,
        "wd": 0.1,
        "schedule": "cosine",
        "min_lr_ratio": 0.1,  # the original's cosine ends at 0.1·lr (0: transformers' decay to 0)
        "clip": 1.0,
        "early_step": 1000,
        "later_step": 8000,
        "snapshot_every": 500,  # CKA over fine-tuning checkpoints
        "mixed_precision": "no",  # common.training's: "no", "bf16", "fp16"
        "log_backend": "jsonl",  # or "tensorboard": also write the logged scalars as TensorBoard events
        "save_every": 500,  # a resumable checkpoint (weights, optimizer, data position); a killed run resumes
    },
    "routing": {
        "train_tokens": 160000,
        "batch_size": 92,
        "grad_accum": 1,
        "lr": 5.0e-3,
        "wd": 0.1,
        "schedule": "cosine",
        "min_lr_ratio": 0.1,
        "clip": 1.0,
        "topk": 2,
        "renormalize": False,  # the original keeps the top-k softmax weights as they are
        "num_multi_layer_experts": 1,
        "multi_layer": [1, 2, 3, 4],  # the table's L values (k = 2L, all experts)
        "dtype": "bfloat16",  # the original casts the routed model (routers too) to bf16 and trains it so
        "keep": "best",  # the original keeps the routers of the best held-out loss; "last": the final ones
        "eval_every": 200,  # the original's log_freq: routers evaluated at step 0 and every 200 updates
        "mixed_precision": "no",  # autocast on top of `dtype` ("bf16" with dtype float32: our former choice)
        "log_backend": "jsonl",
        "save_every": 500,
    },
    "interpolation": {"alphas": [round(0.1 * i, 1) for i in range(11)]},
    "cka": {"layer": 6, "windows": 128},  # the original: hidden_states_list[6], one batch of 128
}


# Integer keys and their least valid value (0 batches or tokens would divide by zero or index nothing).
POSITIVE = {
    "seed": 0,
    "context": 1,
    "eval_batch_size": 1,
    **{f"{s}.{k}": 1 for s in ("finetune", "routing") for k in ("train_tokens", "batch_size", "grad_accum")},
    "finetune.early_step": 0,
    "finetune.later_step": 0,
    "finetune.snapshot_every": 0,
    "finetune.save_every": 1,
    "routing.save_every": 1,
    "routing.topk": 1,
    "routing.eval_every": 1,
}

# Keys with a closed set of values.
CHOICES = {"routing.dtype": ("bfloat16", "float32"), "routing.keep": ("best", "last")}


def config_file(scale: str) -> Path:
    """`configs/<scale>_<model>.yaml` (CONFIG_FILES)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {SCALES}")
    return CONFIG_DIR / CONFIG_FILES[scale]


def resolve(
    scale: str | None, config: str | None, overrides: list[str], flags: dict[str, Any]
) -> dict[str, Any]:
    """The run's config: `--config` (or the scale's file) < overrides < flags."""
    files = [config] if config else [config_file(scale or "paper")]
    cfg = load_config(DEFAULTS, files, overrides, flags)
    where = f"{files[0]}, a key=value override or a flag such as --batch_size, --context, --seed"
    check_at_least(cfg, POSITIVE, where)
    if scale is not None:
        cfg["scale"] = scale
    if cfg["scale"] not in SCALES:
        raise ValueError(f"unknown scale {cfg['scale']!r}; choose one of {SCALES}")
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        if cfg[section][name] not in allowed:
            raise ValueError(f"{key} is {cfg[section][name]!r} in {where}; choose one of {allowed}")
    return cfg
