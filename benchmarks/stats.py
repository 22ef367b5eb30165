"""The statistics every benchmark table uses, computed in one place: mean, sample standard deviation and count of
a metric over runs, and the seed-by-seed comparison of two methods."""

from __future__ import annotations

import statistics
from typing import NamedTuple, Optional


class Summary(NamedTuple):
    mean: float
    std: float  # sample standard deviation; 0.0 for a single run
    n: int


def summary(values) -> Optional[Summary]:
    """``Summary`` of the values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return Summary(statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


def mean_of(rows, key) -> Optional[float]:
    """Mean of ``key`` over the rows that have it; None when none do."""
    s = summary(r.get(key) for r in rows)
    return None if s is None else s.mean


def better(a: float, b: float, direction: str) -> bool:
    """Whether ``a`` beats ``b`` for a metric whose ``direction`` is "lower" or "higher" (is better)."""
    if direction not in ("lower", "higher"):
        raise ValueError(f"direction must be 'lower' or 'higher', got {direction!r}")
    return a < b if direction == "lower" else a > b


def paired_wins(rows, metric: str, direction: str, sparsity: float, method: str, other: str) -> tuple[int, int]:
    """(seeds on which ``method`` beats ``other``, seeds both ran) at ``sparsity``."""
    by_seed = {
        m: {r["seed"]: r[metric] for r in rows if r["method"] == m and r["sparsity"] == sparsity}
        for m in (method, other)
    }
    common = sorted(set(by_seed[method]) & set(by_seed[other]))
    wins = [s for s in common if better(by_seed[method][s], by_seed[other][s], direction)]
    return len(wins), len(common)
