"""A run directory: resolved config, `results.json` with provenance, a markdown table, plots with their data.

Every results file in the repo follows one schema (`SCHEMA`), so `common.results_md` can gather
them into RESULTS.md:

    {"schema": SCHEMA, "project": str, "experiment": str, "scale": "micro"|"tiny"|"paper",
     "seed": int, "metrics": {name: number | {..}}, "config": {...}, "provenance": {...}}
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import numbers
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from common.cli import UserError
from common.config import dump_config, read_config_file
from common.io import check_writable, read_json, write_json, write_text

SCHEMA = "moerging.results/v1"
SCALES = ("micro", "tiny", "real", "paper")
LOCK = ".lock"
_LOCKS: dict[Path, int] = {}  # run folder -> open file descriptor holding its lock, for this process's life
_FRESH: list[Path] = []  # run folders this process created; a failed run removes the ones holding only config


class RunDirBusyError(UserError):
    """Another process is writing to the same run folder."""


def lock_run_dir(path: str | os.PathLike) -> None:
    """Take an exclusive `fcntl.flock` on `path/.lock`, held until the run writes its results (or exits).

    A second process writing to the same folder would interleave checkpoints and results; it is refused.
    Taking the lock again in the same process is a no-op, and the processes of one distributed launch
    (torchrun/accelerate set RANK) are one run: only rank 0 locks. (flock is advisory and local: on a file
    system that does not support it the call fails and we go on without a lock.)
    """
    path = Path(path).resolve()
    if path in _LOCKS or os.environ.get("RANK", "0") != "0":
        return
    _acquire(path, wait=False)


@contextlib.contextmanager
def training_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold `path/.lock` while training into `path`. A second process training the same folder waits for
    the first, then resumes (or, finished, reuses) what it wrote, instead of interleaving checkpoints with
    it; so two processes that both need a model may both ask for it. A lock this process already holds
    (its `RunDir`) is left as it is; only rank 0 of a distributed launch locks, as `lock_run_dir`."""
    path = Path(path).resolve()
    if path in _LOCKS or os.environ.get("RANK", "0") != "0":
        yield
        return
    path.mkdir(parents=True, exist_ok=True)
    taken = _acquire(path, wait=True)
    try:
        yield
    finally:
        if taken:
            release_run_dir(path)


