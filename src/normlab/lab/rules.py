"""Small statistics shared by the verdict rules: effects over seeds and their spread.

Rules are written before the results are seen and use only recorded numbers."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def mean(values: Sequence[float]) -> float:
    return float(statistics.fmean(values))


def spread(values: Sequence[float]) -> float:
    """Sample standard deviation over seeds (0 for a single seed)."""
    return float(statistics.stdev(values)) if len(values) > 1 else 0.0


def consistent_effect(differences: Sequence[float]) -> bool:
    """An effect holds if its sign is the same in every seed and its mean exceeds the seed
    spread: all differences > 0 and mean > standard deviation."""
    return (
        bool(differences)
        and all(d > 0 for d in differences)
        and (mean(differences) > spread(differences))
    )


def fmt(value: float, digits: int = 3) -> str:
    """A number for the report: fixed for moderate magnitudes, scientific otherwise."""
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.{digits}g}"
    return f"{value:.{digits - 1}e}"
