"""Exact, mergeable linear CKA from additive sufficient statistics.

Centered Kernel Alignment with linear kernels (Kornblith, Norouzi, Lee & Hinton 2019,
"Similarity of Neural Network Representations Revisited") compares two activation matrices
X (n×dx) and Y (n×dy) taken on the same n inputs:

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)),   K = XXᵀ, L = YYᵀ.

The biased form uses HSIC = tr(HKH · HLH) (H the centering matrix), which for linear kernels
equals ‖X̄ᵀȲ‖²_F with X̄, Ȳ the column-centered activations. The debiased form uses the
unbiased U-statistic HSIC of Song et al. 2012 (Nguyen, Raghu & Kornblith 2021 use it for
CKA), with K̃, L̃ the kernels with zero diagonal:

    HSIC_u = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3)).

Activations arrive in shards (from many Ray actors), so both forms are computed here from
*additive* statistics, in float64, with memory O(d²) independent of n. `CKAStats` keeps, for
rows uᵢ = xᵢ − a and vᵢ = yᵢ − b (a, b a reference shift carried in the statistics; see
below) and qᵢ = ‖uᵢ‖², rᵢ = ‖vᵢ‖²:

    n, Σu, Σv, UᵀU, VᵀV, UᵀV, Σq², Σr², Σqr, Σuq, Σur, Σvq, Σvr.

Every debiased term is a polynomial in these (derivation at `_hsic_debiased`), e.g.
tr(K̃L̃) = ‖UᵀV‖²_F − Σqᵢrᵢ and 1ᵀK̃1 = ‖Σu‖² − Σqᵢ. All these quantities are translation
invariant (centering in the biased form, U-centering in the debiased one), so any shift
gives the same CKA; the shift only matters for floating point. Raw sums of data with a large
mean cancel catastrophically, so the statistics are always kept centered at their own
running mean: each shard is accumulated about the new combined mean, and the statistics
already held (or merged in) are moved to that mean with the exact shift algebra of
`CKAStats._shift_inplace` (Chan et al.'s pairwise-update idea carried to the 3rd- and
4th-order terms). Merging is therefore exact in any order up to float64 rounding.

`standardize=True` scales every dimension to zero mean and unit variance over the whole set
before CKA (the paper's per-sample form). For the biased form this is exact from the
statistics (covariances rescaled by 1/σ). For the debiased form it is not: with a diagonal
rescaling S the term Σᵢ‖Suᵢ‖²‖Tvᵢ‖² needs the full fourth-moment matrix (U∘U)ᵀ(V∘V) and its
third-order companions (seven more d×d matrices, ~3x the compute of every update). Rather
than pay that on every run, debiased + standardized uses two passes: accumulate a first
`CKAStats`, fit a `Standardizer` from it, and accumulate a second `CKAStats` over the same
rows with ``CKAStats.empty(dx, dy, standardizer=st)``; `cka` then checks that the second pass
really saw standardized data. Asking for it from one-pass statistics raises `DataError`;
nothing is silently approximated. Dimensions with zero variance (std ≤ 1e-10·|mean|, the
limit of float64 sums) cannot be standardized and are dropped.

`sequence_cka` is the token-trajectory form (one sequence's L tokens are the samples, an L×L
kernel); `MeanStat` averages it over sequences mergeably. `linear_cka_torch` is the biased
form in torch, differentiable, for training losses.

Example (Y an affine map of X, so CKA is 1):

    >>> x_ND = np.random.default_rng(0).normal(3.0, 1.0, size=(100, 8))
    >>> round(cka(CKAStats.empty(8, 8).update(x_ND, 2 * x_ND + 1), debiased=True), 9)
    1.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from sdftlab.errors import DataError

F64 = NDArray[np.float64]
ArrayLike = np.ndarray | torch.Tensor

_FORMAT = "sdftlab.cka.CKAStats/1"
# A dimension is constant (zero variance) when std ≤ _CONST_RTOL·|mean|: float64 sums cannot
# resolve a relative spread below this, and a column of one repeated value lands here.
_CONST_RTOL = 1e-10
# The second pass of the two-pass route must give mean 0 / variance 1 to this tolerance.
_STANDARDIZED_TOL = 1e-6


def _as_f64(acts: ArrayLike, name: str) -> F64:
    """A 2-D float64 numpy copy (or view) of torch or numpy activations of any real dtype."""
    if isinstance(acts, torch.Tensor):
        if acts.is_complex():
            raise DataError(f"{name} is a complex tensor; CKA needs real activations")
        out = acts.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        arr = np.asarray(acts)
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise DataError(f"{name} has dtype {arr.dtype}; CKA needs real-valued activations")
        out = arr.astype(np.float64, copy=False)
    if out.ndim != 2:
        raise DataError(
            f"{name} has shape {tuple(out.shape)}; expected a 2-D (rows, features) array — "
            "flatten batch and token axes into rows first"
        )
    return out


def _check_pair(x_ND: F64, y_NE: F64) -> None:
    """Same row count, at least one row, every value finite."""
    if x_ND.shape[0] != y_NE.shape[0]:
        raise DataError(
            f"x has {x_ND.shape[0]} rows but y has {y_NE.shape[0]}; CKA pairs row i of x with "
            "row i of y, so both must come from the same inputs"
        )
    if x_ND.shape[0] == 0:
        raise DataError("empty shard: x and y have 0 rows; skip empty shards, do not add them")
    bad_x_N = ~np.isfinite(x_ND).all(axis=1)
    bad_y_N = ~np.isfinite(y_NE).all(axis=1)
    n_bad = int((bad_x_N | bad_y_N).sum())
    if n_bad:
        raise DataError(
            f"activations contain NaN or inf in {n_bad} of {x_ND.shape[0]} rows "
            f"(x: {int(bad_x_N.sum())} rows, y: {int(bad_y_N.sum())} rows); drop or fix those "
            "rows (e.g. an overflowing fp16 layer) before accumulating"
        )


_ROW_BLOCK = 512  # rows per block in the d×d helpers below: temporaries stay ≤ 512·d


def _sq(m: F64) -> float:
    """‖m‖²_F, by row blocks (pairwise summation inside each, no d×d temporary)."""
    return math.fsum(
        float(np.sum(np.square(m[i : i + _ROW_BLOCK]))) for i in range(0, m.shape[0], _ROW_BLOCK)
    )


def _add_outer(m: F64, a: F64, b: F64) -> None:
    """m += a bᵀ in place, by row blocks (no d×d temporary)."""
    for i in range(0, m.shape[0], _ROW_BLOCK):
        m[i : i + _ROW_BLOCK] += np.outer(a[i : i + _ROW_BLOCK], b)


def _constant_mask(mean_D: F64, var_D: F64) -> NDArray[np.bool_]:
    """True where a dimension has zero variance: std ≤ _CONST_RTOL·|mean| (or var ≤ 0)."""
    return var_D <= np.square(_CONST_RTOL * np.abs(mean_D))


@dataclass(frozen=True)
class Standardizer:
    """Per-dimension mean and std of one set, from a first pass, applied in a second pass.

    Dimensions with zero variance are dropped (`keep_x_D`/`keep_y_E` False): they carry no
    information and cannot be scaled to unit variance. Full-width arrays; `std` is 1 where
    a dimension is dropped.
    """

    n: int
    mean_x_D: F64
    std_x_D: F64
    keep_x_D: NDArray[np.bool_]
    mean_y_E: F64
    std_y_E: F64
    keep_y_E: NDArray[np.bool_]

    @classmethod
    def fit(cls, stats: CKAStats) -> Standardizer:
        """Moments of the rows in `stats` (a first pass over the set)."""
        if stats.standardizer is not None:
            raise DataError(
                "these statistics are already standardized (a second pass); fit "
                "the Standardizer on the first-pass statistics"
            )
        if stats.n < 2:
            raise DataError(f"a Standardizer needs at least 2 rows, got n={stats.n}")
        c = stats.centered()  # variances from sums about the exact mean
        mean_x_D, var_x_D = c.mean_x, c.var_x
        mean_y_E, var_y_E = c.mean_y, c.var_y
        keep_x_D = ~_constant_mask(mean_x_D, var_x_D)
        keep_y_E = ~_constant_mask(mean_y_E, var_y_E)
        for side, keep in (("x", keep_x_D), ("y", keep_y_E)):
            if not keep.any():
                raise DataError(
                    f"{side} has zero variance in every dimension (constant "
                    "activations); CKA is undefined"
                )
        return cls(
            n=stats.n,
            mean_x_D=mean_x_D,
            std_x_D=np.where(keep_x_D, np.sqrt(np.maximum(var_x_D, 0.0)), 1.0),
            keep_x_D=keep_x_D,
            mean_y_E=mean_y_E,
            std_y_E=np.where(keep_y_E, np.sqrt(np.maximum(var_y_E, 0.0)), 1.0),
            keep_y_E=keep_y_E,
        )

    @property
    def dx(self) -> int:
        return int(self.mean_x_D.shape[0])

    @property
    def dy(self) -> int:
        return int(self.mean_y_E.shape[0])

    def transform(self, x_ND: F64, y_NE: F64) -> tuple[F64, F64]:
        """(x − μ)/σ on the kept dimensions of each side."""
        kx, ky = self.keep_x_D, self.keep_y_E
        x_NK = (x_ND[:, kx] - self.mean_x_D[kx]) / self.std_x_D[kx]
        y_NK = (y_NE[:, ky] - self.mean_y_E[ky]) / self.std_y_E[ky]
        return x_NK, y_NK

    def same_as(self, other: Standardizer) -> bool:
        return self.n == other.n and all(
            np.array_equal(getattr(self, f), getattr(other, f))
            for f in ("mean_x_D", "std_x_D", "keep_x_D", "mean_y_E", "std_y_E", "keep_y_E")
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "mean_x": self.mean_x_D.copy(),
            "std_x": self.std_x_D.copy(),
            "keep_x": self.keep_x_D.copy(),
            "mean_y": self.mean_y_E.copy(),
            "std_y": self.std_y_E.copy(),
            "keep_y": self.keep_y_E.copy(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Standardizer:
        try:
            return cls(
                n=int(d["n"]),
                mean_x_D=np.asarray(d["mean_x"], np.float64),
                std_x_D=np.asarray(d["std_x"], np.float64),
                keep_x_D=np.asarray(d["keep_x"], bool),
                mean_y_E=np.asarray(d["mean_y"], np.float64),
                std_y_E=np.asarray(d["std_y"], np.float64),
                keep_y_E=np.asarray(d["keep_y"], bool),
            )
        except KeyError as e:
            raise DataError(f"Standardizer dict lacks the field {e.args[0]!r}") from None


# The statistics by kind: matrices, vectors (over x dims D or y dims E), scalars.
_MATS = ("xtx_DD", "yty_EE", "xty_DE")
_VECS = ("shift_x_D", "shift_y_E", "sum_x_D", "sum_y_E", "x_qx_D", "x_qy_D", "y_qx_E", "y_qy_E")
_SCALARS = ("sum_qx_qx", "sum_qy_qy", "sum_qx_qy")


class CKAStats:
    """Additive float64 sufficient statistics of one (X, Y) activation pair.

    With uᵢ = xᵢ − shift_x, vᵢ = yᵢ − shift_y, qᵢ = ‖uᵢ‖², rᵢ = ‖vᵢ‖² (shift = the running
    mean, so Σu ≈ 0):

    - ``n``; ``sum_x_D`` = Σu, ``sum_y_E`` = Σv
    - ``xtx_DD`` = UᵀU, ``yty_EE`` = VᵀV, ``xty_DE`` = UᵀV
    - ``sum_qx_qx`` = Σq², ``sum_qy_qy`` = Σr², ``sum_qx_qy`` = Σqr
    - ``x_qx_D`` = Σuq, ``x_qy_D`` = Σur, ``y_qx_E`` = Σvq, ``y_qy_E`` = Σvr

    `update` adds a shard in place (and returns self); `merge` / ``+`` are pure. With a
    `Standardizer` (second pass of the two-pass route) rows are standardized, and dropped
    dimensions removed, before they are added; D, E are then the kept widths.
    """

    n: int
    shift_x_D: F64
    shift_y_E: F64
    sum_x_D: F64
    sum_y_E: F64
    xtx_DD: F64
    yty_EE: F64
    xty_DE: F64
    sum_qx_qx: float
    sum_qy_qy: float
    sum_qx_qy: float
    x_qx_D: F64
    x_qy_D: F64
    y_qx_E: F64
    y_qy_E: F64

    def __init__(self, dx: int, dy: int, standardizer: Standardizer | None = None) -> None:
        if dx < 1 or dy < 1:
            raise DataError(f"CKA needs at least one feature per side, got dx={dx}, dy={dy}")
        if standardizer is not None and (standardizer.dx, standardizer.dy) != (dx, dy):
            raise DataError(
                f"the Standardizer was fitted on widths (dx={standardizer.dx}, "
                f"dy={standardizer.dy}), not (dx={dx}, dy={dy})"
            )
        self.dx, self.dy = int(dx), int(dy)
        self.standardizer = standardizer
        d = int(standardizer.keep_x_D.sum()) if standardizer is not None else self.dx
        e = int(standardizer.keep_y_E.sum()) if standardizer is not None else self.dy
        self.n = 0
        for name in _VECS:
            setattr(self, name, np.zeros(d if name[-1] == "D" else e))
        self.xtx_DD = np.zeros((d, d))
        self.yty_EE = np.zeros((e, e))
        self.xty_DE = np.zeros((d, e))
        self.sum_qx_qx = self.sum_qy_qy = self.sum_qx_qy = 0.0

    @classmethod
    def empty(cls, dx: int, dy: int, *, standardizer: Standardizer | None = None) -> CKAStats:
        """No rows yet, for activations of widths dx and dy (they may differ)."""
        return cls(dx, dy, standardizer)

    @classmethod
    def from_arrays(cls, x_ND: ArrayLike, y_NE: ArrayLike) -> CKAStats:
        """Statistics of one shard."""
        return cls.empty(int(x_ND.shape[-1]), int(y_NE.shape[-1])).update(x_ND, y_NE)

    # ---- derived moments (of the stored, possibly standardized, dimensions) ----

    @property
    def mean_x(self) -> F64:
        return self.shift_x_D + self.sum_x_D / max(self.n, 1)

    @property
    def mean_y(self) -> F64:
        return self.shift_y_E + self.sum_y_E / max(self.n, 1)

    @property
    def var_x(self) -> F64:
        """Population variance per x dimension: (Σu² − (Σu)²/n)/n."""
        n = max(self.n, 1)
        return (np.diagonal(self.xtx_DD) - np.square(self.sum_x_D) / n) / n

    @property
    def var_y(self) -> F64:
        n = max(self.n, 1)
        return (np.diagonal(self.yty_EE) - np.square(self.sum_y_E) / n) / n

    # ---- accumulation ----

    def copy(self) -> CKAStats:
        out = CKAStats.__new__(CKAStats)
        out.dx, out.dy, out.standardizer, out.n = self.dx, self.dy, self.standardizer, self.n
        for name in (*_MATS, *_VECS):
            setattr(out, name, getattr(self, name).copy())
        for name in _SCALARS:
            setattr(out, name, getattr(self, name))
        return out

    def update(self, x_ND: ArrayLike, y_NE: ArrayLike) -> CKAStats:
        """Add one shard of paired rows (torch or numpy, any real dtype) in place."""
        x = _as_f64(x_ND, "x")
        y = _as_f64(y_NE, "y")
        if (x.shape[1], y.shape[1]) != (self.dx, self.dy):
            raise DataError(
                f"shard has widths (dx={x.shape[1]}, dy={y.shape[1]}) but these statistics "
                f"are for (dx={self.dx}, dy={self.dy})"
            )
        _check_pair(x, y)
        if self.standardizer is not None:
            x, y = self.standardizer.transform(x, y)
        m = x.shape[0]
        # The new combined mean c = (n·mean_self + m·mean_shard)/(n + m), written about the
        # current shift so that it is computed from small numbers.
        if self.n == 0:
            c_x_D, c_y_E = x.mean(axis=0), y.mean(axis=0)
        else:
            tot = self.n + m
            c_x_D = self.shift_x_D + (self.sum_x_D + m * (x.mean(axis=0) - self.shift_x_D)) / tot
            c_y_E = self.shift_y_E + (self.sum_y_E + m * (y.mean(axis=0) - self.shift_y_E)) / tot
        self._shift_inplace(c_x_D, c_y_E)
        u_ND = x - c_x_D
        v_NE = y - c_y_E
        qx_N = np.einsum("ij,ij->i", u_ND, u_ND)  # qᵢ = ‖uᵢ‖²
        qy_N = np.einsum("ij,ij->i", v_NE, v_NE)  # rᵢ = ‖vᵢ‖²
        self.n += m
        self.sum_x_D += u_ND.sum(axis=0)
        self.sum_y_E += v_NE.sum(axis=0)
        self.xtx_DD += u_ND.T @ u_ND
        self.yty_EE += v_NE.T @ v_NE
        self.xty_DE += u_ND.T @ v_NE
        self.sum_qx_qx += float(qx_N @ qx_N)
        self.sum_qy_qy += float(qy_N @ qy_N)
        self.sum_qx_qy += float(qx_N @ qy_N)
        self.x_qx_D += u_ND.T @ qx_N
        self.x_qy_D += u_ND.T @ qy_N
        self.y_qx_E += v_NE.T @ qx_N
        self.y_qy_E += v_NE.T @ qy_N
        return self

    def _shift_inplace(self, new_x_D: F64, new_y_E: F64) -> None:
        """Re-express every statistic about new shifts, exactly (no data needed).

        u' = u + δ, v' = v + ε with δ = old − new shift. Then q' = q + α, r' = r + β with
        αᵢ = 2δᵀuᵢ + ‖δ‖², βᵢ = 2εᵀvᵢ + ‖ε‖², and every new sum expands into old sums
        (s = Σu, t = Σv, Q = Σq = tr UᵀU, R = Σr = tr VᵀV; all right-hand sides are old):

            Σu'           = s + nδ
            U'ᵀU'         = UᵀU + δsᵀ + sδᵀ + nδδᵀ
            U'ᵀV'         = UᵀV + δtᵀ + sεᵀ + nδεᵀ
            Σα            = 2δᵀs + n‖δ‖²
            Σqα           = 2δᵀ(Σuq) + ‖δ‖²Q
            Σα²           = 4δᵀ(UᵀU)δ + 4‖δ‖²δᵀs + n‖δ‖⁴
            Σαβ           = 4δᵀ(UᵀV)ε + 2‖ε‖²δᵀs + 2‖δ‖²εᵀt + n‖δ‖²‖ε‖²
            Σq'²          = Σq² + 2Σqα + Σα²
            Σq'r'         = Σqr + Σqβ + Σαr + Σαβ
            Σuα           = 2(UᵀU)δ + ‖δ‖²s
            Σu'q'         = Σuq + Σuα + δQ + δΣα
            Σu'r'         = Σur + Σuβ + δR + δΣβ
        and the same with the roles of (u, δ) and (v, ε) swapped.
        """
        if self.n == 0:
            self.shift_x_D = np.array(new_x_D, dtype=np.float64)
            self.shift_y_E = np.array(new_y_E, dtype=np.float64)
            return
        dlt_D = self.shift_x_D - new_x_D
        eps_E = self.shift_y_E - new_y_E
        n = float(self.n)
        s_D, t_E = self.sum_x_D, self.sum_y_E
        q_tot = float(np.trace(self.xtx_DD))
        r_tot = float(np.trace(self.yty_EE))
        dd, ee = float(dlt_D @ dlt_D), float(eps_E @ eps_E)
        ds, et = float(dlt_D @ s_D), float(eps_E @ t_E)
        xtx_d_D = self.xtx_DD @ dlt_D
        yty_e_E = self.yty_EE @ eps_E
        xty_e_D = self.xty_DE @ eps_E
        ytx_d_E = self.xty_DE.T @ dlt_D

        sum_a = 2 * ds + n * dd  # Σα
        sum_b = 2 * et + n * ee  # Σβ
        q_a = 2 * float(dlt_D @ self.x_qx_D) + dd * q_tot  # Σqα
        r_b = 2 * float(eps_E @ self.y_qy_E) + ee * r_tot  # Σrβ
        q_b = 2 * float(eps_E @ self.y_qx_E) + ee * q_tot  # Σqβ
        a_r = 2 * float(dlt_D @ self.x_qy_D) + dd * r_tot  # Σαr
        a_a = 4 * float(dlt_D @ xtx_d_D) + 4 * dd * ds + n * dd * dd  # Σα²
        b_b = 4 * float(eps_E @ yty_e_E) + 4 * ee * et + n * ee * ee  # Σβ²
        a_b = 4 * float(dlt_D @ xty_e_D) + 2 * ee * ds + 2 * dd * et + n * dd * ee  # Σαβ

        self.sum_qx_qx += 2 * q_a + a_a
        self.sum_qy_qy += 2 * r_b + b_b
        self.sum_qx_qy += q_b + a_r + a_b
        # Σu'q' = Σuq + (2UᵀUδ + ‖δ‖²s) + δ(Q + Σα), etc.
        self.x_qx_D += 2 * xtx_d_D + dd * s_D + dlt_D * (q_tot + sum_a)
        self.x_qy_D += 2 * xty_e_D + ee * s_D + dlt_D * (r_tot + sum_b)
        self.y_qx_E += 2 * ytx_d_E + dd * t_E + eps_E * (q_tot + sum_a)
        self.y_qy_E += 2 * yty_e_E + ee * t_E + eps_E * (r_tot + sum_b)
        # U'ᵀU' = UᵀU + δwᵀ + wδᵀ with w = s + nδ/2 (two rank-1 updates), U'ᵀV' likewise.
        w_D = s_D + 0.5 * n * dlt_D
        z_E = t_E + 0.5 * n * eps_E
        _add_outer(self.xtx_DD, dlt_D, w_D)
        _add_outer(self.xtx_DD, w_D, dlt_D)
        _add_outer(self.yty_EE, eps_E, z_E)
        _add_outer(self.yty_EE, z_E, eps_E)
        _add_outer(self.xty_DE, dlt_D, t_E + n * eps_E)
        _add_outer(self.xty_DE, s_D, eps_E)
        self.sum_x_D = s_D + n * dlt_D
        self.sum_y_E = t_E + n * eps_E
        self.shift_x_D = np.array(new_x_D, dtype=np.float64)
        self.shift_y_E = np.array(new_y_E, dtype=np.float64)

    def with_shift(self, shift_x_D: ArrayLike, shift_y_E: ArrayLike) -> CKAStats:
        """The same statistics expressed about other reference shifts (pure, exact)."""
        out = self.copy()
        sx = np.asarray(shift_x_D, dtype=np.float64)
        sy = np.asarray(shift_y_E, dtype=np.float64)
        if sx.shape != self.shift_x_D.shape or sy.shape != self.shift_y_E.shape:
            raise DataError(
                f"shift shapes {sx.shape}, {sy.shape} do not match the statistics "
                f"{self.shift_x_D.shape}, {self.shift_y_E.shape}"
            )
        out._shift_inplace(sx, sy)
        return out

    def centered(self) -> CKAStats:
        """The statistics about the exact mean of the rows (Σu = Σv = 0 up to rounding)."""
        return self.with_shift(self.mean_x, self.mean_y)

    def merge(self, other: CKAStats) -> CKAStats:
        """Statistics of the union of both row sets (pure; any order gives the same result)."""
        if not isinstance(other, CKAStats):
            raise DataError(f"cannot merge CKAStats with {type(other).__name__}")
        if (self.dx, self.dy) != (other.dx, other.dy):
            raise DataError(
                f"cannot merge CKAStats of widths (dx={self.dx}, dy={self.dy}) and "
                f"(dx={other.dx}, dy={other.dy}): they come from different layers or models"
            )
        if (self.standardizer is None) != (other.standardizer is None) or (
            self.standardizer is not None
            and other.standardizer is not None
            and not self.standardizer.same_as(other.standardizer)
        ):
            raise DataError(
                "cannot merge CKAStats accumulated with different Standardizers "
                "(or one with and one without)"
            )
        if other.n == 0:
            return self.copy()
        if self.n == 0:
            return other.copy()
        tot = self.n + other.n
        # Combined mean, about self's shift: c = a + (s_self + s_other + n_o(b − a))/(n_s+n_o).
        c_x_D = (
            self.shift_x_D
            + (self.sum_x_D + other.sum_x_D + other.n * (other.shift_x_D - self.shift_x_D)) / tot
        )
        c_y_E = (
            self.shift_y_E
            + (self.sum_y_E + other.sum_y_E + other.n * (other.shift_y_E - self.shift_y_E)) / tot
        )
        out = self.with_shift(c_x_D, c_y_E)
        oth = other.with_shift(c_x_D, c_y_E)
        out.n = tot
        for name in (*_MATS, "sum_x_D", "sum_y_E", "x_qx_D", "x_qy_D", "y_qx_E", "y_qy_E"):
            np.add(getattr(out, name), getattr(oth, name), out=getattr(out, name))
        for name in _SCALARS:
            setattr(out, name, getattr(out, name) + getattr(oth, name))
        return out

    def __add__(self, other: CKAStats) -> CKAStats:
        return self.merge(other)

    def __radd__(self, other: Any) -> CKAStats:
        if isinstance(other, int) and other == 0:  # so that sum(list_of_stats) works
            return self.copy()
        return NotImplemented

    # ---- serialization (plain numpy arrays and Python scalars: crosses Ray as is) ----

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": _FORMAT, "n": self.n, "dx": self.dx, "dy": self.dy}
        for name in (*_MATS, *_VECS):
            out[name] = getattr(self, name).copy()
        for name in _SCALARS:
            out[name] = float(getattr(self, name))
        out["standardizer"] = None if self.standardizer is None else self.standardizer.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CKAStats:
        if d.get("format") != _FORMAT:
            raise DataError(
                f"not a CKAStats dict: format is {d.get('format')!r}, expected {_FORMAT!r}"
            )
        try:
            st = d["standardizer"]
            out = cls(
                int(d["dx"]), int(d["dy"]), None if st is None else Standardizer.from_dict(st)
            )
            out.n = int(d["n"])
            for name in (*_MATS, *_VECS):
                arr = np.array(d[name], dtype=np.float64)
                if arr.shape != getattr(out, name).shape:
                    raise DataError(
                        f"CKAStats field {name!r} has shape {arr.shape}, expected "
                        f"{getattr(out, name).shape}"
                    )
                setattr(out, name, arr)
            for name in _SCALARS:
                setattr(out, name, float(d[name]))
        except KeyError as e:
            raise DataError(f"CKAStats dict lacks the field {e.args[0]!r}") from None
        return out

    def __repr__(self) -> str:
        std = ", standardized" if self.standardizer is not None else ""
        return f"CKAStats(n={self.n}, dx={self.dx}, dy={self.dy}{std})"


def _hsic_debiased(
    n: int,
    ab_AB: F64,
    sa_A: F64,
    sb_B: F64,
    qa_tot: float,
    qb_tot: float,
    qa_qb: float,
    a_qb_A: F64,
    b_qa_B: F64,
) -> float:
    """Unbiased HSIC (Song et al. 2012) of K = AAᵀ, L = BBᵀ from additive statistics.

    K̃, L̃ are K, L with the diagonal set to 0; qᵢ = ‖aᵢ‖² = Kᵢᵢ, rᵢ = ‖bᵢ‖² = Lᵢᵢ.
      tr(K̃L̃) = Σ_{i≠j} KᵢⱼLᵢⱼ = ‖AᵀB‖²_F − Σqᵢrᵢ
      1ᵀK̃1   = Σ_{i≠j} Kᵢⱼ    = ‖Σa‖² − Σqᵢ
      (K̃1)ᵢ  = aᵢᵀ(Σa) − qᵢ, so
      1ᵀK̃L̃1 = Σᵢ(K̃1)ᵢ(L̃1)ᵢ = (Σa)ᵀAᵀB(Σb) − (Σa)ᵀΣᵢaᵢrᵢ − (Σb)ᵀΣᵢbᵢqᵢ + Σqᵢrᵢ
      HSIC_u  = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3))
    """
    tr_kl = _sq(ab_AB) - qa_qb
    one_k_one = float(sa_A @ sa_A) - qa_tot
    one_l_one = float(sb_B @ sb_B) - qb_tot
    one_kl_one = float(sa_A @ (ab_AB @ sb_B)) - float(sa_A @ a_qb_A) - float(sb_B @ b_qa_B) + qa_qb
    return (tr_kl + one_k_one * one_l_one / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * one_kl_one) / (
        n * (n - 3)
    )


def _check_debiased_n(n: int) -> None:
    if n < 4:
        raise DataError(
            f"debiased CKA needs at least 4 samples, got n={n}; use more samples or debiased=False"
        )


def cka(stats: CKAStats, *, debiased: bool = False, standardize: bool = False) -> float:
    """Linear CKA of the rows accumulated in `stats`.

    debiased=False: ‖X̄ᵀȲ‖²_F / (‖X̄ᵀX̄‖_F ‖ȲᵀȲ‖_F) with X̄ᵀȲ = UᵀV − (Σu)(Σv)ᵀ/n etc.
    debiased=True: the unbiased-HSIC (U-statistic) form; needs n ≥ 4.
    standardize=True: every dimension scaled to zero mean and unit variance over the set
    first, zero-variance dimensions dropped. Biased: exact from one pass. Debiased: needs
    second-pass statistics (`CKAStats.empty(dx, dy, standardizer=Standardizer.fit(first))`).
    """
    _check_route(stats, debiased=debiased, standardize=standardize)
    # A private copy about the exact mean (the tiny shift keeps all sums small); it briefly
    # doubles the memory of the statistics.
    c = stats.centered()
    if stats.standardizer is not None:
        _check_standardized(c)
    const_x_D = _constant_mask(c.mean_x, c.var_x)
    const_y_E = _constant_mask(c.mean_y, c.var_y)
    for side, const in (("x", const_x_D), ("y", const_y_E)):
        if const.all():
            raise DataError(
                f"{side} has zero variance in every dimension (constant "
                "activations, or a single row); CKA is undefined"
            )
    if debiased:  # on standardized rows (two-pass route) this already is the standardized CKA
        return _debiased_cka(c)
    return _biased_cka(c, const_x_D, const_y_E, standardize=standardize)


def _check_route(stats: CKAStats, *, debiased: bool, standardize: bool) -> None:
    """The statistics can give the form asked for: rows, n ≥ 4 when debiased, and the
    two-pass route for debiased + standardized."""
    n = stats.n
    if n == 0:
        raise DataError("no rows accumulated: CKA of an empty set is undefined")
    if debiased:
        _check_debiased_n(n)
    st = stats.standardizer
    if st is not None:
        if not standardize:
            raise DataError(
                "these statistics were accumulated on standardized rows (second "
                "pass of the two-pass route); call cka(..., standardize=True)"
            )
        if n != st.n:
            raise DataError(
                f"the second pass saw n={n} rows but the Standardizer was fitted "
                f"on n={st.n}; both passes must cover exactly the same rows"
            )
    elif debiased and standardize:
        raise DataError(
            "debiased CKA with standardize=True cannot be computed exactly from one pass of "
            "statistics. Use two passes: st = Standardizer.fit(first_pass_stats); accumulate "
            "CKAStats.empty(dx, dy, standardizer=st) over the same rows; call cka() on that"
        )


def _check_standardized(c: CKAStats) -> None:
    """Second-pass statistics must be of standardized rows (mean 0, variance 1)."""
    dev = max(
        float(np.abs(c.mean_x).max()),
        float(np.abs(c.mean_y).max()),
        float(np.abs(c.var_x - 1).max()),
        float(np.abs(c.var_y - 1).max()),
    )
    if dev > _STANDARDIZED_TOL:
        raise DataError(
            f"second-pass statistics are not standardized (max deviation from mean 0 / "
            f"variance 1 is {dev:.3g}): the second pass must see exactly the rows the "
            "Standardizer was fitted on"
        )


def _debiased_cka(c: CKAStats) -> float:
    """Debiased CKA from centered statistics: unbiased HSICs (U-statistics)."""
    n = c.n
    qx, qy = float(np.trace(c.xtx_DD)), float(np.trace(c.yty_EE))  # Σ‖uᵢ‖², Σ‖vᵢ‖²
    sx_D, sy_E = c.sum_x_D, c.sum_y_E
    hxy = _hsic_debiased(n, c.xty_DE, sx_D, sy_E, qx, qy, c.sum_qx_qy, c.x_qy_D, c.y_qx_E)
    hxx = _hsic_debiased(n, c.xtx_DD, sx_D, sx_D, qx, qx, c.sum_qx_qx, c.x_qx_D, c.x_qx_D)
    hyy = _hsic_debiased(n, c.yty_EE, sy_E, sy_E, qy, qy, c.sum_qy_qy, c.y_qy_E, c.y_qy_E)
    if hxx <= 0 or hyy <= 0:
        raise DataError(
            f"debiased HSIC(X, X)={hxx:.3g}, HSIC(Y, Y)={hyy:.3g}: a non-positive self-"
            f"similarity makes debiased CKA undefined (too few samples, n={n}); use more "
            "samples or debiased=False"
        )
    return hxy / math.sqrt(hxx * hyy)


def _biased_cka(c: CKAStats, const_x_D: Any, const_y_E: Any, *, standardize: bool) -> float:
    """Biased CKA from centered statistics `c` (a private copy: centered in place)."""
    n = c.n
    # Centered cross-products X̄ᵀȲ = UᵀV − (Σu)(Σv)ᵀ/n (Σu ≈ 0 after centering).
    cxy_DE, cxx_DD, cyy_EE = c.xty_DE, c.xtx_DD, c.yty_EE
    _add_outer(cxy_DE, c.sum_x_D, -c.sum_y_E / n)
    _add_outer(cxx_DD, c.sum_x_D, -c.sum_x_D / n)
    _add_outer(cyy_EE, c.sum_y_E, -c.sum_y_E / n)
    if standardize:
        # Standardized columns: C'ᵢⱼ = Cᵢⱼ/(σᵢσⱼ) on the non-constant dimensions (the 1/n in
        # σ² = Cᵢᵢ/n is a global factor and cancels in CKA).
        kx, ky = ~const_x_D, ~const_y_E
        sx_D = np.sqrt(np.diagonal(cxx_DD)[kx])
        sy_E = np.sqrt(np.diagonal(cyy_EE)[ky])
        cxy_DE = cxy_DE[np.ix_(kx, ky)] / np.outer(sx_D, sy_E)
        cxx_DD = cxx_DD[np.ix_(kx, kx)] / np.outer(sx_D, sx_D)
        cyy_EE = cyy_EE[np.ix_(ky, ky)] / np.outer(sy_E, sy_E)
    # CKA = ‖X̄ᵀȲ‖²_F / (‖X̄ᵀX̄‖_F ‖ȲᵀȲ‖_F)
    return _sq(cxy_DE) / math.sqrt(_sq(cxx_DD) * _sq(cyy_EE))


def _hsic_debiased_gram(k_NN: F64, l_NN: F64) -> float:
    """Unbiased HSIC from the Gram matrices themselves (O(n²) beyond forming them)."""
    n = k_NN.shape[0]
    kt_NN = k_NN.copy()
    lt_NN = l_NN.copy()
    np.fill_diagonal(kt_NN, 0.0)  # K̃
    np.fill_diagonal(lt_NN, 0.0)  # L̃
    tr_kl = float(np.sum(kt_NN * lt_NN))  # tr(K̃L̃) = Σᵢⱼ K̃ᵢⱼL̃ᵢⱼ (both symmetric)
    k1_N = kt_NN.sum(axis=1)
    l1_N = lt_NN.sum(axis=1)
    one_kl_one = float(k1_N @ l1_N)  # 1ᵀK̃L̃1 = (K̃1)ᵀ(L̃1)
    return (
        tr_kl
        + float(k1_N.sum()) * float(l1_N.sum()) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * one_kl_one
    ) / (n * (n - 3))


def sequence_cka(x_LD: ArrayLike, y_LE: ArrayLike, *, debiased: bool = False) -> float:
    """CKA over the L tokens of one sequence, in the L×L kernel (Gram) form.

    The token trajectory of one input is the sample set: K = X̄X̄ᵀ, L = ȲȲᵀ (L×L). The
    features are centered first, which changes neither form (HKH = K for centered X;
    the U-statistic is translation invariant) but keeps the kernels' entries small.
    Average over sequences with `MeanStat`.
    """
    x = _as_f64(x_LD, "x")
    y = _as_f64(y_LE, "y")
    _check_pair(x, y)
    n = x.shape[0]
    if debiased:
        _check_debiased_n(n)
    mean_x_D, mean_y_E = x.mean(axis=0), y.mean(axis=0)
    xc_LD = x - mean_x_D
    yc_LE = y - mean_y_E
    for side, m, a in (("x", mean_x_D, xc_LD), ("y", mean_y_E, yc_LE)):
        if _constant_mask(m, np.mean(np.square(a), axis=0)).all():
            raise DataError(
                f"{side} is the same vector at every token (zero variance); "
                "sequence CKA is undefined"
            )
    k_LL = xc_LD @ xc_LD.T
    l_LL = yc_LE @ yc_LE.T
    if debiased:
        hxy = _hsic_debiased_gram(k_LL, l_LL)
        hxx = _hsic_debiased_gram(k_LL, k_LL)
        hyy = _hsic_debiased_gram(l_LL, l_LL)
        if hxx <= 0 or hyy <= 0:
            raise DataError(
                f"debiased HSIC(X, X)={hxx:.3g}, HSIC(Y, Y)={hyy:.3g} is not "
                f"positive at L={n} tokens; use more tokens or debiased=False"
            )
        return hxy / math.sqrt(hxx * hyy)
    # Biased: tr(KL)/sqrt(tr(KK)tr(LL)) with K, L already centered.
    return float(np.sum(k_LL * l_LL)) / math.sqrt(_sq(k_LL) * _sq(l_LL))


@dataclass
class MeanStat:
    """Mergeable running mean of scalars (e.g. per-sequence CKA): sum, sum of squares, count.

    `add` is in place (returns self); `merge` / ``+`` are pure.
    """

    total: float = 0.0
    total_sq: float = 0.0
    count: int = 0

    def add(self, value: float) -> MeanStat:
        v = float(value)
        if not math.isfinite(v):
            raise DataError(f"MeanStat.add got a non-finite value {v!r}")
        self.total += v
        self.total_sq += v * v
        self.count += 1
        return self

    def merge(self, other: MeanStat) -> MeanStat:
        return MeanStat(
            self.total + other.total, self.total_sq + other.total_sq, self.count + other.count
        )

    def __add__(self, other: MeanStat) -> MeanStat:
        return self.merge(other)

    @property
    def mean(self) -> float:
        if self.count == 0:
            raise DataError("MeanStat is empty: no values were added, the mean is undefined")
        return self.total / self.count

    @property
    def std_error(self) -> float:
        """Standard error of the mean (sample std / √count); needs count ≥ 2."""
        if self.count < 2:
            raise DataError(f"a standard error needs at least 2 values, got {self.count}")
        var = max(self.total_sq - self.total * self.total / self.count, 0.0) / (self.count - 1)
        return math.sqrt(var / self.count)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "total_sq": self.total_sq, "count": self.count}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MeanStat:
        return cls(float(d["total"]), float(d["total_sq"]), int(d["count"]))


def linear_cka_torch(x_ND: torch.Tensor, y_NE: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Differentiable biased linear CKA (a 0-d tensor), for use inside a training loss.

    Feature-space form ‖X̄ᵀȲ‖²_F / (‖X̄ᵀX̄‖_F ‖ȲᵀȲ‖_F + eps) with column-centered X̄, Ȳ;
    dx ≠ dy is fine. Computed in the promoted dtype of the inputs; gradients flow to both.
    When there are fewer rows than features the equal sample-space (Gram) form is used,
    ‖X̄ᵀȲ‖²_F = Σᵢⱼ(X̄X̄ᵀ)ᵢⱼ(ȲȲᵀ)ᵢⱼ, which is cheaper then.
    """
    if x_ND.ndim != 2 or y_NE.ndim != 2:
        raise DataError(
            f"linear_cka_torch needs 2-D (rows, features) tensors, got shapes "
            f"{tuple(x_ND.shape)} and {tuple(y_NE.shape)}"
        )
    if x_ND.shape[0] != y_NE.shape[0]:
        raise DataError(
            f"x has {x_ND.shape[0]} rows but y has {y_NE.shape[0]}; CKA pairs "
            "row i of x with row i of y"
        )
    if x_ND.shape[0] < 2:
        raise DataError(f"CKA needs at least 2 rows, got {x_ND.shape[0]}")
    dtype = torch.promote_types(x_ND.dtype, y_NE.dtype)
    xc_ND = x_ND.to(dtype) - x_ND.to(dtype).mean(dim=0, keepdim=True)
    yc_NE = y_NE.to(dtype) - y_NE.to(dtype).mean(dim=0, keepdim=True)
    n = x_ND.shape[0]
    if n < min(x_ND.shape[1], y_NE.shape[1]):
        k_NN = xc_ND @ xc_ND.T
        l_NN = yc_NE @ yc_NE.T
        hxy = (k_NN * l_NN).sum()
        nx = torch.linalg.matrix_norm(k_NN)  # ‖X̄X̄ᵀ‖_F = ‖X̄ᵀX̄‖_F
        ny = torch.linalg.matrix_norm(l_NN)
    else:
        hxy = (xc_ND.T @ yc_NE).square().sum()
        nx = torch.linalg.matrix_norm(xc_ND.T @ xc_ND)
        ny = torch.linalg.matrix_norm(yc_NE.T @ yc_NE)
    return hxy / (nx * ny + eps)
