"""Evaluation (§4.1): length-normalised rank classification and greedy generation on held-out tasks,
with the original's analysis outputs: the output texts (`WriteOutputText`) and which experts each
module picks (`RoutingDistribution`, counts of top-k picks per module and expert, with a plot).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from common.evaluation import encode_pair, eval_mode, exact_match, generate
from common.io import write_json, write_text
from projects.phatgoose.moe import moe_modules, set_mode


def rank_classify(
    model: nn.Module,
    tokenizer: Any,
    sources: Sequence[str],
    choices_per_source: Sequence[Sequence[str]],
    *,
    batch_size: int = 64,
) -> list[int]:
    """Length-normalised rank classification of an encoder-decoder: argmax_c log p(c | source) / |c|.

    The same scores as `common.evaluation.rank_classification(length_normalize=True)` (same token split,
    `encode_pair`), but each source is encoded once and its encoder states are shared by all its choices,
    instead of re-encoding the source once per choice. Token-level routing makes each token's output
    independent of the other rows, so this changes no score; the routing counts then see each source
    token once. Rows are batched longest first, so that batches pad little.
    """
    pairs = [
        [encode_pair(tokenizer, s, c, encoder_decoder=True) for c in choices]
        for s, choices in zip(sources, choices_per_source)
    ]
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0][0]))
    preds: dict[int, int] = {}
    device = next(model.parameters()).device
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ctx = [pairs[i][0][0] for i in chunk]
            width = max(len(c) for c in ctx)
            input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, c in enumerate(ctx):
                input_ids[j, : len(c)] = torch.tensor(c)
                mask[j, : len(c)] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            hidden = model.get_encoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state
            row_of = [j for j, i in enumerate(chunk) for _ in pairs[i]]
            conts = [y for i in chunk for _, y in pairs[i]]
            labels = torch.full((len(conts), max(len(y) for y in conts)), -100, dtype=torch.long)
            for k, y in enumerate(conts):
                labels[k, : len(y)] = torch.tensor(y)
            rows = torch.tensor(row_of, device=device)
            logits = model(
                encoder_outputs=BaseModelOutput(last_hidden_state=hidden.index_select(0, rows)),
                attention_mask=mask.index_select(0, rows),
                labels=labels.to(device),
            ).logits
            logprobs = F.log_softmax(logits.float(), dim=-1)
            tok = logprobs.gather(-1, labels.clamp(min=0).to(device)[..., None]).squeeze(-1)
            real = (labels != -100).to(device)
            scores = (tok * real).sum(-1) / real.sum(-1)
            k = 0
            for i in chunk:
                n = len(pairs[i])
                preds[i] = int(scores[k : k + n].argmax())  # ties go to the first choice
                k += n
    return [preds[i] for i in range(len(pairs))]


def _score(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[dict],
    multiple_choice: bool,
    generation: bool,
    max_new_tokens: int,
    batch_size: int,
) -> tuple[list[int], list[str]]:
    sources = [r["source"] for r in rows]
    preds = (
        rank_classify(model, tokenizer, sources, [r["choices"] for r in rows], batch_size=batch_size)
        if multiple_choice
        else []
    )
    gens = (
        generate(model, tokenizer, sources, max_new_tokens, batch_size=batch_size, disable=True)
        if generation
        else []
    )
    return preds, gens


def balanced_accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Mean over the classes present in `labels` of the recall of that class (a constant predictor scores
    1/#classes, whatever the class prior)."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    recalls = []
    for c in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == c]
        recalls.append(sum(predictions[i] == c for i in idx) / len(idx))
    return sum(recalls) / len(recalls)


def evaluate_rows(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[dict],
    *,
    experts_of_rows: Sequence[int] | None = None,
    generation: bool = True,
    max_new_tokens: int = 8,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Accuracy and class-balanced accuracy (rank classification, length-normalised), and exact match of
    greedy generations.

    A row's `correct` (if given) lists every correct choice (BIG-bench's several right answers); rows
    without choices (generative BIG-bench tasks) are scored by exact match of the generation against
    any of their `answers` (else `target`), and that is their accuracy.
    With `experts_of_rows` (Retrieval) each example is routed, whole, to its expert: the rows are scored
    in groups, all MoE modules fixed to that group's expert.
    """
    with_choices = [bool(r["choices"]) for r in rows]
    if any(with_choices) and not all(with_choices):
        raise ValueError("rows mix multiple-choice and generative examples: evaluate them separately")
    multiple_choice = all(with_choices)
    if not multiple_choice and not generation:
        raise ValueError("a generative task (rows without answer choices) needs generation=True")
    if experts_of_rows is None:
        preds, gens = _score(model, tokenizer, rows, multiple_choice, generation, max_new_tokens, batch_size)
    else:
        preds, gens = [0] * len(rows), [""] * len(rows)
        for e in sorted(set(int(x) for x in experts_of_rows)):
            idx = [i for i, x in enumerate(experts_of_rows) if int(x) == e]
            set_mode(model, "fixed", e)
            p, g = _score(
                model,
                tokenizer,
                [rows[i] for i in idx],
                multiple_choice,
                generation,
                max_new_tokens,
                batch_size,
            )
            for j, i in enumerate(idx):
                if multiple_choice:
                    preds[i] = p[j]
                if generation:
                    gens[i] = g[j]
        set_mode(model, "route")
    out: dict[str, Any] = {}
    if generation:
        out["exact_match"] = exact_match(gens, [r.get("answers") or r["target"] for r in rows])
        out["generations"] = gens
    if multiple_choice:
        out["accuracy"] = sum(p in (r.get("correct") or [r["label"]]) for p, r in zip(preds, rows)) / len(
            rows
        )
        out["balanced_accuracy"] = balanced_accuracy(preds, [r["label"] for r in rows])
        out["predictions"] = [r["choices"][p] for p, r in zip(preds, rows)]
    else:
        out["accuracy"] = out["exact_match"]
        out["predictions"] = gens
    return out


