"""One experiment's settings and places: the config groups of the original (`-m`, `-td`, `-ed`, `-tr`,
`-er`), the output layout, the checkpoint registry, and rank-classification evaluation of a mixture.

Layout (as the original):
    {exp_out}/{format}/{dataset}/{model}/{descriptor}/{run_name}/       a training run
        checkpoint_{idx}/   its best checkpoint: PEFT (IA)^3 adapter folder or save_pretrained folder
        gram_matrix/checkpoint_{idx}_*.safetensors                      its metadata
    {exp_out}/merging/{format}/{mixture}/{model}/{descriptor}/{method}/[model_lambda_{x}/]merged_model/
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from common.config import load_config
from common.evaluation import (
    IGNORE_INDEX,
    encode_pair,
    eval_mode,
    exact_match,
    generate,
    normalize_answer,
    rank_classification,
)
from projects.mats.model import is_encoder_decoder, model_name
from projects.mats.tasks import load_mixture

CONFIGS = Path(__file__).resolve().parent / "configs"
# The paper's settings (spec §1c); configs/ and overrides change them.
DEFAULTS: dict[str, Any] = {
    "model": {
        "base": "google/t5-large-lm-adapt",
        "scale": "paper",  # paper | tiny | micro
        "format": "full_model",  # full_model | ia3 (the checkpoint descriptor)
        "max_source_len": 512,
        "device": "auto",  # where the model is trained and evaluated: auto (cuda if available), cpu, cuda:N
    },
    "train_dataset": {"train_dataset": "p3_eight_qa", "max_examples": None},
    "eval_dataset": {
        "evaluation_dataset": "p3_eight_qa",
        "evaluation_split": "validation",
        "max_examples": 1000,
    },
    "train_run": {
        "lr": 1e-4,
        "train_batch_size": 1024,
        "micro_train_batch_size": 16,
        "num_batches": 5000,
        "checkpoint_frequency": 100,
        "early_stopping_num_checkpoints_without_improvement": 5,
        "warmup_steps": 0,
        "schedule": "constant",
        "weight_decay": 0.0,
        "seed": 42,
        "mixed_precision": "bf16",
        "log_backend": "jsonl",  # or "tensorboard": also write the logged scalars as TensorBoard events
    },
    "eval_run": {"eval_batch_size": 32, "length_normalization": False},
    "metadata": {"num_examples": 1000, "gram_batch_size": 8, "seed": 0},
    "merge": {"lambda_step": 0.1},  # λ swept over 0, step, ..., 1 on validation
    "experiment": {
        "exp_out": "exp_out",
        "instruction_format": "p3",
        "run_name": None,  # None: a timestamp, as the original
        "checkpoint_registry": str(CONFIGS / "checkpoints.yaml"),
    },
}
GROUP_FLAGS = {"td": "train_dataset", "ed": "eval_dataset", "tr": "train_run", "er": "eval_run", "m": "model"}


def _alias(flag: str, kv: str) -> str:
    # The original's inference reads `-ed split=...`; its training configs say `evaluation_split`.
    return "evaluation_" + kv if flag == "ed" and kv.startswith("split=") else kv


def resolve(
    config_files: Sequence[str | os.PathLike],
    groups: Mapping[str, Sequence[str]],
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """DEFAULTS < config files < `-td/-ed/-tr/-er/-m key=value` (each into its group) < dotted overrides."""
    scoped = [f"{GROUP_FLAGS[flag]}.{_alias(flag, kv)}" for flag, kvs in groups.items() for kv in kvs or ()]
    return load_config(DEFAULTS, config_files, [*scoped, *overrides])


def name_of_model(cfg: Mapping[str, Any]) -> str:
    return model_name(cfg["model"]["base"], cfg["model"]["scale"])


def merge_dir(cfg: Mapping[str, Any], mixture: str, descriptor: str, method_dir: str) -> Path:
    """exp_out/merging/{format}/{mixture}/{model}/{descriptor}/{method}."""
    e = cfg["experiment"]
    return Path(
        e["exp_out"], "merging", e["instruction_format"], mixture, name_of_model(cfg), descriptor, method_dir
    )


def read_registry(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint registry: {model: {format: {descriptor: {dataset: checkpoint path}}}}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint registry {path} not found (set experiment.checkpoint_registry)")
    return yaml.safe_load(path.read_text()) or {}


def checkpoint_paths(cfg: Mapping[str, Any], descriptor: str, tasks: Sequence[str]) -> dict[str, Path]:
    """{task: checkpoint} of `descriptor` for the configured model, with a clear error for a missing expert."""
    registry = read_registry(cfg["experiment"]["checkpoint_registry"])
    model, fmt = name_of_model(cfg), cfg["experiment"]["instruction_format"]
    try:
        entries = registry[model][fmt][descriptor]
    except KeyError:
        raise KeyError(
            f"checkpoint registry {cfg['experiment']['checkpoint_registry']} has no {model}/{fmt}/{descriptor}"
        ) from None
    missing = [t for t in tasks if t not in entries]
    if missing:
        raise KeyError(f"no {descriptor} expert registered for {missing} (registered: {sorted(entries)})")
    root = Path(cfg["experiment"]["checkpoint_registry"]).parent
    return {t: (root / entries[t]) if not Path(entries[t]).is_absolute() else Path(entries[t]) for t in tasks}


def register_checkpoint(
    path: str | os.PathLike,
    model: str,
    fmt: str,
    descriptor: str,
    dataset: str,
    checkpoint: str | os.PathLike,
) -> None:
    """Add one entry to a registry file (created if absent), written atomically."""
    from common.io import write_text

    path = Path(path)
    registry = read_registry(path) if path.is_file() else {}
    registry.setdefault(model, {}).setdefault(fmt, {}).setdefault(descriptor, {})[dataset] = str(checkpoint)
    write_text(path, yaml.safe_dump(registry, sort_keys=True))


def _encoded_example(
    tokenizer: Any, question: str, choices: Sequence[str], max_source_len: int
) -> tuple[list[int], list[list[int]]]:
    """(encoder ids, [decoder target ids per choice]) as `model.encode` builds training batches: lm-eval's
    pair split, the question cut to its last `max_source_len` tokens, EOS after each continuation."""
    key = (tokenizer.name_or_path, len(tokenizer), question, tuple(choices), max_source_len)
    if key not in _ENCODED:
        # The encoder-decoder context does not depend on the choice.
        pairs = [encode_pair(tokenizer, question, " " + c, encoder_decoder=True) for c in choices]
        context = pairs[0][0][-max_source_len:]
        _ENCODED[key] = (context, [[*y, tokenizer.eos_token_id] for _, y in pairs])
    return _ENCODED[key]


_ENCODED: dict[tuple, tuple[list[int], list[list[int]]]] = {}  # tokenisation of evaluation examples


def choice_log_likelihoods(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    *,
    max_source_len: int,
    batch_size: int = 32,
) -> list[list[float]]:
    """Σ_t log p(choice_t | question) of every choice (+ EOS) of every example, for an encoder-decoder.

    The encoder reads each question once, and the decoder's cross-attention projects its states once; both
    are repeated for the question's choices, which the decoder scores teacher-forced. Same scores as
    `common.evaluation.rank_classification(append_eos=True)` on the truncated question (tested), which
    runs the encoder and the cross-attention projections once per choice.
    """
    encoded = [_encoded_example(tokenizer, ex["question"], ex["choices"], max_source_len) for ex in examples]
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # little padding per batch
    out: dict[int, list[float]] = {}
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            contexts = [encoded[i][0] for i in chunk]
            width = max(len(c) for c in contexts)
            input_ids = torch.tensor([c + [tokenizer.pad_token_id] * (width - len(c)) for c in contexts])
            mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in contexts])
            states = inner.get_encoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state
            rows = torch.tensor([j for j, i in enumerate(chunk) for _ in encoded[i][1]])
            targets = [y for i in chunk for y in encoded[i][1]]
            t_width = max(len(y) for y in targets)
            labels = torch.tensor([y + [IGNORE_INDEX] * (t_width - len(y)) for y in targets])
            logits = inner(
                encoder_outputs=(states[rows],),
                attention_mask=mask[rows],
                labels=labels,
                cache=_cross_attention_cache(inner, states, rows),
                use_cache=True,
            ).logits.float()
            token = F.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            sums = (token * (labels != IGNORE_INDEX)).sum(1).tolist()
            k = 0
            for i in chunk:
                n = len(encoded[i][1])
                out[i], k = sums[k : k + n], k + n
    return [out[i] for i in range(len(encoded))]


def _cross_attention_cache(model: nn.Module, states: torch.Tensor, rows: torch.Tensor) -> EncoderDecoderCache:
    """The decoder's cross-attention keys and values, projected once per question and repeated for its
    choices (the decoder would otherwise project the repeated encoder states once per choice)."""
    cross = DynamicCache(config=model.config)
    for idx, block in enumerate(model.decoder.block):
        attention = block.layer[1].EncDecAttention
        shape = (*states.shape[:-1], -1, attention.key_value_proj_dim)  # (B, T, heads, d_kv)
        keys = attention.k(states).view(shape).transpose(1, 2)
        values = attention.v(states).view(shape).transpose(1, 2)
        cross.update(keys[rows], values[rows], idx)
    return EncoderDecoderCache(DynamicCache(config=model.config), cross)  # marks every layer as filled


def squad_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD v1.1 token F1 (after `normalize_answer`), the best over the references."""
    best = 0.0
    pred = normalize_answer(prediction).split()
    for ref in references:
        gold = normalize_answer(ref).split()
        common = sum(min(pred.count(w), gold.count(w)) for w in set(pred))
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def generation_score(
    model: nn.Module, tokenizer: Any, examples: Sequence[Mapping[str, Any]], cfg: Mapping[str, Any]
) -> float:
    """A generative task's score as the original's ROPES: greedy decoding of at most 64 tokens, scored by
    the mean of SQuAD exact match and F1 against the target (P3 keeps one answer), as a fraction."""
    max_len = cfg["model"]["max_source_len"]
    prompts = []
    for ex in examples:  # an encoder-decoder reads the question's last max_source_len tokens, as in training
        ids = tokenizer(ex["question"], add_special_tokens=False)["input_ids"]
        cut = is_encoder_decoder(model) and len(ids) > max_len - 1
        prompts.append(tokenizer.decode(ids[-(max_len - 1) :]) if cut else ex["question"])
    predictions = generate(
        model, tokenizer, prompts, 64, batch_size=cfg["eval_run"]["eval_batch_size"], disable=True
    )
    references = [[ex["target"]] for ex in examples]
    f1 = statistics.fmean(squad_f1(p, r) for p, r in zip(predictions, references))
    return (exact_match(predictions, references) + f1) / 2


