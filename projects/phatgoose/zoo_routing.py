"""PHATGOOSE and its post-hoc baselines on the expert zoo's decoder-only experts (§3, §4.2).

Every method holds the zoo's LoRA experts beside each adapted linear (`moe.attach_experts`) and differs
in how a token or an example picks them:
- PHATGOOSE: per token and module, s_e = LN(u)·LN(g_e)/√d over the trained gates g_e, softmax, top-k
  renormalised (`moe.MoELoRALinear`, mode "route"; keys = the gates, `use_input_gate_as_router`);
- Average Activation: the same routing with keys v_e = mean over expert e's training examples of the
  module's input with expert e alone loaded (pooled per example over its real tokens, or at its last
  token as mttl's `HiddenStateComputer(pool="last")`);
- Retrieval: each example goes, whole, to the expert owning its most cosine-similar training example
  under all-MiniLM-L6-v2 (`baselines.Retriever`), mode "example";
- Merged Experts: one weight update, the mean of the experts' ΔW_e = s_e B_e A_e (`library.merged_delta`).
`routing_shares` is the routing probe: the share of a task's real tokens reaching each expert, per layer.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.cache import cached_dir
from common.evaluation import eval_mode, pad_id
from common.io import load_tensors, save_tensors
from common.lm_finetune import causal_parts, collate, encode_example
from common.routing import top_k_route
from projects.phatgoose.baselines import Retriever, retrieval_text
from projects.phatgoose.library import merged_delta, read_expert
from projects.phatgoose.moe import (
    Expert,
    attach_experts,
    captured_inputs,
    moe_modules,
    routing_scores,
    set_example_experts,
    set_mode,
)

POOLS = ("mean", "last")
# The library experts whose skill each held-out zoo task needs (common/zoo_tasks.py's notes): the
# routing probe reports the share of the task's tokens that reach them.
SKILLS = {
    "language_id_union": ("language_id_a", "language_id_b"),
    "sentiment_deflategate": ("sentiment_airline", "sentiment_apple", "sentiment_coachella"),
    "sentiment_self_driving": ("sentiment_airline", "sentiment_apple", "sentiment_coachella"),
    "translate_unseen": ("translate_to_english",),
}


def zoo_experts(
    paths: Mapping[str, str | Path], keys: Mapping[str, Mapping[str, torch.Tensor]] | None = None
) -> list[Expert]:
    """The zoo's adapter folders as `Expert`s, named by task, in `paths`' order; `keys` (task -> module ->
    (d_in,)) become their router keys."""
    experts = []
    for task, path in paths.items():
        ex = read_expert(path)
        ex.name = task
        if keys is not None:
            ex.router = {m: k.float() for m, k in keys[task].items()}
        experts.append(ex)
    return experts


def routed_model(base: nn.Module, experts: Sequence[Expert], top_k: int = 2) -> nn.Module:
    """A copy of `base` whose adapted linears route each token to its top-k experts by their keys."""
    model = copy.deepcopy(base)
    attach_experts(model, experts, topk_value=top_k)
    set_mode(model, "route")
    return model.eval()


# --- Average Activation ------------------------------------------------------------------------------


@torch.no_grad()
def average_activation_keys(
    base: nn.Module,
    tokenizer: Any,
    experts: Sequence[Expert],
    records: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    pool: str = "mean",
    max_length: int = 256,
    batch_size: int = 8,
) -> dict[str, dict[str, torch.Tensor]]:
    """Task -> module -> v_e = (1/N) Σ_n pool(u_n), u_n the module's inputs on training example n
    (source + target, as the expert was trained) with expert e alone active."""
    if pool not in POOLS:
        raise ValueError(f"unknown Average Activation pool {pool!r}; choose one of {POOLS}")
    model = copy.deepcopy(base)
    modules = attach_experts(model, experts)
    backbone, _ = causal_parts(model)
    pad = pad_id(tokenizer)
    out = {}
    with eval_mode(model):
        for e, ex in enumerate(experts):
            set_mode(model, "fixed", e)
            rows = [encode_example(tokenizer, r["source"], r["target"], max_length) for r in records[ex.name]]
            sums = {n: torch.zeros(m.A.shape[-1]) for n, m in modules.items()}
            for start in range(0, len(rows), batch_size):
                batch = collate(rows[start : start + batch_size], pad)
                mask = batch["attention_mask"].float()  # (B, T), right padding
                with captured_inputs(modules) as inputs:
                    backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                last = mask.sum(1).long() - 1  # (B,) the last real token
                for n in modules:
                    u = inputs[n][0].float()  # (B, T, d)
                    if pool == "mean":
                        pooled = (u * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                    else:
                        pooled = u[torch.arange(u.shape[0]), last]
                    sums[n] += pooled.sum(0)
            out[ex.name] = {n: s / len(rows) for n, s in sums.items()}
    return out


def cached_average_activation_keys(
    key: Mapping[str, Any],
    base: nn.Module,
    tokenizer: Any,
    experts: Sequence[Expert],
    records: Mapping[str, Sequence[Mapping[str, Any]]],
    **kwargs: Any,
) -> dict[str, dict[str, torch.Tensor]]:
    """`average_activation_keys`, kept under `$MOERGING_CACHE/phatgoose_average_activation/<hash of key>/`."""

    def build(tmp: Path) -> None:
        keys = average_activation_keys(base, tokenizer, experts, records, **kwargs)
        save_tensors(
            tmp / "keys.safetensors", {f"{t}|{m}": v for t, ms in keys.items() for m, v in ms.items()}
        )

    state = load_tensors(cached_dir("phatgoose_average_activation", dict(key), build) / "keys.safetensors")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, v in state.items():
        task, module = name.split("|", 1)
        out.setdefault(task, {})[module] = v
    return out


# --- Retrieval -------------------------------------------------------------------------------------


class ExampleRouter:
    """Sends each batch row, whole, to one expert (the model's MoE modules in mode "example").

    `lookup` maps a known query's token ids to its expert (Retrieval precomputed on the exact query text,
    the original's "Answer Choices: ..., Instance: ..."); a row is matched to the known query sharing its
    longest token prefix (a scorer's row is the prompt, then answers or generated tokens). A row that
    matches none, or only a few tokens (`min_prefix`), is embedded as decoded text by `fallback`. In
    generation the choice of the first call is kept while the key-value cache grows.
    """

    def __init__(
        self,
        model: nn.Module,
        lookup: Sequence[tuple[Sequence[int], int]],
        fallback: Any | None = None,
        tokenizer: Any | None = None,
        min_prefix: int = 8,
    ) -> None:
        self.model, self.fallback, self.tokenizer, self.min_prefix = model, fallback, tokenizer, min_prefix
        width = max((len(q) for q, _ in lookup), default=1)
        self.queries = torch.full((len(lookup), width), -1, dtype=torch.long)  # (Q, L), -1 padding
        for i, (q, _) in enumerate(lookup):
            self.queries[i, : len(q)] = torch.tensor(list(q), dtype=torch.long)
        self.lengths = torch.tensor([len(q) for q, _ in lookup], dtype=torch.long)
        self.experts = torch.tensor([e for _, e in lookup], dtype=torch.long)
        self.handle = model.register_forward_pre_hook(self._route, with_kwargs=True)

    def experts_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B,) expert per row of (B, T) token ids (left padding dropped by a 2D mask)."""
        picks = []
        for b in range(input_ids.shape[0]):
            row = input_ids[b].cpu()
            if attention_mask is not None and attention_mask.dim() == 2:
                row = row[attention_mask[b].cpu().bool()]
            picks.append(self._expert_of(row))
        return torch.tensor(picks, dtype=torch.long)

    def _expert_of(self, row: torch.Tensor) -> int:
        if len(self.experts):
            n = min(row.shape[0], self.queries.shape[1])
            same = (self.queries[:, :n] == row[None, :n]).long()  # (Q, n)
            common = same.cumprod(1).sum(1)  # (Q,) longest common prefix
            best = int(common.argmax())
            if int(common[best]) >= min(self.min_prefix, int(self.lengths[best])):
                return int(self.experts[best])
        if self.fallback is None or self.tokenizer is None:
            raise ValueError("a batch row matches no known query and no fallback retriever was given")
        return int(self.fallback([self.tokenizer.decode(row, skip_special_tokens=True)])[0])

    def _route(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        past = kwargs.get("past_key_values")
        mask = kwargs.get("attention_mask")
        if (
            input_ids is None
            or (past is not None and _cache_length(past) > 0)
            # a decoding step whose cache the hook cannot read: the mask covers more than these tokens
            or (mask is not None and mask.dim() == 2 and mask.shape[1] > input_ids.shape[1])
        ):
            return  # a later generation step: the rows keep their experts
        set_example_experts(self.model, self.experts_for(input_ids, mask))


def _cache_length(past: Any) -> int:
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    return int(past[0][0].shape[-2]) if past else 0


def example_model(
    base: nn.Module,
    tokenizer: Any,
    experts: Sequence[Expert],
    pick: Callable[[Sequence[str]], Sequence[int]],
    queries: Sequence[Mapping[str, Any]],
    query_text: Callable[[Mapping[str, Any]], str] | None = None,
) -> nn.Module:
    """A copy of `base` holding `experts`, each forward row sent, whole, to the expert that `pick` chooses
    for its query (`pick(texts)` -> one expert index per text, in `experts`' order; the texts are
    `query_text(q)`, default the source). Rows that match no known query are picked on their decoded text."""
    model = copy.deepcopy(base)
    attach_experts(model, experts)
    query_text = query_text or (lambda q: q["source"])
    picks = list(pick([query_text(q) for q in queries])) if queries else []
    lookup = [(tokenizer.encode(q["source"]), int(e)) for q, e in zip(queries, picks, strict=True)]
    # kept on the model so that the hook lives as long as it
    model.example_router = ExampleRouter(model, lookup, pick, tokenizer)
    return model.eval()


def retrieval_model(
    base: nn.Module,
    tokenizer: Any,
    experts: Sequence[Expert],
    retriever: Retriever,
    queries: Sequence[Mapping[str, Any]],
) -> nn.Module:
    """A copy of `base` holding `experts`, each forward row routed to the expert that `retriever` picks for
    its query (retriever.library must hold the experts' stored examples in `experts`' order)."""
    if retriever.names != [ex.name for ex in experts]:
        raise ValueError(
            f"the retriever's experts {retriever.names} differ from {[ex.name for ex in experts]}"
        )
    return example_model(
        base,
        tokenizer,
        experts,
        lambda texts: retriever.retrieve(list(texts)),
        queries,
        lambda q: retrieval_text(q, bool(q.get("choices"))),
    )


# --- Merged Experts ----------------------------------------------------------------------------------


def merged_experts_delta(experts: Sequence[Expert]) -> dict[str, torch.Tensor]:
    """Module -> ΔW = (1/N) Σ_e s_e B_e A_e (d_out, d_in), fp32 (Merged Experts, §4.2)."""
    return {m: (B.float() @ A.float()) for m, (A, B) in merged_delta(experts).items()}


# --- the routing probe -------------------------------------------------------------------------------

LAYER = re.compile(r"\.layers\.(\d+)\.")


@torch.no_grad()
def routing_shares(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    *,
    max_length: int = 256,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Share of the real tokens of `records` (source + target, teacher-forced) whose top-k picks reach
    each expert, per layer (mean over the layer's adapted modules): {"experts", "layers", "share" (L, E)}.
    Each token contributes its k picks with weight 1/k, so a layer's shares sum to 1."""
    modules = moe_modules(model)
    if len(names) != next(iter(modules.values())).n_experts:
        raise ValueError(f"{len(names)} expert names for {next(iter(modules.values())).n_experts} experts")
    backbone, _ = causal_parts(model)
    pad = pad_id(tokenizer)
    rows = [encode_example(tokenizer, r["source"], r["target"], max_length) for r in records]
    picks = {n: torch.zeros(len(names)) for n in modules}
    tokens = 0
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad)
            mask = batch["attention_mask"].bool()  # (B, T)
            with captured_inputs(modules) as inputs:
                backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            for n, m in modules.items():
                k = min(m.topk_value, m.n_experts)
                _, idx = top_k_route(
                    routing_scores(inputs[n][0][mask], m.keys), k, renormalize=True
                )  # (N, k)
                picks[n] += torch.bincount(idx.reshape(-1), minlength=len(names)).float() / k
            tokens += int(mask.sum())
    layers: dict[int, list[torch.Tensor]] = {}
    for n, count in picks.items():
        found = LAYER.search(n)
        layers.setdefault(int(found.group(1)) if found else -1, []).append(count / tokens)
    order = sorted(layers)
    return {
        "experts": list(names),
        "layers": order,
        "share": [torch.stack(layers[i]).mean(0).tolist() for i in order],
        "tokens": tokens,
    }
