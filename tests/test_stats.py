"""The report's intervals mean what they say: ≈ 95% of intervals drawn from simulated
binomial evaluations cover the true accuracy."""

from __future__ import annotations

import math
import random

import pytest

from sdftlab.stats import wilson_interval


@pytest.mark.parametrize(("rate", "n"), [(0.335, 200), (0.05, 200), (0.9, 100), (0.5, 30)])
def test_wilson_intervals_cover_the_true_rate_95_percent_of_the_time(rate, n):
    rng = random.Random(0)
    trials = 1000
    covered = 0
    for _ in range(trials):
        hits = sum(rng.random() < rate for _ in range(n))
        low, high = wilson_interval(hits, n)
        covered += low <= rate <= high
    # 95% nominal; a binomial count of 1000 trials has a standard deviation of ~7
    assert 0.925 <= covered / trials <= 0.975, covered


def test_wilson_interval_relations():
    low, high = wilson_interval(67, 200)
    assert low < 67 / 200 < high and high - low == pytest.approx(0.1297, abs=0.0005)
    assert wilson_interval(0, 50)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(50, 50)[1] == pytest.approx(1.0, abs=1e-12)
    narrow, wide = wilson_interval(335, 1000), wilson_interval(67, 200)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]  # more rows, a narrower interval
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
