"""Content-hashed caches (tokenised data, base models, statistics): a re-run skips finished work.

An entry lives at `<cache root>/<kind>/<hash of its key>/` and counts as present only once it is
complete: it is built in a temp directory and renamed into place, so a killed build leaves nothing.

Some entries take hours to build and ship with the code instead (the expert zoo's LoRA adapters, under
`shipped_root()`, the repository's `zoo/`): `ship` copies a finished entry there, and `cached_dir(...,
shipped=folder)` fills a missing entry by copying that folder when its key is this key, in place of building.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.io import atomic_dir, read_json, write_json

KEY_FILE = "cache_key.json"


def cache_root() -> Path:
    """`$MOERGING_CACHE`, else `~/.cache/moerging`."""
    return Path(os.environ.get("MOERGING_CACHE", Path.home() / ".cache" / "moerging"))


def content_hash(key: Any, length: int = 16) -> str:
    """Stable hash of a JSON-able key (dict order does not matter)."""
    blob = json.dumps(key, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def weights_digest(folder: str | os.PathLike, length: int = 16) -> str:
    """sha256 over the safetensors files of a model or adapter folder (names and bytes): what identifies
    trained weights, where a cache key says only how they were to be trained (the same key trained on
    another machine, or by older code, gives other weights). Memoised per file size and mtime."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    stamps = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _digest(stamps)[:length]


@functools.lru_cache(maxsize=256)
def _digest(stamps: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _, _ in stamps:
        h.update(Path(name).name.encode() + b"\0")
        with open(name, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def shipped_root() -> Path:
    """`$MOERGING_SHIPPED`, else the repository's `zoo/`: cache entries that ship with the code."""
    return Path(os.environ.get("MOERGING_SHIPPED", Path(__file__).resolve().parents[1] / "zoo"))


def holds(folder: str | os.PathLike, key: Any) -> bool:
    """Whether `folder` is a complete entry (its `KEY_FILE` written) made for exactly `key`."""
    path = Path(folder) / KEY_FILE
    return path.is_file() and read_json(path) == json.loads(json.dumps(key, default=str))


def entry_path(kind: str, key: Any, root: str | os.PathLike | None = None) -> Path:
    """Where `cached_dir` keeps the entry of `key`: `<root>/<kind>/<hash of key>`."""
    return Path(root or cache_root()) / kind / content_hash(key)


def present(kind: str, key: Any, shipped: str | os.PathLike | None = None) -> bool:
    """Whether `cached_dir(kind, key, ..., shipped=shipped)` would build nothing: the entry is complete in the
    cache, or `shipped` holds it."""
    if (entry_path(kind, key) / KEY_FILE).is_file():
        return True
    return shipped is not None and holds(shipped, key)


def _copy_entry(src: Path, out: Path) -> None:
    for f in src.iterdir():
        if f.name != KEY_FILE:  # cached_dir writes it last, as for a build
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, out / f.name)


def cached_dir(
    kind: str,
    key: Any,
    build: Callable[[Path], None],
    root: str | os.PathLike | None = None,
    shipped: str | os.PathLike | None = None,
) -> Path:
    """Return the cache folder for `key`, calling `build(tmp_dir)` to fill it only when absent. Where the
    folder `shipped` holds this key's entry (`holds`), it is copied instead of built."""
    path = entry_path(kind, key, root)
    if (path / KEY_FILE).is_file():
        return path
    if shipped is not None and holds(shipped, key):
        print(f"cache: {kind} entry from the shipped copy {shipped}", flush=True)
        build = functools.partial(_copy_entry, Path(shipped))
    with atomic_dir(path) as tmp:
        build(tmp)
        write_json(tmp / KEY_FILE, key)  # written last: its presence marks the entry complete
    return path


def ship(entry: str | os.PathLike, dest: str | os.PathLike) -> bool:
    """Copy the complete cache entry `entry` to `dest` (atomically; a `dest` made for another key is replaced).
    False where `dest` already holds the entry's key."""
    entry, dest = Path(entry), Path(dest)
    if not (entry / KEY_FILE).is_file():
        raise FileNotFoundError(f"{entry} is not a finished cache entry (no {KEY_FILE})")
    key = read_json(entry / KEY_FILE)
    if holds(dest, key):
        return False
    with atomic_dir(dest) as tmp:
        _copy_entry(entry, tmp)
        write_json(tmp / KEY_FILE, key)
    return True
