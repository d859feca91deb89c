"""The report's intervals and tests mean what they say: ≈ 95% of intervals drawn from
simulated evaluations cover the truth (binomial rows, rows that share a unit, correlated
pairs), and the paired test equals a hand-computed McNemar case."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from sdftlab.stats import (
    bootstrap_mean,
    correlation,
    mcnemar_exact,
    paired_difference,
    seed_interval,
    wilson_interval,
)

SIMULATIONS = 1000


def _covered_share(hits: int) -> float:
    # 95% nominal; a binomial count of 1000 simulations has a standard deviation of ~7
    return hits / SIMULATIONS


@pytest.mark.parametrize(("rate", "n"), [(0.335, 200), (0.05, 200), (0.9, 100), (0.5, 30)])
def test_wilson_intervals_cover_the_true_rate_95_percent_of_the_time(rate, n):
    rng = random.Random(0)
    covered = 0
    for _ in range(SIMULATIONS):
        hits = sum(rng.random() < rate for _ in range(n))
        low, high = wilson_interval(hits, n)
        covered += low <= rate <= high
    assert 0.925 <= _covered_share(covered) <= 0.975, covered


def test_wilson_interval_relations():
    low, high = wilson_interval(67, 200)
    assert low < 67 / 200 < high and high - low == pytest.approx(0.1297, abs=0.0005)
    assert wilson_interval(0, 50)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(50, 50)[1] == pytest.approx(1.0, abs=1e-12)
    narrow, wide = wilson_interval(335, 1000), wilson_interval(67, 200)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]  # more rows, a narrower interval
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


@pytest.mark.parametrize(("rate", "n"), [(0.335, 200), (0.1, 300)])
def test_bootstrap_intervals_cover_the_true_accuracy_95_percent_of_the_time(rate, n):
    rng = np.random.default_rng(1)
    covered = 0
    for i in range(SIMULATIONS):
        estimate = bootstrap_mean(rng.random(n) < rate, draws=1000, seed=i)
        covered += estimate.low <= rate <= estimate.high
    assert 0.925 <= _covered_share(covered) <= 0.975, covered


def test_the_cluster_bootstrap_covers_where_rows_share_a_unit_and_the_row_bootstrap_does_not():
    """40 facts with 5 questions each; a fact is known (70% right) or not (10%), so its
    questions are right or wrong together. True accuracy 40%. Resampling rows as if they were
    independent understates the spread; resampling facts does not."""
    rng = np.random.default_rng(2)
    units = [f"fact-{i // 5}" for i in range(200)]
    by_unit = by_row = 0
    for i in range(SIMULATIONS):
        known = np.repeat(np.where(rng.random(40) < 0.5, 0.1, 0.7), 5)
        scores = rng.random(200) < known
        clustered = bootstrap_mean(scores, units, draws=1000, seed=i)
        naive = bootstrap_mean(scores, draws=1000, seed=i)
        by_unit += clustered.low <= 0.4 <= clustered.high
        by_row += naive.low <= 0.4 <= naive.high
        assert clustered.n_units == 40 and naive.n_units == 200 and clustered.n_rows == 200
    assert 0.925 <= _covered_share(by_unit) <= 0.975, by_unit
    assert _covered_share(by_row) < 0.88, by_row  # design effect 2.5: about 80%


def test_seeds_widen_the_interval_by_their_own_spread():
    rng = np.random.default_rng(3)
    rows = rng.random(300) < 0.5
    same = bootstrap_mean([rows, rows, rows], draws=2000)
    assert same.n_seeds == 3 and same.mean == pytest.approx(rows.mean())
    one = bootstrap_mean(rows, draws=2000)
    assert same.high - same.low == pytest.approx(one.high - one.low, rel=0.15)
    # seeds that land 15 points apart on the same rows: the interval spans them
    shifted = [rng.random(300) < p for p in (0.35, 0.5, 0.65)]
    spread = bootstrap_mean(shifted, draws=2000)
    assert spread.high - spread.low > 2 * (one.high - one.low)


def test_the_paired_test_equals_mcnemar_by_hand():
    """50 rows: both right on 20, both wrong on 19, only the first state right on 9, only the
    second on 2. McNemar's exact test: p = 2·P(X ≤ 2), X ~ Binomial(11, ½) = 2·67/2048."""
    a = [1] * 20 + [0] * 19 + [1] * 9 + [0] * 2
    b = [1] * 20 + [0] * 19 + [0] * 9 + [1] * 2
    paired = paired_difference(a, b)
    assert paired.test == "mcnemar-exact"
    assert paired.diff == pytest.approx(7 / 50)
    assert paired.p_value == pytest.approx(2 * (1 + 11 + 55) / 2048)
    assert mcnemar_exact(2, 9) == pytest.approx(paired.p_value)
    assert mcnemar_exact(0, 0) == 1.0
    assert paired.low <= 7 / 50 <= paired.high and paired.low > -0.05


def test_pairing_on_the_same_rows_is_tighter_than_two_unpaired_intervals():
    rng = np.random.default_rng(4)
    a = rng.random(400) < 0.5
    b = a.copy()
    flip = rng.choice(400, 30, replace=False)
    b[flip[:20]] = False  # the second state loses 20 rows the first had...
    b[flip[20:]] = True  # ...and gains 10
    paired = paired_difference(a, b)
    ea, eb = bootstrap_mean(a), bootstrap_mean(b)
    assert paired.high - paired.low < 0.5 * ((ea.high - ea.low) + (eb.high - eb.low)) / 2
    # with units or several seeds, the p-value is the bootstrap's
    units = [str(i // 4) for i in range(400)]
    clustered = paired_difference(a, b, units)
    assert clustered.test == "bootstrap" and 0 < clustered.p_value <= 1
    assert paired_difference([a, a], [a, a]).p_value == 1.0


def test_paired_scores_must_be_on_the_same_rows():
    with pytest.raises(ValueError, match="same rows"):
        paired_difference([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="units: 2 given for 3 rows"):
        bootstrap_mean([1, 0, 1], ["a", "b"])


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_correlation_intervals_cover_the_true_correlation(method):
    rng = np.random.default_rng(5)
    rho = 0.5
    truth = rho if method == "pearson" else 6 / math.pi * math.asin(rho / 2)
    covered = 0
    for _ in range(SIMULATIONS):
        x, y = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=30).T
        r = correlation(x, y, method)
        covered += r.low <= truth <= r.high
    assert 0.925 <= _covered_share(covered) <= 0.975, covered


def test_correlation_by_hand():
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    r = correlation(x, y)
    assert r.r == pytest.approx(0.8)  # cov 2.0 / var 2.5
    half = 1.959963984540054 / math.sqrt(5 - 3)
    assert (r.low, r.high) == pytest.approx((math.tanh(math.atanh(0.8) - half),
                                             math.tanh(math.atanh(0.8) + half)))  # fmt: skip
    assert correlation(x, y, "spearman").r == pytest.approx(0.8)  # ranks are the values
    with pytest.raises(ValueError, match="≥ 4 pairs"):
        correlation([1, 2, 3], [1, 2, 3])


def test_seed_interval_by_hand():
    mean, low, high = seed_interval([0.1, 0.2, 0.3])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) · sd / √n
    assert (mean, low, high) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    assert math.isnan(seed_interval([0.4])[1])
