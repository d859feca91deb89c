"""Uncertainty of the figures a report shows.

- `wilson_interval(successes, n)`: the 95% Wilson score interval of a proportion over n
  independent eval rows. It keeps its coverage near 95% for small n and for rates near 0 or
  1, where the normal approximation's interval undercovers and can leave [0, 1].
- `bootstrap_mean(scores)`: a mean with its percentile bootstrap interval. `scores` is
  seeds × rows (one row of scores per seed, the same eval rows in each); the bootstrap
  resamples the seeds and, crossed with them, the rows' independent units: rows that share
  a `unit` (the fact or compound a question is about) are drawn together, a cluster
  bootstrap, since they are not independent. One seed and no units: the plain bootstrap.
- `paired_difference(a, b)`: two states scored on the same rows. The difference of their
  means with the bootstrap interval of the per-row differences (paired, so much tighter than
  two unpaired intervals), and a p-value: McNemar's exact test on the discordant rows when
  the scores are 0/1 of one seed with independent rows; otherwise the bootstrap's (twice the
  share of resampled differences on the far side of zero).
- `correlation(x, y)`: Pearson's or Spearman's r with a Fisher-z interval (Spearman's with
  Bonett and Wright's variance) and scipy's p-value.
- `seed_interval(values)`: the mean of one figure per seed (a ΔCKA) with Student's t
  interval over the seeds; (mean, nan, nan) for one seed.

`tests/test_stats.py` simulates each interval's coverage and checks the tests against
hand-computed cases.

    >>> wilson_interval(67, 200)
    (0.2732..., 0.4029...)
    >>> paired_difference([1, 1, 0, 1], [0, 1, 0, 0]).diff
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
BOOTSTRAP_DRAWS = 4000


def wilson_interval(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for `successes` of `n`; (nan, nan) for n = 0."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% interval, and what it was taken over."""

    mean: float
    low: float
    high: float
    n_rows: int
    n_units: int
    n_seeds: int


@dataclass(frozen=True)
class Paired:
    """Mean of a − b over the same rows, its 95% interval and the test's p-value."""

    diff: float
    low: float
    high: float
    p_value: float
    test: str  # "mcnemar-exact" or "bootstrap"
    n_rows: int
    n_units: int
    n_seeds: int


def _scores(scores: Sequence[float] | Sequence[Sequence[float]]) -> np.ndarray:
    """Scores as seeds × rows; one sequence is one seed."""
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"scores must be rows or seeds × rows, got shape {array.shape}")
    return array


def _unit_index(units: Sequence[str] | None, n_rows: int) -> np.ndarray:
    if units is None:
        return np.arange(n_rows)
    if len(units) != n_rows:
        raise ValueError(f"units: {len(units)} given for {n_rows} rows")
    return np.unique(np.asarray(units, dtype=object).astype(str), return_inverse=True)[1]


def _bootstrap_means(
    values: np.ndarray, units: Sequence[str] | None, draws: int, seed: int
) -> tuple[np.ndarray, int]:
    """`draws` resampled means of a seeds × rows array: seeds drawn with replacement and,
    crossed with them, units drawn with replacement (each unit bringing all its rows)."""
    n_seeds, n_rows = values.shape
    unit = _unit_index(units, n_rows)
    n_units = int(unit.max()) + 1
    sums = np.zeros((n_seeds, n_units))
    np.add.at(sums, (slice(None), unit), values)
    counts = np.bincount(unit, minlength=n_units).astype(np.float64)
    rng = np.random.default_rng(seed)
    unit_w = _draw_counts(rng, n_units, draws)
    seed_w = _draw_counts(rng, n_seeds, draws) / n_seeds if n_seeds > 1 else np.ones((draws, 1))
    totals = ((seed_w @ sums) * unit_w).sum(axis=1)
    return totals / (unit_w @ counts), n_units


