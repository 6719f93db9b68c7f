"""Train one LoRA expert (a task or a cluster's union of tasks) and add it to a library (mttl train_experts.py).

The expert is a peft LoRA on the family's attention projections, A drawn as mttl's (`lora_init=mttl`:
U(±1/√(3·d_in)); `lora_init=peft` keeps peft's U(±1/√d_in)); with `tie_params` (Phi-2 config) the
q/k/v projections of a layer share one lora_A module. The kept weights are those of the best
validation loss, validated every epoch unless `eval_every` steps is set (mttl pushes the best `val/loss`
checkpoint of its per-epoch validations; the weights before training are never a candidate).
"""

from __future__ import annotations

import functools
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from common.adapters import lora_config, save_adapter
from common.evaluation import IGNORE_INDEX
from common.evaluation import pad_id as pad_token
from common.io import load_tensors, read_json, save_tensors, tensors_metadata
from common.lm_finetune import collate as lm_collate
from common.tiny_world import resolve_base
from common.training import TrainConfig, check_run_key, latest_checkpoint, train
from projects.mbc_arrow.arrow import tie_groups
from projects.mbc_arrow.expert_model import load_base, precision
from projects.mbc_arrow.library import ExpertInfo, ExpertLibrary
from projects.mbc_arrow.tasks import prompt_and_answer, resolve_task_names, task_data


def encode_example(
    tokenizer: Any, source: str, target: str, max_input: int, max_output: int, prompt_format: str = "mttl"
) -> dict[str, list[int]]:
    """Prompt ids (left-truncated, as mttl's truncation_side=left) + target ids + EOS; loss on the target."""
    prompt_text, answer_text = prompt_and_answer(source, target, prompt_format)
    prompt = tokenizer.encode(prompt_text)[-max_input:]
    answer = ([*tokenizer.encode(answer_text), tokenizer.eos_token_id])[:max_output]
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def collate(pad_id: int) -> Callable[[Sequence[Mapping[str, list[int]]]], dict[str, torch.Tensor]]:
    """A DataLoader collate_fn: `common.lm_finetune.collate` (right padding, -100 labels) with `pad_id` bound."""
    return functools.partial(lm_collate, pad_id=pad_id)


def tie_lora_a(model: nn.Module, tie_params: str | None) -> int:
    """Make the q/k/v projections of each layer share one lora_A (mttl tie_params); returns #groups tied."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    tied = 0
    for group in tie_groups(list(layers), tie_params):
        for m in group[1:]:
            layers[m].lora_A["default"] = layers[group[0]].lora_A["default"]
        tied += len(group) > 1
    return tied


LORA_INITS = ("mttl", "peft")


def mttl_lora_init(model: nn.Module) -> int:
    """Draw every lora_A from U(±1/√(3·d_in)) as mttl's LoRA (`lora.py`: kaiming gain √(1/3) for a = √5,
    over √d_in); peft's default is U(±1/√d_in), √3 wider. B stays zero. Returns #layers initialised."""
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLayer) and "default" in m.lora_A:
                weight = m.lora_A["default"].weight  # (r, d_in)
                bound = 1 / math.sqrt(3 * weight.shape[1])
                weight.uniform_(-bound, bound)
                n += 1
    return n


def peft_targets(modify_layers: str) -> str | list[str]:
    """mttl's `modify_layers` as peft target_modules: names 'q_proj|k_proj' -> a list, a regex
    ('.*dense|.*q_proj', Phi-2) -> the regex, which peft full-matches against module names."""
    if any(ch in modify_layers for ch in ".*[]()?+"):
        return modify_layers
    return modify_layers.split("|")


def validation_interval(eval_every: int | None, steps_per_epoch: int, total_steps: int) -> int:
    """Optimizer steps between validations, as mttl's train_experts: every epoch when `eval_every` is unset
    (None or -1), else every `eval_every` steps, at most an epoch or the whole run."""
    if eval_every is None or eval_every == -1:
        return max(1, min(steps_per_epoch, total_steps))
    if eval_every <= 0:
        raise ValueError(f"eval_every={eval_every}: give a number of steps, or -1 / unset for every epoch")
    return max(1, min(eval_every, steps_per_epoch, total_steps))


def lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


@torch.no_grad()
def mean_loss(
    model: nn.Module, examples: Sequence[Mapping[str, list[int]]], pad_id: int, batch_size: int = 32
) -> float:
    """Token-weighted mean target loss over `examples`."""
    fn, total, count = collate(pad_id), 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in fn(examples[i : i + batch_size]).items()}
        n_tok = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += float(model(**batch).loss) * n_tok
        count += n_tok
    return total / max(count, 1)


# Config keys that decide an expert's weights (with the resolved task list): the resume key of its run folder.
RUN_KEY = (
    "base_model", "dataset", "max_train_examples", "max_eval_examples", "max_input_length",
    "max_output_length", "lora_rank", "lora_alpha", "lora_dropout", "modify_layers", "tie_params", "seed",
)  # fmt: skip
BEST_FILE = "best_val.safetensors"  # the best validation's trained weights; metadata: val_loss, step


def resumed_best(run_dir: Path, tcfg: TrainConfig, run_key: Mapping[str, Any]) -> dict[str, Any]:
    """The best validation so far of the run `train` will resume in `run_dir` (none for a new run): its
    loss, weights and the number of validations made; a best found after the resumed step is redone."""
    best: dict[str, Any] = {"val_loss": math.inf, "state": None, "evals": 0}
    done = latest_checkpoint(run_dir)
    if done is None:
        return best
    check_run_key(done, run_key)  # before anything is read from the folder
    step = read_json(done / "trainer_state.json")["step"]
    best["evals"] = step // tcfg.eval_every
    path = run_dir / BEST_FILE
    if path.is_file() and int(tensors_metadata(path)["step"]) <= step:
        best.update(val_loss=float(tensors_metadata(path)["val_loss"]), state=load_tensors(path))
    return best


