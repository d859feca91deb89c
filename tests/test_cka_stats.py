"""Linear CKA from additive statistics (sdftlab.cka.stats) against a plain Gram-form reference.

Every relation here fails if the feature it guards breaks: the statistics form must match
the n×n kernel computation to 1e-10 (data with nonzero mean, dx ≠ dy), CKA must have the
paper's invariances and lack the one it should lack, shards must merge exactly in any order,
and each user error must raise a DataError that names the problem.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch

from sdftlab.cka import CKAStats, MeanStat, Standardizer, cka, linear_cka_torch, sequence_cka
from sdftlab.cka.stats import _hsic_debiased
from sdftlab.errors import DataError

TOL = 1e-10


# ---------------------------------------------------------------- the Gram-form reference


def gram_hsic(k: np.ndarray, lm: np.ndarray, debiased: bool) -> float:
    """HSIC of two n×n kernels. Biased: tr(HKH · HLH)/(n−1)². Debiased: Song et al.'s
    [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3)), K̃ = K, diagonal 0.
    """
    n = k.shape[0]
    one = np.ones(n)
    if debiased:
        kt, lt = k.copy(), lm.copy()
        np.fill_diagonal(kt, 0.0)
        np.fill_diagonal(lt, 0.0)
        return float(
            np.trace(kt @ lt)
            + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ kt @ lt @ one)
        ) / (n * (n - 3))
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(h @ k @ h @ h @ lm @ h)) / (n - 1) ** 2


def gram_cka(x: np.ndarray, y: np.ndarray, debiased: bool) -> float:
    """CKA straight from K = XXᵀ, L = YYᵀ (float64, no centering of the features)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    k, lm = x @ x.T, y @ y.T
    hxy, hxx, hyy = (gram_hsic(a, b, debiased) for a, b in ((k, lm), (k, k), (lm, lm)))
    return hxy / float(np.sqrt(hxx * hyy))


