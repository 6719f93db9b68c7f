"""Continuation log-likelihoods of a decoder-only LM with each distinct context forwarded once.

Multiple-choice scoring asks for log p(y_j | c) for several answers y_j of one prompt c. Instead of one
row [c, y_j] per answer, one row per context holds [c, y_1[:-1], y_2[:-1], ...]: every answer segment
sees the whole context and itself (a 4D attention mask), and its position ids continue from the context,
so each answer is scored exactly as if it had been appended to the context alone. The language-model head
(the vocabulary-wide matmul and log-softmax, ~20% of SmolLM2's flops per token) is computed only at the
positions that predict an answer token.

transformers has no shared-prefix scorer; lm-eval shares a forward only among one-token answers and still
computes the head at every position, hence this module (benchmarks/mc_scoring.py measures both).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

# Attention implementations that take a custom 4D float mask as it is (transformers' `masking_utils`).
MASKABLE_ATTENTION = ("sdpa", "eager")


class _Row(NamedTuple):
    ids: list[int]  # context + each answer without its last token
    segments: list[int]  # 0 = context, j = answer j (1-based)
    positions: list[int]  # the context counts from 0, each answer continues from the context's end
    members: list[int]  # the input indices of the row's pairs, in answer order


def supports_shared_prefix(model: nn.Module) -> bool:
    """A decoder-only model whose attention takes a custom 4D mask and whose inputs are just the tokens.

    Prompt-learning peft adapters (prompt/prefix tuning) add virtual tokens, so they keep the plain path.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "_attn_implementation", None) not in MASKABLE_ATTENTION:
        return False
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False
    return isinstance(model.get_output_embeddings(), nn.Module)


def shared_prefix_logprobs(
    model: nn.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    limit: int | None,
    *,
    batch_size: int = 8,
    disable: bool = True,
) -> list[tuple[float, int, bool]]:
    """(Σ_t log p(y_t | c, y_<t), len(y), every y_t is the argmax) per (c, y) pair of token ids.

    Inputs longer than `limit` + 1 tokens lose context tokens on the left, as in lm-eval (so one prompt's
    answers of different lengths may see different contexts, and get rows of their own). A batch holds up
    to `batch_size` contexts, longest first. Call it in eval mode under `torch.no_grad()`.
    """
    rows = _rows(pairs, limit)
    rows.sort(key=lambda r: -len(r.ids))
    out: dict[int, tuple[float, int, bool]] = {}
    for start in tqdm(range(0, len(rows), batch_size), desc="log-likelihoods", disable=disable):
        out.update(_score_rows(model, rows[start : start + batch_size], pairs))
    return [out[i] for i in range(len(pairs))]


def _rows(pairs: Sequence[tuple[list[int], list[int]]], limit: int | None) -> list[_Row]:
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (context, answer) in enumerate(pairs):
        # The scored input is (c + y)[-(limit + 1):][:-1]: the context keeps its last limit + 1 - len(y) tokens.
        keep = len(context) if limit is None else min(len(context), limit + 1 - len(answer))
        by_context.setdefault(tuple(context[len(context) - keep :]), []).append(i)
    rows = []
    for context, members in by_context.items():
        ids, segments, positions = list(context), [0] * len(context), list(range(len(context)))
        for j, i in enumerate(members, start=1):
            head = pairs[i][1][:-1]
            ids += head
            segments += [j] * len(head)
            positions += range(len(context), len(context) + len(head))
        rows.append(_Row(ids, segments, positions, members))
    return rows


def _score_rows(
    model: nn.Module, rows: Sequence[_Row], pairs: Sequence[tuple[list[int], list[int]]]
) -> dict[int, tuple[float, int, bool]]:
    device = next(model.parameters()).device
    width = max(len(r.ids) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: right padding
    for b, r in enumerate(rows):
        ids[b, : len(r.ids)] = torch.tensor(r.ids)
        positions[b, : len(r.ids)] = torch.tensor(r.positions)
        segments[b, : len(r.ids)] = torch.tensor(r.segments)
    # Where each answer token is predicted from: the context's last position, then the answer's own.
    where_b, where_t, targets, owner = [], [], [], []
    for b, r in enumerate(rows):
        n_context = r.segments.count(0)
        offset = n_context
        for i in r.members:
            answer = pairs[i][1]
            where_t += [n_context - 1, *range(offset, offset + len(answer) - 1)]
            offset += len(answer) - 1
            where_b += [b] * len(answer)
            targets += answer
            owner += [i] * len(answer)
    rows_at, cols_at = torch.tensor(where_b, device=device), torch.tensor(where_t, device=device)
    dtype = model.get_output_embeddings().weight.dtype
    logits = _logits_at(
        model,
        ids.to(device),
        _answer_mask(segments, dtype).to(device),
        positions.to(device),
        rows_at,
        cols_at,
    )
    logprobs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (N, V)
    target = torch.tensor(targets, device=device)
    token_logprobs = logprobs.gather(-1, target[:, None]).squeeze(-1).double().tolist()  # (N,)
    hits = (logprobs.argmax(-1) == target).tolist()
    out: dict[int, list] = {}
    for i, lp, hit in zip(owner, token_logprobs, hits):
        total, n, greedy = out.get(i, (0.0, 0, True))
        out[i] = (total + lp, n + 1, greedy and hit)
    return {i: (float(t), n, bool(g)) for i, (t, n, g) in out.items()}


def _answer_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive mask: a token sees earlier tokens of the context and of its own segment."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    key, query = segments[:, None, :], segments[:, :, None]
    allowed = causal & ((key == 0) | (key == query)) & (key >= 0)
    allowed |= torch.eye(width, dtype=torch.bool)  # a padding query sees itself: no all-masked row (NaN)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _logits_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """(N, V) logits at (rows[n], cols[n]) only.

    transformers' `logits_to_keep` takes one set of positions for the whole batch, and each row here needs
    its own, so a pre-hook on the output embedding hands it only the N hidden states that are scored; any
    logit post-processing of the model (softcapping, scaling) still applies after it.
    """

    gathered = []

    def gather(module: nn.Module, args: tuple) -> tuple:
        gathered.append(True)
        return (args[0][rows, cols][None], *args[1:])  # (1, N, D)

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        logits = model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False
        ).logits
    finally:
        handle.remove()
    if gathered:
        return logits[0]
    return logits[rows, cols]  # the model computed its (B, T, V) logits without calling the head module
