"""Seq2seq tasks scored as text generation, as fusion_bench's `flan-t5_glue_text_generation` task pool:
greedy decoding of the answer, exact match of the decoded string with the label word (Spearman's ρ of
the decoded numbers for STS-B, an unparsable answer read as 0.0), plus the teacher-forced loss.

Paper scale (`data: hub`): the eight GLUE tasks with fusion_bench's prompts (`common.data.hub.glue`),
each on its validation split (MNLI: validation_matched). Tiny scale (`data: tiny`): offline text tasks
from `common.data`, given as data: `{name: {dataset, kwargs, targets}}` (`targets` keeps only the rows
whose answer is one of them, so one task can be cut into tasks on disjoint label sets).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from scipy.stats import spearmanr
from torch import nn

from common.evaluation import IGNORE_INDEX, exact_match
from projects.smile.routing import routing_report

REGRESSION = ("stsb",)  # GLUE tasks scored by Spearman's ρ


def spearman_of_text(predictions: list[str], references: list[str]) -> float:
    """Spearman's ρ between decoded numbers and the references; an unparsable answer counts as 0.0."""

    def number(s: str) -> float:
        try:
            return float(s)
        except ValueError:
            return 0.0

    x, y = [number(p) for p in predictions], [number(r) for r in references]
    if len(set(x)) < 2 or len(set(y)) < 2:  # a constant answer: ρ undefined (scipy: NaN), no correlation
        return 0.0
    return float(spearmanr(x, y)[0])


def _subset(ds: Dataset, cap: int | None) -> Dataset:
    """All rows, or a fixed random `cap` of them (split seed 0: the offline splits come sorted by label)."""
    if not cap or cap >= len(ds):
        return ds
    return ds.shuffle(seed=0).select(range(cap))


def task_split(name: str, spec: Any, source: str, split: str, cap: int | None = None) -> Dataset:
    """One task's split as (source, target) records; `spec` is a tiny task's {dataset, kwargs, targets}."""
    if source == "hub":
        from common.data.hub import GLUE_EVAL_SPLITS, glue

        if split == "test":
            raise ValueError(
                "GLUE's test labels are hidden: evaluate on split=validation, as fusion_bench does"
            )
        ds = glue(name)[0][GLUE_EVAL_SPLITS[name] if split == "validation" else split]
    elif source == "tiny":
        from common.data import load
        from common.tiny_world import PRETRAIN_SPLIT_SEED

        if not isinstance(spec, Mapping) or "dataset" not in spec:
            raise ValueError(f"tiny task {name!r} needs a spec {{dataset, kwargs, targets}}, got {spec!r}")
        ds = load(spec["dataset"], seed=PRETRAIN_SPLIT_SEED, **dict(spec.get("kwargs") or {}))[0][split]
        if spec.get("targets"):
            keep = set(spec["targets"])
            ds = ds.filter(lambda r: r["target"] in keep)
    else:
        raise ValueError(f"unknown task data source {source!r}; use 'tiny' or 'hub'")
    return _subset(ds.select_columns(["source", "target"]), cap)


def task_specs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """name -> spec; `tasks` is a list of names (hub) or a mapping name -> spec (tiny)."""
    tasks = cfg["tasks"]
    return dict(tasks) if isinstance(tasks, Mapping) else {t: None for t in tasks}


def encode_pairs(
    tokenizer: Any, sources: list[str], targets: list[str], max_source_length: int | None = None
) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask (padded) and labels (target + EOS, padding = IGNORE_INDEX)."""
    truncate = max_source_length is not None
    enc = tokenizer(
        sources, padding=True, truncation=truncate, max_length=max_source_length, return_tensors="pt"
    )
    labels = tokenizer(targets, padding=True, return_tensors="pt")
    enc["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, IGNORE_INDEX)
    return dict(enc)


@torch.no_grad()
def target_loss(
    model: nn.Module, tokenizer: Any, ds: Dataset, batch_size: int, max_source_length: int | None = None
) -> float:
    """Mean per-token cross-entropy of the targets given the sources (teacher forcing)."""
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(ds), batch_size):
        rows = ds[i : i + batch_size]
        pairs = encode_pairs(tokenizer, rows["source"], rows["target"], max_source_length)
        batch = {k: v.to(device) for k, v in pairs.items()}
        logits = model(**batch).logits.float()
        total += float(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum"))
        tokens += int((batch["labels"] != IGNORE_INDEX).sum())
    return total / tokens


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    max_source_length: int | None = None,
) -> list[str]:
    """Greedy answers in the input order (special tokens dropped, stripped); prompts are batched shortest
    first (less padding) and truncated to `max_source_length` tokens as in training."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = next(model.parameters()).device
    answers = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        enc = tokenizer(
            [prompts[i] for i in rows],
            padding=True,
            truncation=max_source_length is not None,
            max_length=max_source_length,
            return_tensors="pt",
        ).to(device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        for i, text in zip(rows, tokenizer.batch_decode(out, skip_special_tokens=True)):
            answers[i] = text.strip()
    return answers


class TextGenerationTaskPool:
    """evaluate(seq2seq model) -> {task: {accuracy (ρ for STS-B), exact_match, loss}, average}.

    cfg: tokenizer (a model path), data (hub | tiny), tasks, split, max_examples, max_new_tokens, batch_size,
    max_source_length (null: no truncation), routing (N: a SMILE model's routing distribution over the
    first N sources of each task, `projects.smile.routing`, in the report under "routing"; null: none).
    """

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        from transformers import AutoTokenizer

        from projects.smile.pools import resolve_path

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_path(str(cfg["tokenizer"])))
        self.data = {
            name: task_split(name, spec, cfg["data"], cfg["split"], cfg.get("max_examples"))
            for name, spec in task_specs(cfg).items()
        }

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        model.eval()
        batch = int(self.cfg.get("batch_size", 32))
        report: dict[str, Any] = {}
        for task, ds in self.data.items():
            sources, targets = list(ds["source"]), list(ds["target"])
            predictions = generate_answers(
                model,
                self.tokenizer,
                sources,
                max_new_tokens=int(self.cfg["max_new_tokens"]),
                batch_size=batch,
                max_source_length=self.cfg.get("max_source_length"),
            )
            em = exact_match(predictions, targets, normalize=False)
            score = spearman_of_text(predictions, targets) if task in REGRESSION else em
            loss = target_loss(model, self.tokenizer, ds, batch, self.cfg.get("max_source_length"))
            report[task] = {"accuracy": score, "exact_match": em, "loss": loss}
        report["average"] = {
            key: sum(report[t][key] for t in self.data) / len(self.data) for key in ("accuracy", "loss")
        }
        routing = routing_report(
            model,
            self.tokenizer,
            {task: ds["source"] for task, ds in self.data.items()},
            self.cfg.get("routing"),
            max_length=self.cfg.get("max_source_length") or 512,
        )
        if routing is not None:
            report["routing"] = routing
        return report
