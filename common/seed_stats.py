"""Mean ± standard deviation over seeds: the one summary every project's tables and the leaderboard print.

The spread is the sample standard deviation (n − 1 in the denominator), s = sqrt(Σ(xᵢ − x̄)² / (n − 1)),
taken as 0 for a single seed; missing values (None) are left out before anything is counted.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def seed_summary(values: Iterable[float | None]) -> tuple[float, float, int] | None:
    """(mean, sample std, n) over the values that are not None; std 0 when n = 1; None when n = 0."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return None
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0, len(kept)


def format_pm(
    values: Iterable[float | None], scale: float = 1.0, digits: int = 1, show_n: bool = False
) -> str:
    """'m ± s' of `scale`·values to `digits` decimals ('m' alone for one seed, '—' for none), with ' (n=k)'
    appended when `show_n`."""
    stat = seed_summary(values)
    if stat is None:
        return "—"
    mean, std, n = stat
    text = f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if n > 1 else "")
    return f"{text} (n={n})" if show_n else text
