"""Name lookup for the dict-literal registries (`METHODS = {...}`) used across the repo."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import TypeVar

from common.cli import UnknownNameError

T = TypeVar("T")


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """A ' Did you mean ...?' suffix for an error message, or '' if nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)
    return f" Did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""


def lookup(registry: Mapping[str, T], name: str, kind: str = "entry") -> T:
    """`registry[name]`, or a KeyError naming the close matches and every valid choice."""
    try:
        return registry[name]
    except KeyError:
        hint = close_matches(name, registry)
        raise UnknownNameError(f"unknown {kind} {name!r}.{hint} Choices: {sorted(registry)}") from None
