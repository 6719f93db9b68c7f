"""Where Arrow sends each task's tokens: the routing distribution of a library on a task mixture.

For every adapted linear and token, Arrow's top-1 expert is argmax_e |x · proto_e| (paper §4.2), taken from
the Arrow selector itself with top_k = 1. `routing_matrix` counts, per task, the fraction of tokens
(over all layers) that go to each expert; `own_expert_rate` is the fraction going to the example's own
expert (its task's expert, or its cluster's under MBC), beside chance 1/E. An Arrow library whose
prototypes carry task information routes well above chance; one whose prototypes do not sits at chance,
whatever its top_k.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from projects.mbc_arrow.expert_model import MultiExpertModel
from projects.mbc_arrow.selectors import route, selector_config
from projects.mbc_arrow.tasks import prompt_and_answer


def routing_matrix(
    top1: Sequence[torch.Tensor], tasks: Sequence[str], n_experts: int
) -> tuple[list[str], torch.Tensor]:
    """(sorted task names, M (T, E)) from each example's top-1 expert indices (layers, tokens).

    M[t, e] = fraction of task t's (layer, token) routing decisions that pick expert e; rows sum to 1.
    Every example weighs by its number of tokens, as each token is routed on its own.
    """
    order = sorted(set(tasks))
    counts = torch.zeros(len(order), n_experts, dtype=torch.float64)
    for idx, task in zip(top1, tasks, strict=True):
        counts[order.index(task)] += torch.bincount(idx.reshape(-1), minlength=n_experts).double()
    return order, counts / counts.sum(1, keepdim=True).clamp(min=1)


def own_expert_rate(matrix: torch.Tensor, order: Sequence[str], task_to_expert: Mapping[str, int]) -> dict:
    """Per task, the routed fraction to its own expert; and their mean over tasks."""
    per_task = {t: float(matrix[i, task_to_expert[t]]) for i, t in enumerate(order)}
    return {"per_task": per_task, "mean": sum(per_task.values()) / len(per_task)}


@torch.no_grad()
def arrow_routing(
    library_id: str,
    examples: Sequence[Mapping[str, Any]],
    max_input_length: int,
    prompt_format: str = "mttl",
) -> dict[str, Any]:
    """Arrow's routing distribution of a library over `examples` (dicts with task and source), one at a time
    (no padding tokens), with the prototypes Arrow uses (`MultiExpertModel.set_selector('arrow')`)."""
    model = MultiExpertModel.from_pretrained_library(library_id, {"name": "task_name"})
    model.set_selector({"name": "arrow", "top_k": 1})
    seen: list[torch.Tensor] = []

    def hook(layer: torch.nn.Module, args: tuple, _out: Any) -> None:  # the selector's own top-1 choice
        _, idx = route(model.selector, args[0], layer.A.shape[0], protos=layer.protos)
        seen.append(idx[..., 0].reshape(-1))

    handles = [layer.register_forward_hook(hook) for layer in model.layers().values()]
    top1, tasks = [], []
    try:
        for ex in tqdm(examples, desc="arrow routing", leave=False):
            seen.clear()
            enc = model.tokenizer(
                prompt_and_answer(ex["source"], "", prompt_format)[0],
                return_tensors="pt",
                truncation=True,
                max_length=max_input_length,
            )
            model.model(**enc)
            top1.append(torch.stack(seen))
            tasks.append(ex["task"])
    finally:
        for h in handles:
            h.remove()
    n_exp = len(model.expert_names)
    order, matrix = routing_matrix(top1, tasks, n_exp)
    own = own_expert_rate(matrix, order, model.task_to_expert)
    return {
        "experts": list(model.expert_names),
        "tasks": order,
        "matrix": matrix.tolist(),
        "own_expert_rate": own,
        "chance": 1.0 / n_exp,
    }


# --- per layer depth (the zoo) ---------------------------------------------------------------------

_DEPTH = re.compile(r"\.(?:layers|h|block)\.(\d+)\.")


def depth_of(module: str) -> int:
    """The transformer block index of an adapted module ('model.layers.3.self_attn.q_proj' -> 3)."""
    found = _DEPTH.search(f".{module}.")
    if found is None:
        raise ValueError(f"no block index in module name {module!r}")
    return int(found.group(1))


@torch.no_grad()
def layer_routing(
    model: MultiExpertModel, examples: Sequence[Mapping[str, Any]], max_length: int
) -> dict[str, torch.Tensor]:
    """Task -> counts (depth, E) of Arrow's top-1 picks, over every adapted linear of each block and every
    source token; examples (dicts with task and source) run one at a time (no padding)."""
    layers = model.layers()
    depths = {name: depth_of(name) for name in layers}
    n_depth, n_exp = max(depths.values()) + 1, len(model.expert_names)
    top1 = selector_config({**model.selector, "top_k": 1})
    seen: list[tuple[int, torch.Tensor]] = []

    def hook(name: str):
        def record(layer: torch.nn.Module, args: tuple, _out: Any) -> None:
            _, idx = route(top1, args[0], n_exp, protos=layer.protos)
            seen.append((depths[name], idx[..., 0].reshape(-1)))

        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    counts: dict[str, torch.Tensor] = {}
    try:
        for ex in tqdm(examples, desc="arrow routing per layer", leave=False):
            seen.clear()
            enc = model.tokenizer(ex["source"], return_tensors="pt", truncation=True, max_length=max_length)
            model.model(**enc)
            c = counts.setdefault(ex["task"], torch.zeros(n_depth, n_exp, dtype=torch.float64))
            for d, idx in seen:
                c[d] += torch.bincount(idx.cpu(), minlength=n_exp).double()
    finally:
        for h in handles:
            h.remove()
    return counts


def layer_shares(counts: torch.Tensor) -> torch.Tensor:
    """Counts (depth, E) -> shares: each depth's row divided by its sum (rows sum to 1)."""
    return counts / counts.sum(-1, keepdim=True).clamp(min=1)


def own_share(shares: torch.Tensor, own: Sequence[int]) -> list[float]:
    """Per depth, the share of picks that land on the experts in `own` (the task's expert or cluster)."""
    return shares[:, list(own)].sum(-1).tolist()
