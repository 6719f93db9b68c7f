"""Deterministic train/validation/test splits from a seed, a leak check, and a record of each split.

Every splitter returns `(DatasetDict, record)`. The record (method, seed, fractions, group ids and
sizes per split) is plain JSON, ready for `RunDir.write_results(metrics, split=record)`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from datasets import Dataset, DatasetDict

DEFAULT_FRACTIONS: Mapping[str, float] = {"train": 0.8, "validation": 0.1, "test": 0.1}
MAX_RECORDED_GROUPS = 1000  # beyond this a split's group ids are recorded as a digest only


def _check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    if not fractions or any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {dict(fractions)}")
    return dict(fractions)


def allocate(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Split n items into counts proportional to `fractions` (largest remainder, ties by order).

    Every split with a positive fraction gets at least one item, so n must be at least their number.
    """
    fractions = _check_fractions(fractions)
    positive = [name for name, f in fractions.items() if f > 0]
    if n < len(positive):
        raise ValueError(f"cannot split {n} groups into {len(positive)} non-empty splits {positive}")
    counts = {name: int(n * f) for name, f in fractions.items()}
    by_remainder = sorted(fractions, key=lambda name: -(n * fractions[name] - counts[name]))
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    # Give an empty positive split one item from the largest split (only happens for tiny n).
    for name in positive:
        if counts[name] == 0:
            counts[max(counts, key=counts.get)] -= 1
            counts[name] = 1
    return counts


def _digest(values: Iterable[Any]) -> str:
    blob = json.dumps(sorted(values, key=str), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _record_groups(groups: Sequence[Any]) -> dict[str, Any]:
    ordered = sorted(groups, key=str)
    out: dict[str, Any] = {"n_groups": len(ordered), "groups_digest": _digest(ordered)}
    if len(ordered) <= MAX_RECORDED_GROUPS:
        out["groups"] = ordered
    return out


def split_by_group(
    dataset: Dataset,
    group_column: str,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    stratify_column: str | None = None,
    all_groups: Iterable[Any] | None = None,
) -> tuple[DatasetDict, dict[str, Any]]:
    """Assign whole groups (a template, a source file, a play) to splits, so no group is in two splits.

    Groups, not rows, are allocated in proportion to `fractions`. With `stratify_column` each stratum
    (e.g. a genre) is allocated separately, so every split sees every stratum; a group must then lie
    in one stratum. `all_groups` allocates a fixed universe of groups (e.g. all 100 GSM templates)
    whether or not each has rows here, so datasets built from the same groups share one assignment.
    Rows keep their dataset order within a split.
    """
    fractions = _check_fractions(fractions)
    group_of = dataset[group_column][:]  # [:] makes a list (datasets >= 4 returns a lazy Column)
    stratum_of = dataset[stratify_column][:] if stratify_column else [None] * len(group_of)
    strata: dict[Any, set] = defaultdict(set)
    for g, s in zip(group_of, stratum_of):
        strata[s].add(g)
    if all_groups is not None:
        if stratify_column:
            raise ValueError("all_groups and stratify_column cannot be combined")
        universe = set(all_groups)
        if not strata[None] <= universe:
            raise ValueError(
                f"groups missing from all_groups: {sorted(strata[None] - universe, key=str)[:5]}"
            )
        strata[None] = universe
    seen: dict[Any, Any] = {}
    for s, gs in strata.items():
        for g in gs:
            if seen.setdefault(g, s) != s:
                raise ValueError(f"group {g!r} spans strata {seen[g]!r} and {s!r} of {stratify_column!r}")

    rng = random.Random(seed)
    split_of_group: dict[Any, str] = {}
    for s in sorted(strata, key=str):
        groups = sorted(strata[s], key=str)  # sorted first: the shuffle alone fixes the order
        rng.shuffle(groups)
        start = 0
        for name, count in allocate(len(groups), fractions).items():
            split_of_group.update((g, name) for g in groups[start : start + count])
            start += count

    rows: dict[str, list[int]] = {name: [] for name in fractions}
    for i, g in enumerate(group_of):
        rows[split_of_group[g]].append(i)
    splits = DatasetDict({name: dataset.select(idx) for name, idx in rows.items()})
    groups_per_split: dict[str, list] = {name: [] for name in fractions}
    for g, name in split_of_group.items():
        groups_per_split[name].append(g)
    record = {
        "method": "split_by_group",
        "group_column": group_column,
        "stratify_column": stratify_column,
        "seed": seed,
        "fractions": fractions,
        "sizes": {name: len(idx) for name, idx in rows.items()},
        "splits": {name: _record_groups(gs) for name, gs in groups_per_split.items()},
    }
    return splits, record


def split_random(
    dataset: Dataset, fractions: Mapping[str, float] = DEFAULT_FRACTIONS, seed: int = 0
) -> tuple[DatasetDict, dict[str, Any]]:
    """Assign rows to splits at random; use `split_by_group` whenever rows share a source."""
    fractions = _check_fractions(fractions)
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    rows: dict[str, list[int]] = {}
    start = 0
    for name, count in allocate(len(order), fractions).items():
        rows[name] = sorted(order[start : start + count])
        start += count
    splits = DatasetDict({name: dataset.select(idx) for name, idx in rows.items()})
    record = {
        "method": "split_random",
        "seed": seed,
        "fractions": fractions,
        "sizes": {name: len(idx) for name, idx in rows.items()},
        "splits": {name: {"rows_digest": _digest(idx)} for name, idx in rows.items()},
    }
    return splits, record


def load_split(
    build: Callable[..., Dataset],
    group_column: str,
    *,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    stratify_column: str | None = None,
    all_groups: Iterable[Any] | None = None,
    **build_kwargs: Any,
) -> tuple[DatasetDict, dict[str, Any]]:
    """`build(**build_kwargs)` split by `group_column`; the record also names the builder and its kwargs."""
    dataset = build(**build_kwargs)
    splits, record = split_by_group(dataset, group_column, fractions, seed, stratify_column, all_groups)
    return splits, {"builder": f"{build.__module__}.{build.__name__}", "build_kwargs": build_kwargs, **record}


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def _texts(data: Dataset | DatasetDict | Sequence[str], column: str) -> list[str]:
    if isinstance(data, DatasetDict):
        return [t for split in data.values() for t in split[column][:]]
    if isinstance(data, Dataset):
        return data[column][:]
    return list(data)


def assert_disjoint_text(
    a: Dataset | DatasetDict | Sequence[str],
    b: Dataset | DatasetDict | Sequence[str],
    column: str = "input",
    b_column: str | None = None,
) -> None:
    """Raise AssertionError if any text (case and whitespace folded) is in both `a` and `b`: a leak."""
    seen = {_normalise(t) for t in _texts(a, column)}
    shared = sorted({t for t in map(_normalise, _texts(b, b_column or column)) if t in seen})
    if shared:
        examples = "; ".join(repr(t[:80]) for t in shared[:3])
        raise AssertionError(f"{len(shared)} texts appear in both datasets (leak), e.g. {examples}")