def _draw_counts(rng: np.random.Generator, n: int, draws: int) -> np.ndarray:
    """draws × n: how often each of n items is drawn in each of `draws` resamples of size n."""
    picks = rng.integers(0, n, size=(draws, n)) + n * np.arange(draws)[:, None]
    return np.bincount(picks.ravel(), minlength=draws * n).reshape(draws, n).astype(np.float64)


def bootstrap_mean(
    scores: Sequence[float] | Sequence[Sequence[float]],
    units: Sequence[str] | None = None,
    *,
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = 0,
) -> Estimate:
    """The mean of `scores` (rows, or seeds × rows) with its 95% percentile interval."""
    values = _scores(scores)
    means, n_units = _bootstrap_means(values, units, draws, seed)
    low, high = np.quantile(means, [0.025, 0.975])
    return Estimate(float(values.mean()), float(low), float(high), values.shape[1], n_units,
                    values.shape[0])  # fmt: skip


def paired_difference(
    a: Sequence[float] | Sequence[Sequence[float]],
    b: Sequence[float] | Sequence[Sequence[float]],
    units: Sequence[str] | None = None,
    *,
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = 0,
) -> Paired:
    """a − b on the same rows (and seeds): the mean difference, its paired bootstrap 95%
    interval and a two-sided p-value."""
    first, second = _scores(a), _scores(b)
    if first.shape != second.shape:
        raise ValueError(f"paired scores must be on the same rows: {first.shape} vs {second.shape}")
    diffs = first - second
    means, n_units = _bootstrap_means(diffs, units, draws, seed)
    low, high = np.quantile(means, [0.025, 0.975])
    binary = np.isin(first, (0.0, 1.0)).all() and np.isin(second, (0.0, 1.0)).all()
    if binary and units is None and first.shape[0] == 1:
        p_value, test = (
            mcnemar_exact(int((diffs > 0).sum()), int((diffs < 0).sum())),
            "mcnemar-exact",
        )
    else:
        far = min((means <= 0).mean(), (means >= 0).mean())
        p_value, test = float(min(1.0, 2 * far)), "bootstrap"
    return Paired(float(diffs.mean()), float(low), float(high), p_value, test,
                  first.shape[1], n_units, first.shape[0])  # fmt: skip


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """McNemar's exact two-sided p-value: of the rows where the two states disagree, `a_only`
    were right for the first state alone and `b_only` for the second alone."""
    from scipy.stats import binomtest

    discordant = a_only + b_only
    return 1.0 if discordant == 0 else float(binomtest(a_only, discordant, 0.5).pvalue)


@dataclass(frozen=True)
class Correlation:
    r: float
    low: float
    high: float
    p_value: float
    n: int
    method: str


def correlation(x: Sequence[float], y: Sequence[float], method: str = "pearson") -> Correlation:
    """Pearson's or Spearman's r between paired values, with a 95% Fisher-z interval."""
    from scipy import stats

    if method not in ("pearson", "spearman"):
        raise ValueError(f"method={method!r}: use 'pearson' or 'spearman'")
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(xs)
    if n != len(ys) or n < 4:
        raise ValueError(f"correlation needs ≥ 4 pairs of equal length, got {n} and {len(ys)}")
    test = stats.pearsonr(xs, ys) if method == "pearson" else stats.spearmanr(xs, ys)
    r = float(test.statistic)
    variance = (1.0 if method == "pearson" else 1 + r * r / 2) / (n - 3)
    z = math.atanh(max(-0.999999, min(0.999999, r)))
    half = Z95 * math.sqrt(variance)
    return Correlation(r, math.tanh(z - half), math.tanh(z + half), float(test.pvalue), n, method)


def seed_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): Student's t 95% interval of the mean over seeds."""
    from scipy.stats import t

    xs = np.asarray(values, dtype=np.float64)
    mean = float(xs.mean())
    if len(xs) < 2:
        return mean, math.nan, math.nan
    half = float(t.ppf(0.975, len(xs) - 1) * xs.std(ddof=1) / math.sqrt(len(xs)))
    return mean, mean - half, mean + half
