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


OUTPUT_MARKER = ".moerging_output.json"  # {"kind": ...}: this folder is an output we wrote, of that kind


class OutputExistsError(FileExistsError):
    """A user-given output folder holds files we did not write; replacing it would delete them."""


def check_replaceable(
    path: str | os.PathLike, kind: str, overwrite: bool = False, option: str = "overwrite=true"
) -> None:
    """Refuse to replace `path` unless it is absent, empty, a previous output of `kind`, or `overwrite`.

    An entry point calls it on its output paths before the work, so that a refusal costs nothing."""
    path = Path(path).resolve()
    if path.is_file():
        raise OutputExistsError(f"{path} is a file, not a {kind} folder; choose another path for {kind}")
    cwd = Path.cwd().resolve()
    if path == cwd or path in cwd.parents or path == Path.home().resolve():
        raise OutputExistsError(
            f"{path} is the working directory, an ancestor of it or the home folder: never replaced by "
            f"a {kind}; choose a new folder"
        )
    if overwrite or not path.is_dir() or not any(path.iterdir()):
        return
    marker = path / OUTPUT_MARKER
    try:
        previous = json.loads(marker.read_text()).get("kind") if marker.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        previous = None
    if previous != kind:
        what = f"a {previous}" if previous else "files this project did not write"
        raise OutputExistsError(
            f"{path} is not empty and holds {what}, not a previous {kind}: refusing to replace (its "
            f"contents would be deleted); choose a new folder, or set {option} to replace it"
        )


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike,
    *,
    kind: str | None = None,
    overwrite: bool = False,
    option: str = "overwrite=true",
) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success it replaces `path` (an old copy is removed).

    `kind=None` is for folders the code owns (checkpoints, caches): they are replaced whatever they hold.
    A user-given output passes its `kind` (e.g. "smile model"): the folder gets an `OUTPUT_MARKER` naming
    it, and a non-empty `path` is replaced only when it is a previous output of the same kind, or when
    `overwrite` (the user's `option`, named in the refusal) is set. The check runs before any work.
    """
    import shutil

    path = Path(path).resolve()  # "." has no name and no parent to put the temp folder in
    if kind is not None:
        check_replaceable(path, kind, overwrite, option)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if kind is not None:
            (tmp / OUTPUT_MARKER).write_text(json.dumps({"kind": kind}) + "\n")
            check_replaceable(path, kind, overwrite, option)  # it may have been filled meanwhile
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


class NonFiniteError(ValueError):
    """Weights or statistics holding NaN or inf: everything computed from them would be NaN."""


def check_finite(tensors: Mapping[str, torch.Tensor], source: Any) -> None:
    """Refuse NaN/inf in floating-point `tensors`, naming `source` (a file, a model) and the tensors."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteError(
            f"{source} holds NaN/inf weights in {bad[:5]}{more}: every output computed from them would be NaN; "
            "recreate or re-download it"
        )


def load_tensors(
    path: str | os.PathLike, device: str = "cpu", *, finite: bool = True
) -> dict[str, torch.Tensor]:
    """Read a safetensors file; NaN/inf are refused here, once, for every caller (`finite=False` skips it)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no such safetensors file: {path}")
    try:
        tensors = load_file(str(path), device=device)
    except (SafetensorError, OSError) as e:  # truncated header or data, or not safetensors at all
        raise CorruptFileError(
            f"{path} is not a readable safetensors file ({e}): it may have been cut short; "
            "remove it and rerun the step that wrote it"
        ) from e
    if finite:
        check_finite(tensors, path)
    return tensors


def tensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata saved in a safetensors header (`save_tensors(..., metadata=)`), without the tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no such safetensors file: {path}")
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


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
