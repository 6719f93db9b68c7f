"""Merge N checkpoints stored as safetensors one tensor name at a time (issue 9, row 7).

The base and the N models are never loaded whole: each file is mapped copy-on-write, and for each tensor
name the N + 1 tensors are views of the mappings (no copy), merged by a per-tensor merge of
`methods.METHODS`, written straight after the output's header (known up front: each output tensor has
its base tensor's name, dtype and shape), and their pages dropped from RSS (`madvise(MADV_DONTNEED)`).
Peak RSS is about N + 2 tensors of the largest name plus the merge's temporaries; the result appears
atomically. The merged tensors equal the in-memory merge of the whole state dicts exactly,
because each of these merges treats every tensor on its own.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from common.io import atomic_path
from common.registry import lookup
from projects.mats.merging import MergeError
from projects.mats.methods import METHODS

# The safetensors format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header size,
# a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the bytes.
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
# Merges that treat each tensor on its own (streaming them is exact); TIES only in its per-tensor variants.
PER_TENSOR = ("average", "task_arithmetic", "ties")


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets from the start of the file
    end: int


class SafetensorsReader:
    """One safetensors file: its header on opening, then any tensor by name, read on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such safetensors file: {self.path}")
        self._file: BinaryIO = self.path.open("rb")
        try:
            (size,) = struct.unpack("<Q", self._file.read(8))
            header = json.loads(self._file.read(size))
        except (struct.error, ValueError) as e:
            self._file.close()
            raise ValueError(f"{self.path} is not a safetensors file ({e})") from e
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            if entry["dtype"] not in DTYPES:
                raise ValueError(
                    f"{self.path}: tensor {name!r} has dtype {entry['dtype']}, not supported here"
                )
            begin, end = entry["data_offsets"]
            self.tensors[name] = TensorInfo(
                DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + size + begin, 8 + size + end
            )
        file_size = self.path.stat().st_size
        short = [n for n, i in self.tensors.items() if i.end > file_size]
        if short:
            self._file.close()
            raise ValueError(f"{self.path} is truncated: tensor {short[0]!r} ends past the end of the file")
        self._map = mmap.mmap(
            self._file.fileno(), 0, access=mmap.ACCESS_COPY
        )  # private: writes never reach the file

    def view(self, name: str) -> torch.Tensor:
        """The tensor `name` as a view of the file's copy-on-write mapping: no copy; pages come from the
        page cache as the merge touches them, and leave this process's RSS with `release(name)`."""
        info = self.tensors[name]
        if info.end == info.begin:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=info.end - info.begin, offset=info.begin)
        return flat.view(info.dtype).reshape(info.shape)

    def release(self, name: str) -> None:
        """Drop the pages of tensor `name` from RSS (views of it read the file again if used after this)."""
        info = self.tensors[name]
        start = info.begin - info.begin % mmap.PAGESIZE
        if info.end > start and hasattr(mmap, "MADV_DONTNEED"):  # not on Windows: pages then stay mapped
            self._map.madvise(mmap.MADV_DONTNEED, start, info.end - start)

    def close(self) -> None:
        self._file.close()  # the mapping closes when its last view is gone

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_files(base: SafetensorsReader, models: Sequence[SafetensorsReader]) -> None:
    """Every model file holds the base file's tensor names with the same shapes (clear errors otherwise)."""
    for m in models:
        missing = [n for n in base.tensors if n not in m.tensors]
        if missing:
            raise MergeError(f"tensor {missing[0]!r} of the base {base.path} is missing from {m.path}")
        extra = [n for n in m.tensors if n not in base.tensors]
        if extra:
            raise MergeError(f"tensor {extra[0]!r} of {m.path} is not in the base {base.path}")
        for name, info in base.tensors.items():
            if m.tensors[name].shape != info.shape:
                raise MergeError(
                    f"tensor {name!r} has shape {m.tensors[name].shape} in {m.path}, "
                    f"{info.shape} in the base {base.path}"
                )


def _header(infos: Mapping[str, TensorInfo], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, info in infos.items():
        nbytes = info.end - info.begin
        header[name] = {
            "dtype": _NAMES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def merge_safetensors(
    base_path: str | Path,
    model_paths: Sequence[str | Path],
    out_path: str | Path,
    method: str,
    metadata: Mapping[str, str] | None = None,
    **hparams,
) -> None:
    """Merge the models (safetensors files) with `METHODS[method]`, tensor by tensor, into `out_path`."""
    if method not in PER_TENSOR:
        lookup(METHODS, method, "merge method")  # an unknown name: fails with the close matches
        raise MergeError(
            f"{method!r} cannot be merged tensor by tensor (it needs metadata or all parameters at once); "
            f"streaming merges: {PER_TENSOR}"
        )
    if method == "ties" and hparams.get("variant", "mats") == "mats":
        raise MergeError(
            "TIES variant 'mats' takes one top-k over all parameters at once; stream variant='mergekit' or "
            "'peft' (per tensor), or merge in memory"
        )
    merge = METHODS[method]
    if not model_paths:
        raise MergeError("nothing to merge: no model given")
    with SafetensorsReader(base_path) as base:
        models = [SafetensorsReader(p) for p in model_paths]
        try:
            check_files(base, models)
            with atomic_path(out_path, suffix=".safetensors") as tmp, tmp.open("wb") as out:
                out.write(_header(base.tensors, metadata or {}))
                for name, info in base.tensors.items():
                    inputs = [{name: m.view(name)} for m in models]
                    merged = merge({name: base.view(name)}, inputs, **hparams)[name]
                    if merged.dtype != info.dtype or tuple(merged.shape) != info.shape:
                        raise MergeError(f"{method} changed {name!r} to {merged.dtype} {tuple(merged.shape)}")
                    # a finite sum is a cheap proof; an overflowing one takes the full check
                    if merged.is_floating_point() and not bool(torch.isfinite(merged.sum())):
                        if not bool(torch.isfinite(merged).all()):
                            raise MergeError(f"the merged {name!r} has NaN or inf values; nothing written")
                    out.write(merged.contiguous().reshape(-1).view(torch.uint8).numpy())
                    del merged
                    for r in (base, *models):
                        r.release(name)
        finally:
            for m in models:
                m.close()