def _acquire(path: Path, wait: bool) -> bool:
    """Lock `path/.lock` exclusively for this process and write its pid there; whether it is held. Held by
    another process: wait for it (`wait`) or raise `RunDirBusyError`. No flock here (some network file
    systems): False, and the caller goes on unlocked."""
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            if not wait:
                raise RunDirBusyError(
                    f"{path} is in use by another process (pid {holder}); wait for it to finish or choose "
                    "another output folder"
                ) from None
            print(f"{path} is being trained by pid {holder}: waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
    except RunDirBusyError:
        os.close(fd)
        raise
    except OSError:
        os.close(fd)
        return False
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _LOCKS[path] = fd
    return True


def run_dir_busy(path: str | os.PathLike) -> bool:
    """Whether another process holds `path`'s lock (is writing that run) now; the lock is not kept."""
    path = Path(path).resolve()
    if path in _LOCKS or not (path / LOCK).is_file():
        return False
    fd = os.open(path / LOCK, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no flock here: no process can be seen holding it
        return False
    finally:
        os.close(fd)  # closing the descriptor drops a lock taken by this test
    return False


def release_run_dir(path: str | os.PathLike) -> None:
    """Let another process write to `path` again (the run's results are written)."""
    fd = _LOCKS.pop(Path(path).resolve(), None)
    if fd is not None:
        os.close(fd)


def discard_unfinished() -> list[Path]:
    """Remove run folders this process created that hold nothing but their config (a run that failed
    before writing anything); called by `common.cli.run_main` when a command fails."""
    removed = []
    for path in _FRESH:
        if path.is_dir() and {p.name for p in path.iterdir()} <= {"config.yaml", LOCK}:
            for name in ("config.yaml", LOCK):
                (path / name).unlink(missing_ok=True)
            release_run_dir(path)
            path.rmdir()
            removed.append(path)
    _FRESH.clear()
    return removed


_PACKAGES = ("torch", "transformers", "peft", "datasets", "accelerate", "lm_eval", "numpy", "safetensors")


def git_sha(repo: str | os.PathLike | None = None) -> str:
    """The checkout's commit, with '-dirty' if it has uncommitted changes; 'unknown' outside git."""
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions(names: Sequence[str] = _PACKAGES) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def provenance(seed: int | None, started: float | None = None) -> dict[str, Any]:
    """Where a result came from: code version, seed, packages, threads, device, wall time."""
    return {
        "git_sha": git_sha(),
        "seed": seed,
        "packages": package_versions(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cuda": torch.cuda.is_available(),
        "platform": platform.platform(),
        "argv": sys.argv,
        "wall_time_s": None if started is None else round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices); the seed must be an integer in [0, 2**32)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise UserError(f"seed {seed!r} must be an integer in [0, 2**32) (NumPy's seed range)")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Keys, at any depth, that change where logs go and never what a run computes.
RESULT_NEUTRAL_KEYS = frozenset({"log_backend"})


def _without_neutral(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _without_neutral(v) for k, v in tree.items() if k not in RESULT_NEUTRAL_KEYS}
    return tree


def check_same_config(
    path: str | os.PathLike, config: Mapping[str, Any], may_change: Sequence[str] = ()
) -> None:
    """Refuse to reuse a run folder whose saved `config.yaml` differs from `config` outside `may_change`.

    A pipeline that reuses finished pieces of a folder (trained experts, cached results) calls this first,
    so that pieces made under another config are never mixed in silently.
    """
    saved_path = Path(path) / "config.yaml"
    if not saved_path.is_file():
        return
    saved = _without_neutral(read_config_file(saved_path))
    as_saved = _without_neutral(yaml.safe_load(dump_config(config)) or {})  # as read back (tuples -> lists)
    now = {k: v for k, v in as_saved.items() if k not in may_change}
    before = {k: v for k, v in saved.items() if k not in may_change}
    changed = {
        k: (before.get(k), now.get(k)) for k in sorted(set(now) | set(before)) if before.get(k) != now.get(k)
    }
    if changed:
        raise ValueError(
            f"{path} holds a run made with another config (key: saved, now): {changed}; "
            "use a new output folder or remove this one"
        )


def finished_results(path: str | os.PathLike, config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The metrics of the finished run in `path` if its `results.json` was made with `config`, else None.

    A pipeline re-run after a kill reuses its finished stages with this instead of recomputing them; a
    stage finished under another config (outside `RESULT_NEUTRAL_KEYS`) is recomputed.
    """
    saved_path = Path(path) / "results.json"
    if not saved_path.is_file():
        return None
    saved = read_json(saved_path)
    now = json.loads(json.dumps(dict(config), default=str))  # as `write_results` wrote it
    if _without_neutral(saved.get("config")) != _without_neutral(now):
        return None
    return dict(saved["metrics"])


class RunDir:
    """One run's output folder. Create it, write the resolved config first, results last (a re-run with
    another config replaces the saved `config.yaml` only together with its results)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        project: str,
        experiment: str,
        scale: str,
        seed: int | None,
        config: Mapping[str, Any],
    ) -> None:
        if scale not in SCALES:
            raise ValueError(f"unknown scale {scale!r}; choose one of {SCALES}")
        self.path = check_writable(path, "run folder")
        if not self.path.exists() or not any(self.path.iterdir()):
            _FRESH.append(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        lock_run_dir(self.path)
        self.project, self.experiment, self.scale, self.seed = project, experiment, scale, seed
        self.config = dict(config)
        self.started = time.time()
        # A re-run with another config keeps the saved one until it has results: a run that fails (e.g. on
        # the config check of a resumed training) must leave config.yaml describing the folder's files.
        saved, text = self.path / "config.yaml", dump_config(self.config)
        self._pending_config: str | None = None
        if saved.is_file() and saved.read_text() != text:
            self._pending_config = text
        else:
            write_text(saved, text)

    def write_results(self, metrics: Mapping[str, Any], **extra: Any) -> Path:
        """Write `results.json` (schema above); `extra` adds top-level fields such as per-example data."""
        record = {
            "schema": SCHEMA,
            "project": self.project,
            "experiment": self.experiment,
            "scale": self.scale,
            "seed": self.seed,
            "metrics": dict(metrics),
            "config": self.config,
            "provenance": provenance(self.seed, self.started),
            **extra,
        }
        if self._pending_config is not None:
            write_text(self.path / "config.yaml", self._pending_config)
            self._pending_config = None
        out = self.path / "results.json"
        write_json(out, record)
        release_run_dir(self.path)
        return out

    def write_table(
        self, rows: Sequence[Mapping[str, Any]], name: str = "results.md", title: str = ""
    ) -> Path:
        out = self.path / name
        write_text(out, (f"## {title}\n\n" if title else "") + markdown_table(rows) + "\n")
        return out

    def save_plot(self, fig: Any, name: str, data: Mapping[str, Any]) -> Path:
        """Save a matplotlib figure as PNG with the data it shows beside it (`<name>.json`)."""
        out = self.path / f"{name}.png"
        fig.savefig(out, dpi=120, bbox_inches="tight")
        write_json(self.path / f"{name}.json", data)
        return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts -> a GitHub markdown table (columns in first-seen order unless given)."""
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
