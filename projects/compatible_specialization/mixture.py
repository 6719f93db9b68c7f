"""Activation interpolation and MoE routing between the specialists' MLPs (§3-4 of the paper;
`architecture/routed_transformer*.py` in the original).

Every block's `mlp` of a transformers causal LM is swapped for a module that sees the same input
x = ln_2(h) (B, T, d) and mixes the outputs of several MLPs; attention, LayerNorms and embeddings are
those of the base, which fine-tuning left untouched (only MLPs were trained). The model is GPT-2 (the
paper) or a Llama-family model (the real arm, SmolLM2-135M): its gated gate/up/down `mlp` is one expert.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from common.routing import top_k_route

# Where each supported family keeps its blocks (each with an `.mlp`): GPT-2, and Llama/Mistral (SmolLM2).
BLOCK_PATHS = {"gpt2": ("transformer", "h"), "llama": ("model", "layers"), "mistral": ("model", "layers")}


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks, bottom first (`transformer.h` of GPT-2, `model.layers` of Llama)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in BLOCK_PATHS:
        raise ValueError(
            f"model type {model_type!r} is not supported here; expected one of {sorted(BLOCK_PATHS)}"
        )
    outer, inner = BLOCK_PATHS[model_type]
    return getattr(getattr(model, outer), inner)


def hidden_size(model: nn.Module) -> int:
    """d, the width the MLPs read and write (GPT-2's `n_embd` through transformers' attribute map)."""
    return model.config.hidden_size


class InterpolatedMLP(nn.Module):
    """Activation interpolation: y = α·MLP_a(x) + (1 − α)·MLP_b(x), per token, same α at every layer."""

    def __init__(self, mlp_a: nn.Module, mlp_b: nn.Module, alpha: float = 0.5) -> None:
        super().__init__()
        self.mlp_a, self.mlp_b, self.alpha = mlp_a, mlp_b, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The endpoints skip the other MLP: α=1 (α=0) is exactly model a (b), not a·1 + b·0.
        if self.alpha == 1:
            return self.mlp_a(x)
        if self.alpha == 0:
            return self.mlp_b(x)
        return self.alpha * self.mlp_a(x) + (1 - self.alpha) * self.mlp_b(x)


class RoutedMLP(nn.Module):
    """y = Σ_{e ∈ top-k(p)} p_e · MLP_e(x), p = softmax(W x), W a bias-free linear router (E, d).

    As the original (`StandardBlock`, normalize=False) the kept p_e are not renormalised by default;
    with E = k = 2 this is a dense softmax mixture. Experts are frozen; only `router` is trained.
    """

    def __init__(
        self, experts: Sequence[nn.Module], d_model: int, top_k: int, renormalize: bool = False
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= len(experts):
            raise ValueError(f"top_k must be in 1..{len(experts)} (the number of experts), got {top_k}")
        self.experts = nn.ModuleList(experts)
        self.router = nn.Linear(d_model, len(experts), bias=False)
        nn.init.kaiming_uniform_(self.router.weight)  # the original's init (its `* 0.1` is a no-op)
        self.top_k, self.renormalize = top_k, renormalize

    def routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, indices), each (..., k), from router logits (..., E)."""
        return top_k_route(self.router(x), self.top_k, renormalize=self.renormalize, softmax_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, indices = self.routing(x)  # (B, T, k)
        flat_x = x.reshape(-1, x.shape[-1])  # (N, d)
        flat_w, flat_i = weights.reshape(-1, self.top_k), indices.reshape(-1, self.top_k)  # (N, k)
        out = torch.zeros_like(flat_x)
        # A loop over experts: E is small (2·L) and each expert is a full MLP, so the loop's overhead is nil;
        # with k = E every token goes to every expert and no rows are gathered.
        for e, expert in enumerate(self.experts):
            gate = (flat_w * (flat_i == e)).sum(-1)  # (N,) the weight of expert e, 0 if not routed
            if self.top_k == len(self.experts):
                out = out + gate[:, None] * expert(flat_x)
            else:
                rows = (flat_i == e).any(-1).nonzero().squeeze(-1)
                if rows.numel():
                    out = out.index_add(0, rows, gate[rows, None] * expert(flat_x[rows]))
        return out.reshape(x.shape)


def multi_layer_expert_layers(layer: int, num_layers: int, depth: int) -> list[int]:
    """Layers whose MLPs layer `layer` routes over: layer, layer+1, ... up to the top, then layer−1, layer−2 ...

    Multi-layer routing with L = `num_layers` (`multi_layer_routed_transformer_cleaned.py`): L slots,
    filled upward from `layer` while there are layers, the rest downward. Expert id j + c·N is model j's
    MLP of the c-th layer in this list.
    """
    if not 1 <= num_layers <= depth:
        raise ValueError(f"num_multi_layer_experts must be in 1..{depth} (the depth), got {num_layers}")
    if not 0 <= layer < depth:
        raise ValueError(f"layer {layer} is outside 0..{depth - 1}")
    up = [layer + c for c in range(num_layers) if layer + c < depth]
    return up + [layer - c for c in range(1, num_layers - len(up) + 1)]


def interpolated_model(
    base: nn.Module, mlps_a: Sequence[nn.Module], mlps_b: Sequence[nn.Module]
) -> nn.Module:
    """A copy of `base` whose every block mixes model a's and model b's MLP (`set_alpha` picks α)."""
    model = copy.deepcopy(base)
    for block, a, b in zip(decoder_blocks(model), mlps_a, mlps_b, strict=True):
        block.mlp = InterpolatedMLP(a, b)
    return model.requires_grad_(False)


def set_alpha(model: nn.Module, alpha: float) -> None:
    """Set α of every `InterpolatedMLP` of `model`."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    for module in model.modules():
        if isinstance(module, InterpolatedMLP):
            module.alpha = alpha


def routed_model(
    base: nn.Module,
    model_mlps: Sequence[Sequence[nn.Module]],
    *,
    top_k: int,
    num_multi_layer_experts: int = 1,
    renormalize: bool = False,
) -> nn.Module:
    """A copy of `base` whose block i routes over the MLPs of `multi_layer_expert_layers(i, L)` of every model.

    `model_mlps[j][l]` is model j's MLP at layer l; these modules are shared between the layers that route
    to them and frozen. Only the routers (`*.mlp.router.weight`) require gradients.
    """
    model = copy.deepcopy(base).requires_grad_(False)
    blocks = decoder_blocks(model)
    depth, n_models = len(blocks), len(model_mlps)
    if any(len(mlps) != depth for mlps in model_mlps):
        raise ValueError(f"every model needs {depth} MLPs (one per layer) to route over")
    for i, block in enumerate(blocks):
        layers = multi_layer_expert_layers(i, num_multi_layer_experts, depth)
        experts = [model_mlps[j][layer] for layer in layers for j in range(n_models)]  # id j + c·N
        block.mlp = RoutedMLP(experts, hidden_size(model), top_k, renormalize)
        for expert in experts:
            expert.requires_grad_(False)
    return model.to(next(base.parameters()).device)  # the new routers join the base on its device


def router_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The routers' weights by name: the only trained parameters of a routed model."""
    return {
        n: p for n, p in model.named_parameters(remove_duplicate=False) if n.endswith("mlp.router.weight")
    }