def train_expert(cfg: Mapping[str, Any], library: ExpertLibrary, run_dir: str) -> dict[str, Any]:
    """Train the expert `cfg["expert_name"]` on `cfg["finetune_task_name"]` and add it to `library`."""
    tasks = resolve_task_names(cfg["finetune_task_name"], cfg["finetune_task_path"])
    name = cfg["expert_name"] or cfg["finetune_task_name"]
    data = task_data(
        tasks, dataset=cfg["dataset"], max_train=cfg["max_train_examples"], max_eval=cfg["max_eval_examples"]
    )
    torch.manual_seed(cfg["seed"])
    model, tok = load_base(
        cfg["base_model"], cfg["device"]
    )  # fp32 weights; bf16 autocast when precision=bf16
    pad_id = pad_token(tok)
    lcfg = lora_config(
        model.config.model_type,
        r=cfg["lora_rank"],
        alpha=cfg["lora_alpha"],
        target_modules=cfg["modify_layers"].split("|"),
        dropout=cfg["lora_dropout"],
    )
    lcfg.target_modules = peft_targets(cfg["modify_layers"])
    peft_model = get_peft_model(model, lcfg)
    # a path or hub id that loads anywhere (AutoPeftModelForCausalLM): a tiny/micro spec resolved to its
    # folder; the spec itself stays in extras.json and the library's info.json
    peft_model.peft_config["default"].base_model_name_or_path = resolve_base(cfg["base_model"])
    if cfg["lora_init"] not in LORA_INITS:
        raise ValueError(f"lora_init={cfg['lora_init']!r}: choose one of {LORA_INITS}")
    if cfg["lora_init"] == "mttl":  # "peft" keeps peft's kaiming-uniform A
        mttl_lora_init(peft_model)
    tie_lora_a(peft_model, cfg["tie_params"])
    train_set, val_set = (
        [
            encode_example(tok, s, t, cfg["max_input_length"], cfg["max_output_length"], cfg["prompt_format"])
            for s, t in zip(d["source"], d["target"])
        ]
        for d in (data["train"], data["validation"])
    )
    steps_per_epoch = math.ceil(len(train_set) / cfg["train_batch_size"])
    steps = cfg["total_steps"] or math.ceil(
        cfg["num_train_epochs"] * len(train_set) / cfg["train_batch_size"]
    )
    eval_every = validation_interval(cfg["eval_every"], steps_per_epoch, steps)
    tcfg = TrainConfig(
        lr=cfg["learning_rate"],
        weight_decay=cfg["weight_decay"],
        max_steps=steps,
        warmup_steps=int(cfg["warmup_proportion"] * steps),
        schedule="linear",
        grad_accum=max(1, cfg["train_batch_size"] // cfg["micro_batch_size"]),
        max_grad_norm=cfg["max_grad_norm"],
        seed=cfg["seed"],
        batch_size=cfg["micro_batch_size"],
        eval_every=eval_every,
        log_every=max(1, steps // 10),
        mixed_precision=precision(cfg["precision"])[0],
        log_backend=cfg["log_backend"],
    )
    # What the weights are trained for: a run folder holding another task's (or base's) expert is refused.
    run_key = {"tasks": tasks, **{k: cfg[k] for k in RUN_KEY}}
    best = resumed_best(Path(run_dir), tcfg, run_key)

    def keep_best(m: nn.Module) -> dict[str, float]:
        loss = mean_loss(m, val_set, pad_id)
        best["evals"] += 1
        if loss < best["val_loss"]:
            state = {k: v.detach().clone() for k, v in m.named_parameters() if v.requires_grad}
            best.update(val_loss=loss, state=state)
            # On disk, so that a resumed or repeated run keeps the best weights and their score.
            meta = {"val_loss": repr(loss), "step": str(best["evals"] * tcfg.eval_every)}
            save_tensors(Path(run_dir) / BEST_FILE, state, metadata=meta)
        return {"val_loss": loss}

    base_val = mean_loss(peft_model, val_set, pad_id)
    examples = Dataset.from_list(train_set)  # map-style: batched and reshuffled by `train` from the seed
    result = train(
        peft_model,
        lm_loss,
        examples,
        tcfg,
        run_dir,
        collate_fn=collate(pad_id),
        eval_fn=keep_best,
        device=cfg["device"],
        label=f"expert {name}",
        run_key=run_key,
    )
    if result.step % eval_every:  # a last partial interval: its end is a candidate too
        keep_best(peft_model)
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for k, v in (best["state"] or {}).items():
            params[k].copy_(v)
    info = ExpertInfo(
        expert_name=name,
        expert_task_name=",".join(tasks),
        base_model=cfg["base_model"],
        training_config={k: v for k, v in cfg.items() if isinstance(v, (str, int, float, bool, type(None)))},
    )
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(peft_model, f"{tmp}/adapter", extras_meta={"base_model": cfg["base_model"]})
        library.add_adapter_dir(f"{tmp}/adapter", info, force=cfg["force"])
    return {
        "expert": name,
        "tasks": tasks,
        "steps": result.step,
        "train_examples": len(train_set),
        "val_loss_base": base_val,
        "val_loss_best": best["val_loss"],
    }
