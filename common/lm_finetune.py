"""Fast fine-tuning of causal LMs on (source, target) pairs: the real arm's training path.

The loss is the mean cross-entropy of the target tokens given `source + " " + target + EOS` (mttl's
format), L = -1/|T| Σ_{t∈T} log p(x_t | x_<t), T the target positions. It is computed like
`model(labels=...).loss` but faster on a CPU (measured in benchmarks/lora_step.py):
- the 49k-word head runs only at the positions that predict a target token (`target_only_loss`):
  a classification example has one or two such positions of ~100;
- the base (and, with `dtype=bfloat16`, the adapter) run in bf16, which AMX multiplies ~7x faster
  than fp32; the logits of the target positions are upcast before the log-softmax;
- eager attention: the CPU flash-attention kernel's backward is slower at these short lengths;
- batches are padded to their own longest row (`collate`), never to a fixed length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.evaluation import IGNORE_INDEX, pad_sequences


def encode_example(tokenizer: Any, source: str, target: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of `source + " " + target + EOS` with labels on the target and EOS only.

    A pair longer than `max_length` loses source tokens on the left (the question, at the end of the
    prompt, is kept); a target that alone exceeds `max_length - 1` is cut on the right.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("fine-tuning needs a tokenizer with an EOS token")
    src = tokenizer.encode(source, add_special_tokens=False)
    tgt = [
        *tokenizer.encode(" " + target, add_special_tokens=False)[: max_length - 1],
        tokenizer.eos_token_id,
    ]
    src = src[max(0, len(src) + len(tgt) - max_length) :]
    if not src:
        raise ValueError(f"no room for the source in max_length={max_length} (target has {len(tgt)} tokens)")
    return {"input_ids": src + tgt, "labels": [IGNORE_INDEX] * len(src) + tgt}


def collate(examples: Sequence[Mapping[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row: input_ids, attention_mask, labels (-100 on padding)."""
    ids, mask = pad_sequences([e["input_ids"] for e in examples], pad_id, "right")
    labels, _ = pad_sequences([e["labels"] for e in examples], IGNORE_INDEX, "right")
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def causal_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone returning hidden states, output head) of a causal LM, bare or wrapped by peft/DDP."""
    inner = getattr(model, "module", model)  # DDP
    if hasattr(inner, "get_base_model"):  # peft: the transformers model with the adapter layers inside
        inner = inner.get_base_model()
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    backbone = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if head is None or backbone is None:
        raise TypeError(f"{type(model).__name__} is not a causal LM with an output head")
    return backbone, head


def target_only_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the target tokens, with the head applied only where a target is predicted.

    Equal to `model(**batch).loss` (same shift, same -100 masking) up to floating-point rounding.
    """
    backbone, head = causal_parts(model)
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    where = targets != IGNORE_INDEX  # (B, T-1): positions whose next token is a target
    logits = head(hidden[:, :-1][where])  # (N, V), N = number of target tokens in the batch
    return F.cross_entropy(logits.float(), targets[where])


def prepare_for_training(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast every parameter to `dtype` (bf16: base and adapter) and use eager attention (faster on CPU)."""
    model.to(dtype)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "_attn_implementation"):
        config._attn_implementation = "eager"
    return model