def standardize_cols(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit (population) variance per column; constant columns dropped."""
    keep = np.ptp(x, axis=0) > 0
    x = x[:, keep]
    return (x - x.mean(axis=0)) / x.std(axis=0)


def make_pair(seed: int, n: int, dx: int, dy: int, mean: float = 3.0) -> tuple[np.ndarray, ...]:
    """Correlated X (mean ≈ `mean`, anisotropic columns) and a noisy linear map Y of it."""
    rng = np.random.default_rng(seed)
    x = mean + rng.normal(size=(n, dx)) @ rng.normal(size=(dx, dx)) / np.sqrt(dx)
    x *= rng.uniform(0.3, 3.0, size=dx)
    y = x @ rng.normal(size=(dx, dy)) / np.sqrt(dx) + 0.7 * rng.normal(size=(n, dy)) - 2.0
    return x, y


def stats_of(x: np.ndarray, y: np.ndarray, shard: int = 37) -> CKAStats:
    """Accumulate in shards (so every test also exercises the merge-by-update path)."""
    st = CKAStats.empty(x.shape[1], y.shape[1])
    for i in range(0, x.shape[0], shard):
        st.update(x[i : i + shard], y[i : i + shard])
    return st


def two_pass(x: np.ndarray, y: np.ndarray, shard: int = 29) -> CKAStats:
    first = stats_of(x, y, shard)
    second = CKAStats.empty(x.shape[1], y.shape[1], standardizer=Standardizer.fit(first))
    for i in reversed(range(0, x.shape[0], shard)):  # a different order on purpose
        second.update(x[i : i + shard], y[i : i + shard])
    return second


SHAPES = [(50, 7, 7), (120, 10, 4), (200, 33, 17), (64, 80, 40)]


# ---------------------------------------------------------------- against the reference


@pytest.mark.parametrize(("n", "dx", "dy"), SHAPES)
@pytest.mark.parametrize("debiased", [False, True])
def test_matches_gram_reference(n: int, dx: int, dy: int, debiased: bool) -> None:
    x, y = make_pair(n + dx, n, dx, dy)
    ref = gram_cka(x, y, debiased)
    got = cka(stats_of(x, y), debiased=debiased)
    assert abs(got - ref) < TOL, (got, ref)
    assert 0.05 < ref < 1.0  # a non-trivial value, not a degenerate 0 or 1


@pytest.mark.parametrize(("n", "dx", "dy"), SHAPES)
@pytest.mark.parametrize("debiased", [False, True])
def test_standardized_matches_gram_reference(n: int, dx: int, dy: int, debiased: bool) -> None:
    x, y = make_pair(7 * n + dy, n, dx, dy)
    ref = gram_cka(standardize_cols(x), standardize_cols(y), debiased)
    st = two_pass(x, y) if debiased else stats_of(x, y)
    got = cka(st, debiased=debiased, standardize=True)
    assert abs(got - ref) < TOL, (got, ref)
    # standardizing matters for this data (anisotropic columns), so the test is not vacuous
    assert abs(ref - gram_cka(x, y, debiased)) > 1e-3


@pytest.mark.parametrize("debiased", [False, True])
def test_standardize_drops_zero_variance_dims(debiased: bool) -> None:
    x, y = make_pair(3, 80, 6, 5)
    x[:, 2] = 0.1  # not exactly summable in binary: a rounding-level variance, still constant
    y[:, 0] = 5.0
    ref = gram_cka(standardize_cols(x), standardize_cols(y), debiased)
    st = two_pass(x, y) if debiased else stats_of(x, y)
    assert abs(cka(st, debiased=debiased, standardize=True) - ref) < TOL
    if debiased:
        assert st.xtx_DD.shape == (5, 5) and st.yty_EE.shape == (4, 4)


def test_debiased_terms_from_uncentered_sums() -> None:
    """The additive form of each unbiased-HSIC term, fed raw (uncentered, Σx ≠ 0) sums.

    `cka` always evaluates it on centered statistics, where the Σx terms vanish; this checks
    the full expansion, (X, Y) and (X, X), against the Gram form of the HSIC itself.
    """
    x, y = make_pair(17, 40, 6, 4, mean=1.5)
    q, r = (x * x).sum(1), (y * y).sum(1)
    got_xy = _hsic_debiased(
        40, x.T @ y, x.sum(0), y.sum(0), q.sum(), r.sum(), q @ r, x.T @ r, y.T @ q
    )
    got_xx = _hsic_debiased(
        40, x.T @ x, x.sum(0), x.sum(0), q.sum(), q.sum(), q @ q, x.T @ q, x.T @ q
    )
    k, lm = x @ x.T, y @ y.T
    for got, ref in ((got_xy, gram_hsic(k, lm, True)), (got_xx, gram_hsic(k, k, True))):
        assert abs(got - ref) <= 1e-9 * abs(ref), (got, ref)


def test_large_mean_is_exact() -> None:
    """Mean 1e4, std 1: raw sums would cancel away ~8 digits; the shifted sums do not."""
    x, y = make_pair(11, 150, 9, 6, mean=0.0)
    ref_b, ref_u = gram_cka(x, y, False), gram_cka(x, y, True)  # reference on centered data
    st = stats_of(x + 1e4, y - 3e4, shard=16)  # CKA is translation invariant
    assert abs(cka(st) - ref_b) < TOL
    assert abs(cka(st, debiased=True) - ref_u) < TOL


# ---------------------------------------------------------------- invariances


def _rotation(seed: int, d: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


@pytest.mark.parametrize("debiased", [False, True])
def test_invariances(debiased: bool) -> None:
    x, y = make_pair(5, 90, 12, 8)
    base = cka(CKAStats.from_arrays(x, y), debiased=debiased)

    def same(a: np.ndarray, b: np.ndarray) -> None:
        assert abs(cka(CKAStats.from_arrays(a, b), debiased=debiased) - base) < TOL

    same(x @ _rotation(1, 12), y)
    same(x, y @ _rotation(2, 8))
    same(7.5 * x, y)
    same(x, 0.01 * y)
    same(x + 40.0, y)
    same(x, y - np.arange(8.0) * 10)
    assert abs(cka(CKAStats.from_arrays(x, x), debiased=debiased) - 1.0) < TOL
    # An anisotropic scaling is NOT an invariance: the comparison above can fail.
    scale = np.linspace(0.1, 10.0, 12)
    assert abs(cka(CKAStats.from_arrays(x * scale, y), debiased=debiased) - base) > 1e-3


def test_standardized_is_invariant_to_per_dimension_scaling() -> None:
    x, y = make_pair(6, 70, 10, 7)
    scale = np.linspace(0.1, 10.0, 10)
    base = cka(stats_of(x, y), standardize=True)
    assert abs(cka(stats_of(x * scale, y), standardize=True) - base) < TOL
    assert abs(cka(stats_of(x * scale, y)) - cka(stats_of(x, y))) > 1e-3


# ---------------------------------------------------------------- merging and serialization


_FIELDS = (
    "sum_x_D",
    "sum_y_E",
    "xtx_DD",
    "yty_EE",
    "xty_DE",
    "sum_qx_qx",
    "sum_qy_qy",
    "sum_qx_qy",
    "x_qx_D",
    "x_qy_D",
    "y_qx_E",
    "y_qy_E",
)


def _direct(u: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    """The statistics straight from shifted rows u, v."""
    q, r = (u * u).sum(1), (v * v).sum(1)
    return {
        "sum_x_D": u.sum(0),
        "sum_y_E": v.sum(0),
        "xtx_DD": u.T @ u,
        "yty_EE": v.T @ v,
        "xty_DE": u.T @ v,
        "sum_qx_qx": q @ q,
        "sum_qy_qy": r @ r,
        "sum_qx_qy": q @ r,
        "x_qx_D": u.T @ q,
        "x_qy_D": u.T @ r,
        "y_qx_E": v.T @ q,
        "y_qy_E": v.T @ r,
    }


def _assert_raw_stats(
    st: CKAStats, x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray
) -> None:
    """st, re-expressed about shifts (a, b), equals the direct sums to ~1e-9 relative.

    The scale of each field is the same sum over |u|, |v| (no cancellation), so the bound
    is relative to the size of the terms that were added.
    """
    moved = st.with_shift(a, b)
    assert moved.n == x.shape[0]
    ref = _direct(x - a, y - b)
    mag = _direct(np.abs(x - a), np.abs(y - b))
    for name in _FIELDS:
        err = np.max(np.abs(np.asarray(getattr(moved, name)) - ref[name]))
        assert err <= 1e-9 * np.max(np.abs(mag[name])), name


def _shards(seed: int) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    x, y = make_pair(seed, 300, 11, 6)
    x[150:] += 25.0  # shards from regions with very different means
    cuts = [0, 1, 5, 40, 41, 120, 200, 263, 300]  # includes a 1-row shard
    parts = [(x[i:j], y[i:j]) for i, j in pairwise(cuts)]
    return x, y, parts


def test_merge_any_order_equals_whole() -> None:
    x, y, parts = _shards(8)
    whole = CKAStats.from_arrays(x, y)
    ref_b, ref_u = gram_cka(x, y, False), gram_cka(x, y, True)
    rng = np.random.default_rng(0)
    singles = [CKAStats.from_arrays(a, b) for a, b in parts]
    candidates = [whole]
    for _ in range(4):
        order = rng.permutation(len(parts))
        seq = CKAStats.empty(11, 6)
        for i in order:  # sequential update
            seq.update(*parts[i])
        merged = CKAStats.empty(11, 6)
        for i in order:  # sequential merge
            merged = merged.merge(singles[i])
        level = [singles[i] for i in order]
        while len(level) > 1:  # balanced tree merge
            level = [
                level[i] + level[i + 1] if i + 1 < len(level) else level[i]
                for i in range(0, len(level), 2)
            ]
        candidates += [seq, merged, level[0], sum(singles[i] for i in order)]
    for st in candidates:
        assert abs(cka(st) - ref_b) < TOL
        assert abs(cka(st, debiased=True) - ref_u) < TOL
        _assert_raw_stats(st, x, y, x.mean(0), y.mean(0))
        assert np.allclose(st.mean_x, x.mean(0), rtol=0, atol=1e-12)


def test_shift_algebra_far_from_mean() -> None:
    x, y, parts = _shards(9)
    st = sum(CKAStats.from_arrays(a, b) for a, b in parts)
    assert isinstance(st, CKAStats)
    _assert_raw_stats(st, x, y, x.mean(0) + 3.0, y.mean(0) - np.linspace(0, 5, 6))
    _assert_raw_stats(st, x, y, np.zeros(11), np.zeros(6))
    # From a non-centered state (Σu, Σv far from 0) every Σu/Σv term of the algebra counts.
    far = st.with_shift(np.full(11, -4.0), np.linspace(0, 9, 6))
    _assert_raw_stats(far, x, y, x.mean(0) + 3.0, y.mean(0) - np.linspace(0, 5, 6))
    halves = [CKAStats.from_arrays(x[:100], y[:100]), CKAStats.from_arrays(x[100:], y[100:])]
    far_a = halves[0].with_shift(np.full(11, 9.0), np.full(6, -1.0))
    far_b = halves[1].with_shift(np.full(11, -2.0), np.full(6, 30.0))
    _assert_raw_stats(far_b + far_a, x, y, x.mean(0), y.mean(0))
    assert abs(cka(far_a + far_b, debiased=True) - gram_cka(x, y, True)) < TOL


def test_merge_is_pure_and_empty_is_identity() -> None:
    x, y = make_pair(4, 40, 5, 3)
    a, b = CKAStats.from_arrays(x[:20], y[:20]), CKAStats.from_arrays(x[20:], y[20:])
    before = a.to_dict()
    c = a.merge(b)
    assert c.n == 40 and a.n == 20 and b.n == 20
    assert all(np.array_equal(before[k], v) for k, v in a.to_dict().items() if k != "standardizer")
    e = CKAStats.empty(5, 3)
    assert cka(e + c) == cka(c) == cka(c + e)


@pytest.mark.parametrize("standardized", [False, True])
def test_to_dict_round_trip_is_exact(standardized: bool) -> None:
    x, y = make_pair(12, 60, 6, 9)
    st = two_pass(x, y) if standardized else stats_of(x, y)
    d = st.to_dict()
    for v in d.values():  # plain numpy arrays and Python scalars (crosses Ray as is)
        assert v is None or isinstance(v, np.ndarray | int | float | str | dict)
    back = CKAStats.from_dict(d)
    for k, v in back.to_dict().items():
        if k == "standardizer":
            assert (v is None) == (not standardized)
        else:
            assert np.array_equal(v, d[k]), k
    assert cka(back, debiased=True, standardize=standardized) == cka(
        st, debiased=True, standardize=standardized
    )
    if standardized:
        assert back.standardizer is not None and st.standardizer is not None
        assert back.standardizer.same_as(st.standardizer)


def test_accepts_torch_and_low_precision() -> None:
    x, y = make_pair(13, 64, 8, 5)
    st = CKAStats.empty(8, 5).update(torch.from_numpy(x), torch.from_numpy(y).float())
    assert abs(cka(st) - gram_cka(x, y.astype(np.float32), False)) < TOL
    bf = CKAStats.from_arrays(torch.from_numpy(x).bfloat16(), torch.from_numpy(y).half())
    assert abs(cka(bf) - cka(st)) < 0.05  # converted, not rejected; bf16 loses digits


# ---------------------------------------------------------------- sequence CKA, MeanStat, torch


@pytest.mark.parametrize("debiased", [False, True])
def test_sequence_cka_and_mean(debiased: bool) -> None:
    seqs = [make_pair(100 + i, length, 16, 12) for i, length in enumerate([9, 30, 17, 48, 5])]
    refs = [gram_cka(x, y, debiased) for x, y in seqs]
    got = [sequence_cka(x, y, debiased=debiased) for x, y in seqs]
    assert np.max(np.abs(np.subtract(got, refs))) < TOL
    x0, y0 = seqs[1]
    assert abs(got[1] - cka(CKAStats.from_arrays(x0, y0), debiased=debiased)) < TOL
    left, right = MeanStat(), MeanStat()
    for v in got[:2]:
        left.add(v)
    for v in got[2:]:
        right.add(v)
    total = right + left
    assert total.count == 5 and abs(total.mean - np.mean(refs)) < TOL
    assert abs(total.std_error - np.std(refs, ddof=1) / np.sqrt(5)) < 1e-9
    assert MeanStat.from_dict(total.to_dict()) == total


@pytest.mark.parametrize(("n", "dx", "dy"), [(100, 12, 7), (10, 40, 25)])  # feature / Gram path
def test_linear_cka_torch(n: int, dx: int, dy: int) -> None:
    x, y = make_pair(21, n, dx, dy)
    ref = gram_cka(x, y, False)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = torch.from_numpy(y).requires_grad_(True)
    val = linear_cka_torch(xt, yt)
    assert abs(val.item() - ref) < TOL
    val.backward()
    for g in (xt.grad, yt.grad):
        assert g is not None and bool(torch.isfinite(g).all()) and g.abs().max().item() > 1e-8
    low = linear_cka_torch(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    assert low.dtype == torch.float32 and abs(low.item() - ref) < 1e-4


# ---------------------------------------------------------------- errors


def test_debiased_needs_four_samples() -> None:
    x, y = make_pair(1, 3, 4, 4)
    st = CKAStats.from_arrays(x, y)
    cka(st)  # the biased form is fine
    with pytest.raises(DataError, match=r"at least 4 samples, got n=3.*debiased=False"):
        cka(st, debiased=True)
    with pytest.raises(DataError, match=r"at least 4 samples, got n=3"):
        sequence_cka(x, y, debiased=True)


def test_bad_shards_are_rejected() -> None:
    x, y = make_pair(2, 10, 4, 3)
    st = CKAStats.empty(4, 3)
    with pytest.raises(DataError, match="0 rows"):
        st.update(x[:0], y[:0])
    x_bad, y_bad = x.copy(), y.copy()
    x_bad[1, 0], x_bad[4, 2], y_bad[4, 1], y_bad[7, 0] = np.nan, np.inf, -np.inf, np.nan
    with pytest.raises(DataError, match=r"NaN or inf in 3 of 10 rows \(x: 2 rows, y: 2 rows\)"):
        st.update(x_bad, y_bad)
    with pytest.raises(DataError, match="x has 10 rows but y has 9"):
        st.update(x, y[:9])
    with pytest.raises(DataError, match=r"widths \(dx=3, dy=3\).*\(dx=4, dy=3\)"):
        st.update(x[:, :3], y)
    with pytest.raises(DataError, match="2-D"):
        st.update(x[0], y[0])
    assert st.n == 0  # nothing half-added
    with pytest.raises(DataError, match="no rows"):
        cka(st)
    with pytest.raises(DataError, match="x has 10 rows but y has 9"):
        sequence_cka(x, y[:9])
    with pytest.raises(DataError, match="x has 10 rows but y has 9"):
        linear_cka_torch(torch.from_numpy(x), torch.from_numpy(y[:9]))


def test_merge_of_different_widths_is_rejected() -> None:
    x, y = make_pair(3, 10, 4, 3)
    a = CKAStats.from_arrays(x, y)
    b = CKAStats.from_arrays(x[:, :2], y)
    with pytest.raises(DataError, match=r"cannot merge CKAStats of widths \(dx=4, dy=3\)"):
        a.merge(b)
    with pytest.raises(DataError, match="different Standardizers"):
        a.merge(two_pass(x, y))


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("standardize", [False, True])
def test_constant_x_is_undefined(debiased: bool, standardize: bool) -> None:
    x, y = make_pair(4, 20, 4, 3)
    const = np.full_like(x, 0.3)
    st = CKAStats.from_arrays(const, y)
    if debiased and standardize:
        with pytest.raises(DataError, match="x has zero variance in every dimension"):
            Standardizer.fit(st)
        return
    with pytest.raises(DataError, match="x has zero variance in every dimension"):
        cka(st, debiased=debiased, standardize=standardize)
    with pytest.raises(DataError, match="zero variance"):
        sequence_cka(const, y, debiased=debiased)


def test_debiased_standardized_needs_two_passes() -> None:
    x, y = make_pair(5, 40, 5, 4)
    first = stats_of(x, y)
    with pytest.raises(DataError, match=r"cannot be computed exactly from one pass.*Standardizer"):
        cka(first, debiased=True, standardize=True)
    st = Standardizer.fit(first)
    wrong = CKAStats.empty(5, 4, standardizer=st).update(x[::-1] * 1.5, y)
    with pytest.raises(DataError, match="not standardized"):
        cka(wrong, debiased=True, standardize=True)
    partial = CKAStats.empty(5, 4, standardizer=st).update(x[:30], y[:30])
    with pytest.raises(DataError, match=r"second pass saw n=30 rows.*fitted on n=40"):
        cka(partial, debiased=True, standardize=True)
    with pytest.raises(DataError, match=r"call cka\(\.\.\., standardize=True\)"):
        cka(two_pass(x, y), debiased=True)


def test_mean_stat_errors() -> None:
    with pytest.raises(DataError, match="MeanStat is empty"):
        _ = MeanStat().mean
    with pytest.raises(DataError, match="non-finite value nan"):
        MeanStat().add(float("nan"))
    with pytest.raises(DataError, match="at least 2 values, got 1"):
        _ = MeanStat().add(0.5).std_error
