"""Uncertainty of the figures a report shows.

`wilson_interval(successes, n)`: the 95% Wilson score interval of a proportion — an accuracy
over n independent eval rows. It keeps its coverage near 95% for small n and for rates near 0
or 1, where the normal approximation's interval (p ± 1.96·√(p(1−p)/n)) undercovers and can
leave [0, 1] (`tests/test_stats.py` simulates it).

    >>> wilson_interval(67, 200)
    (0.2732..., 0.4029...)
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for `successes` of `n`; (nan, nan) for n = 0."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)
