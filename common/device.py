"""Device names checked up front, so a run asked for a GPU fails at once on a CPU-only machine."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`"auto"` -> cuda if available else cpu; any other name must be usable here, or a clear error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto' ({e})") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise RuntimeError(
                f"device {str(device)!r} was requested but CUDA is not available on this machine "
                f"(torch {torch.__version__}, {build}); use device='cpu' or device='auto'"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
    return resolved
