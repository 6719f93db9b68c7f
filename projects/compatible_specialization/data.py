"""The three domains as token streams: code, math and the cross-domain target (gsm-hard).

As the original data scripts (`data/*.py`): each example is one text (`prompt + " " + response`), texts
are tokenized, each followed by EOS, and concatenated. Training draws random windows of `context`
tokens (the original's `SimpleLLMDataset`: `train_tokens` counts windows, not tokens); evaluation reads
consecutive, non-overlapping windows of a held-out split (the original samples 800 overlapping ones).

The real arm (SmolLM2-135M) reads the expert zoo's tasks instead (`common/zoo_tasks.py`): code is
`code_package` + `code_name` (stdlib functions), math is `gsm_solution`, each record as the zoo trains on it
(`source + " " + target`), and the target is the gsm-hard-style program set split by the zoo's group hash,
so its validation and test templates are in no training split of the math specialist.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import Dataset

from common import data
from common.registry import lookup

# The original's `--datasets` names (and ours) -> the domain they stand for.
DOMAINS = {
    "tinycodes": "code",
    "code": "code",
    "stdlib_code": "code",
    "orca-math-problems": "math",
    "math": "math",
    "gsm_variants": "math",
    "gsm-hard": "target",
    "gsm_hard": "target",
    "target": "target",
    "zoo_code": "code",
    "zoo_math": "math",
    "zoo_gsm_hard": "target",
}
# The real arm's domains: zoo tasks pooled per domain (each split of each task, by the zoo's split hash).
ZOO_DOMAINS = {"zoo_code": ("code_package", "code_name"), "zoo_math": ("gsm_solution",)}
# The fields joined by " " into one text, per dataset (hub sets already have `text`).
TEXT_FIELDS = {
    "stdlib_code": ("text",),
    "gsm_variants": ("question", "answer"),
    "gsm_hard": ("input", "code"),
}


def domain_of(name: str) -> str:
    """'code', 'math' or 'target' for a `--datasets` name; an unknown name lists the close matches."""
    return lookup(DOMAINS, name, "dataset")


def domain_texts(data_cfg: Mapping[str, Any], domain: str) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """{split: texts} of a domain's dataset (named in `data_cfg[domain]`) and its split record."""
    name = data_cfg[domain]
    kwargs = dict((data_cfg.get("build_kwargs") or {}).get(name) or {})
    if name in ZOO_DOMAINS:
        return zoo_texts(ZOO_DOMAINS[name], data_cfg["split_seed"])
    if name == "zoo_gsm_hard":
        return zoo_gsm_hard_texts(data_cfg["split_seed"], **kwargs)
    if name in TEXT_FIELDS:  # offline sets: one template/file split shared by all GSM sets (split seed)
        kwargs["seed"] = data_cfg["split_seed"]
    splits, record = data.load(name, **kwargs)
    fields = TEXT_FIELDS.get(name, ("text",))
    texts = {s: [" ".join(row[f] for f in fields) for row in ds] for s, ds in splits.items()}
    return texts, record


def zoo_texts(tasks: tuple[str, ...], split_seed: int) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """{split: texts} of zoo tasks pooled, each record `source + " " + target` (the zoo's training text)."""
    from common.zoo_tasks import task_splits

    texts: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for task in tasks:
        for split, rows in task_splits(task, {}, seed=split_seed).items():  # {}: every record
            texts[split] += [f"{r['source']} {r['target']}" for r in rows]
    record = {"tasks": list(tasks), "split": "common.zoo_tasks.split_of", "seed": split_seed}
    return texts, {**record, "sizes": {s: len(t) for s, t in texts.items()}}


def zoo_gsm_hard_texts(
    split_seed: int, n_per_template: int = 4
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """The gsm-hard-style program task (`common.data.gsm_hard`: question + Python program), split per GSM
    template by the zoo's hash (`gsm<template_id>`, the group of `gsm_solution`): no leak into the math
    specialist's training split."""
    from common.data import gsm_hard
    from common.zoo_tasks import split_of

    texts: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for row in gsm_hard(n_per_template=n_per_template, seed=0):
        texts[split_of(f"gsm{row['template_id']}", split_seed)].append(f"{row['input']} {row['code']}")
    record = {"dataset": "gsm_hard", "n_per_template": n_per_template, "split": "common.zoo_tasks.split_of"}
    return texts, {**record, "seed": split_seed, "sizes": {s: len(t) for s, t in texts.items()}}


def token_stream(
    texts: list[str], tokenizer: Any, max_tokens: int | None, shuffle_seed: int | None
) -> torch.Tensor:
    """Texts (optionally shuffled) tokenized, each followed by EOS, concatenated; cut at `max_tokens`."""
    order = list(range(len(texts)))
    if shuffle_seed is not None:  # a cap then keeps a sample of the domain, not its first files
        random.Random(shuffle_seed).shuffle(order)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for i in order:
        ids += tokenizer(texts[i])["input_ids"] + [eos]
        if max_tokens is not None and len(ids) >= max_tokens:
            ids = ids[:max_tokens]
            break
    return torch.tensor(ids, dtype=torch.long)


class RandomWindows(Dataset):
    """`n` windows of `context` tokens at random starts (fixed by `seed`), as the original's training set.

    The model predicts tokens 1..T-1 of a window (labels = inputs, shifted inside transformers), so a
    window never exceeds the position limit (the original reads `context + 1` tokens).
    """

    def __init__(self, stream: torch.Tensor, context: int, n: int, seed: int) -> None:
        if len(stream) <= context:
            raise ValueError(f"a stream of {len(stream)} tokens is too short for windows of {context}")
        gen = torch.Generator().manual_seed(seed)
        self.stream, self.context = stream, context
        self.starts = torch.randint(0, len(stream) - context + 1, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = int(self.starts[i])
        return self.stream[start : start + self.context]


def eval_windows(stream: torch.Tensor, context: int, max_windows: int | None) -> torch.Tensor:
    """Consecutive non-overlapping windows (N, context) of a held-out stream; the model predicts tokens 1..T-1."""
    n = len(stream) // context
    if n == 0:
        raise ValueError(f"a held-out stream of {len(stream)} tokens is shorter than one window of {context}")
    n = min(n, max_windows) if max_windows else n
    return stream[: n * context].view(n, context)
