"""Compatibility as representation similarity: linear CKA between the two specialists' hidden states
(`compute_kernel.py`, `figures/metrics.py` in the original: biased linear CKA, Kornblith et al. 2019)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from projects.compatible_specialization.mixture import decoder_blocks


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), X (n, p), Y (n, q), columns centred.

    The biased HSIC estimator with linear kernels (Kornblith et al. 2019, Eq. 5 in feature space).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"CKA needs two (n, features) matrices with the same n, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).pow(2).sum()
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


@torch.no_grad()
def block_features(model: nn.Module, windows: torch.Tensor, layer: int) -> torch.Tensor:
    """The output of block `layer`, averaged over the sequence: (N, d) for windows (N, T)."""
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    # A hook rather than `output_hidden_states`: transformers applies ln_f to the last block's entry there.
    handle = decoder_blocks(model)[layer].register_forward_hook(hook)
    was_training = model.training
    try:
        model.eval()
        model(input_ids=windows)
    finally:
        handle.remove()
        model.train(was_training)
    return captured[0].mean(dim=1)