def start_routing_record(model: nn.Module) -> None:
    for m in moe_modules(model).values():
        m.counts.zero_()
        m.record = True


def routing_distribution(model: nn.Module) -> dict[str, list[float]]:
    """Module -> fraction of its top-k picks that went to each expert since `start_routing_record`."""
    out = {}
    for name, m in moe_modules(model).items():
        m.record = False
        total = m.counts.sum().clamp(min=1)
        out[name] = (m.counts / total).tolist()
    return out


def write_output_text(save_dir: str | os.PathLike, dataset: str, rows: Sequence[dict], result: dict) -> Path:
    """One JSON line per example: source, target, the rank-classification pick and the generation."""
    import json

    lines = []
    for i, r in enumerate(rows):
        rec = {"source": r["source"], "target": r["target"], "prediction": result["predictions"][i]}
        if "generations" in result:
            rec["generation"] = result["generations"][i]
        lines.append(json.dumps(rec))
    out = Path(save_dir) / f"{dataset}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, "\n".join(lines) + "\n")
    return out


def plot_routing(
    save_dir: str | os.PathLike, dataset: str, dist: dict[str, list[float]], expert_names: Sequence[str]
) -> Path:
    """Heat map of the routing distribution (modules × experts) as PNG, its data as JSON beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    modules = list(dist)
    grid = torch.tensor([dist[m] for m in modules])
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * len(expert_names), 1.5 + 0.12 * len(modules)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(expert_names)), list(expert_names), rotation=70, fontsize=7)
    ax.set_yticks(
        range(len(modules)), [m.replace("block.", "b").replace("layer.", "l") for m in modules], fontsize=4
    )
    ax.set_title(f"routing distribution: {dataset}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    out = save_dir / f"{dataset}.png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_json(save_dir / f"{dataset}.json", {"experts": list(expert_names), "distribution": dist})
    return out
