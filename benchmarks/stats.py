"""Order statistics for benchmark samples: median, p99, max, with the sample count alongside.

Design notes
- Percentiles use the nearest-rank method on the sorted samples: with n samples, p99 is the
  ceil(0.99 n)-th smallest. For n < 100 that is the maximum, which is the honest answer (we do
  not interpolate a tail we never observed), and `n` travels with every summary so a reader
  can tell a p99 of 20 samples from one of 100 000.
- No numpy: the venv is Debian's Python with system site packages, and this is small arithmetic.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence


def percentile(sorted_samples: Sequence[float], pct: float) -> float:
    """The nearest-rank percentile of already sorted samples (pct in 0..100)."""
    if not sorted_samples:
        return math.nan
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_samples)))
    return sorted_samples[rank - 1]


def summarize(samples: Iterable[float]) -> dict[str, float]:
    """{n, median, p99, max, min, mean} of the samples; NaN fields (and n = 0) when empty."""
    ordered = sorted(samples)
    n = len(ordered)
    if n == 0:
        return {"n": 0, "median": math.nan, "p99": math.nan, "max": math.nan,
                "min": math.nan, "mean": math.nan}
    return {
        "n": n,
        "median": percentile(ordered, 50),
        "p99": percentile(ordered, 99),
        "max": ordered[-1],
        "min": ordered[0],
        "mean": sum(ordered) / n,
    }


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is zero or missing."""
    if not denominator or math.isnan(denominator) or math.isnan(numerator):
        return math.nan
    return numerator / denominator