def evaluate(
    model: nn.Module, tokenizer: Any, data: Mapping[str, Sequence[Mapping[str, Any]]], cfg: Mapping[str, Any]
) -> dict[str, float]:
    """Rank-classification accuracy per task (summed log-likelihood by default) and their mean, `average`;
    a generative task (examples without choices, ROPES) is scored by `generation_score`.

    An encoder-decoder reads the question cut to its last `model.max_source_len` tokens, as in training
    (`model.encode`); a decoder-only model goes through `common.evaluation.rank_classification`.
    """
    scores = {}
    length_normalize = cfg["eval_run"]["length_normalization"]
    for task, examples in tqdm(data.items(), desc="evaluate tasks", leave=False):
        if not examples[0]["choices"]:
            scores[task] = generation_score(model, tokenizer, examples, cfg)
        elif is_encoder_decoder(model):
            lls = choice_log_likelihoods(
                model,
                tokenizer,
                examples,
                max_source_len=cfg["model"]["max_source_len"],
                batch_size=cfg["eval_run"]["eval_batch_size"],
            )
            correct = 0
            for ex, row in zip(examples, lls):
                if length_normalize:  # by the number of scored tokens, EOS included
                    targets = _encoded_example(
                        tokenizer, ex["question"], ex["choices"], cfg["model"]["max_source_len"]
                    )[1]
                    row = [s / len(y) for s, y in zip(row, targets)]
                # ties go to the first choice, as `rank_classification`
                correct += max(range(len(row)), key=row.__getitem__) == ex["label"]
            scores[task] = correct / len(examples)
        else:
            scores[task] = rank_classification(
                model,
                tokenizer,
                [ex["question"] for ex in examples],
                [[" " + c for c in ex["choices"]] for ex in examples],
                [ex["label"] for ex in examples],
                length_normalize=length_normalize,
                batch_size=cfg["eval_run"]["eval_batch_size"],
                append_eos=False,
                disable=True,
            )["accuracy"]
    scores["average"] = statistics.fmean(scores[t] for t in data)
    return scores


def eval_data(
    cfg: Mapping[str, Any], split: str | None = None, dataset: str | None = None
) -> dict[str, list]:
    e = cfg["eval_dataset"]
    return load_mixture(dataset or e["evaluation_dataset"], split or e["evaluation_split"], e["max_examples"])
