"""Atomic writes: a file appears whole or not at all (temp file in the same directory, then rename)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.cli import UserError


class CorruptFileError(UserError):
    """A file that exists but cannot be read back (truncated, not UTF-8, not the format its name says)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named (or a run needs) that is not there."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success it replaces `path` (an old copy is removed)."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail now, not after the run, when `path` (a file or folder, made later) could not be written:
    its nearest existing ancestor must be a writable folder, and `path` itself, if it exists, writable."""
    path = Path(path).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != path and not probe.is_dir():
        raise UserError(f"{what} {path}: {probe} is a file, not a folder; choose another path")
    if not os.access(probe, os.W_OK | (os.X_OK if probe.is_dir() else 0)):
        raise UserError(f"{what} {path}: {probe} is not writable; choose another path or fix its permissions")
    return path


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no such JSON file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CorruptFileError(
            f"{path} is not UTF-8 text (byte {e.start}); it is not a JSON file we wrote"
        ) from e
    except json.JSONDecodeError as e:
        raise CorruptFileError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): it may have been cut "
            "short; remove it (or rerun the step that writes it)"
        ) from e


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Save as safetensors, atomically; refuses NaN/inf so a diverged run never overwrites good weights."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"refusing to save non-finite tensors (NaN/inf) to {path}: {bad[:5]}")
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(contiguous, str(tmp), metadata=dict(metadata or {}))


def load_tensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no such safetensors file: {path}")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as e:  # truncated header or data, or not safetensors at all
        raise CorruptFileError(
            f"{path} is not a readable safetensors file ({e}): it may have been cut short; "
            "remove it and rerun the step that wrote it"
        ) from e


def torch_load_safe(path: str | os.PathLike) -> Any:
    """Read a `.pt`/`.ckpt` with `weights_only=True`; a file that needs arbitrary unpickling is refused."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no such checkpoint: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError (or RuntimeError) for disallowed globals
        raise CorruptFileError(
            f"{path} cannot be read with torch.load(weights_only=True): it holds objects other than "
            f"tensors and plain containers, and we never unpickle untrusted files ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from e
