"""Device names checked up front, so a run asked for a GPU fails at once on a CPU-only machine; and
`device_guard`, which checks that models and their inputs are where a run was told to put them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


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


@dataclass
class DeviceReport:
    """What `device_guard` saw: forward passes checked and the device argument of each `load_model`."""

    expected: torch.device
    forwards: int = 0
    loads: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "expected": str(self.expected),
            "forwards_checked": self.forwards,
            "load_model_devices": self.loads,
        }


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 are one device when the current device is 0."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


@contextlib.contextmanager
def device_guard(device: str | torch.device) -> Iterator[DeviceReport]:
    """Inside: every module with parameters of its own must hold them on `device` and get its positional
    tensor inputs there (0-d tensors excepted: torch moves scalars; a global hook sees no keyword
    arguments, and the leaf layers, where the parameters are, take their input positionally);
    `load_model` calls are recorded."""
    report = DeviceReport(resolve_device(device))

    def check(module: nn.Module, args: tuple) -> None:
        param = next(module.parameters(recurse=False), None)
        if param is None:
            return
        name = type(module).__name__
        if not same_device(param.device, report.expected):
            raise AssertionError(f"{name} has its parameters on {param.device}, not on {report.expected}")
        for t in _tensors(args):
            if t.dim() > 0 and not same_device(t.device, param.device):
                raise AssertionError(
                    f"{name} got an input {tuple(t.shape)} on {t.device}, its parameters are on {param.device}"
                )
        report.forwards += 1

    import common.models.loading as loading  # here: common.models imports this module

    real_resolve = loading.resolve_device

    def recording_resolve(dev: str | torch.device = "auto") -> torch.device:
        report.loads.append(str(dev))
        return real_resolve(dev)

    handle = nn.modules.module.register_module_forward_pre_hook(check)
    loading.resolve_device = recording_resolve  # `load_model` resolves its device argument through this
    try:
        yield report
    finally:
        handle.remove()
        loading.resolve_device = real_resolve
