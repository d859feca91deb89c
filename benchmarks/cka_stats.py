"""Benchmark: linear CKA from additive statistics vs the n×n Gram form (vs ckatorch if present).

Run from the repository root:

    PYTHONPATH=platform .venv/bin/python benchmarks/cka_stats.py --out results.json
    PYTHONPATH=platform .venv/bin/python benchmarks/cka_stats.py --quick   # ~25 s

For d = 128 and d = 4096 (dx = dy = d) and n = 10³ … 10⁶ rows it compares, in one run:

(a) ``stats``: `CKAStats` fed shards of 4096 rows. Each shard is generated on the fly from a
    generator seeded by (seed, d, shard index), so X is never materialized; the time counts
    the updates plus the final biased and debiased `cka` calls, not the data generation.
(b) ``gram``: K = XXᵀ, L = YYᵀ (float64, features not centered), biased CKA through HKH and
    the unbiased-HSIC formula, on the same rows (the shards concatenated). Only for
    n ≤ 2·10⁴: beyond that the n×n kernels do not fit in ~16 GiB.
(c) ``features``: X and Y materialized (≤ 4 GiB) and centered exactly, CKA in feature space
    in one shot (no shards, no shift algebra, no merging): the reference where the Gram
    form does not fit, so the statistics form is checked at n = 10⁵ and 10⁶ too.
(d) ``ckatorch``: only if ``import ckatorch`` works (it is not installed by this project).

"max abs diff" is over the biased and the debiased value, against ``gram`` where it ran,
else against ``features``.

Peak memory is tracemalloc's peak of Python/numpy allocations during each method (the
generated shards and the materialized X included; BLAS's internal work buffers are not
counted). For the statistics form it depends on d (O(d²)) and the shard size, not on n.

Data: X = 3 + N(0, 1)·s (anisotropic column scales s), Y = 0.8·X·t + N(0, 1) − 2, so both have
a nonzero mean and CKA is away from 0 and 1. Combinations skipped for time or memory are
listed in the table with the reason. The full default run takes 4–8 minutes on 2 cores
(7.5 min measured while other jobs shared the cores): d = 4096 stops at n = 10⁵, since 10⁶
rows would take ~15 minutes of float64 GEMMs, and ``features`` stops where X, Y exceed 4 GiB.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from sdftlab.cka import CKAStats, cka

SHARD_ROWS = 4096
SEED = 1234
GRAM_MAX_N = 20_000  # two n×n float64 kernels plus temporaries: ~13 GiB at 2·10⁴
FEATURES_MAX_BYTES = 4 * 2**30  # X and Y materialized for the feature-space check
# (d, n) pairs whose statistics form would take more than a couple of minutes on 2 cores.
STATS_TOO_SLOW = {(4096, 1_000_000): "~15 min of float64 GEMMs on 2 cores"}


def shards(n: int, d: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The n rows of (X, Y) in shards of SHARD_ROWS, each from its own seeded generator."""
    scales = np.random.default_rng([SEED, d]).uniform(0.3, 3.0, size=(2, d))
    for idx, start in enumerate(range(0, n, SHARD_ROWS)):
        m = min(SHARD_ROWS, n - start)
        rng = np.random.default_rng([SEED, d, idx])
        x_MD = 3.0 + rng.standard_normal((m, d)) * scales[0]
        y_MD = 0.8 * x_MD * scales[1] + rng.standard_normal((m, d)) - 2.0
        yield x_MD, y_MD


def measure(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run fn under tracemalloc; add its peak (MiB). fn reports its own timing."""
    tracemalloc.start()
    try:
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out["peak_mib"] = peak / 2**20
    return out


def run_stats(n: int, d: int) -> dict[str, Any]:
    st = CKAStats.empty(d, d)
    spent = 0.0
    for x_MD, y_MD in shards(n, d):
        t0 = time.perf_counter()
        st.update(x_MD, y_MD)
        spent += time.perf_counter() - t0
    t0 = time.perf_counter()
    biased = cka(st)
    debiased = cka(st, debiased=True)
    spent += time.perf_counter() - t0
    return {"time_s": spent, "cka_biased": biased, "cka_debiased": debiased}


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Σᵢⱼ aᵢⱼbᵢⱼ by row blocks (pairwise sums inside each, no n×n temporary)."""
    return math.fsum(float(np.sum(a[i : i + 512] * b[i : i + 512])) for i in range(0, len(a), 512))


def run_gram(n: int, d: int) -> dict[str, Any]:
    """K = XXᵀ, L = YYᵀ; unbiased HSIC from the raw kernels, biased from HKH, HLH in place."""
    parts = list(shards(n, d))
    x_ND = np.concatenate([p[0] for p in parts])
    y_ND = np.concatenate([p[1] for p in parts])
    del parts
    t0 = time.perf_counter()
    kern = {"x": x_ND @ x_ND.T, "y": y_ND @ y_ND.T}
    diag = {k: np.diagonal(v).copy() for k, v in kern.items()}
    ones = {k: v.sum(axis=1) - diag[k] for k, v in kern.items()}  # K̃1
    pairs = (("x", "y"), ("x", "x"), ("y", "y"))
    unbiased = {}
    for a, b in pairs:
        # Song et al. 2012, K̃ = K with zero diagonal: tr(K̃L̃) = Σ K∘L − Σ diag(K)diag(L).
        tr_kl = _dot(kern[a], kern[b]) - float(diag[a] @ diag[b])
        unbiased[a + b] = (
            tr_kl
            + ones[a].sum() * ones[b].sum() / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * float(ones[a] @ ones[b])
        ) / (n * (n - 3))
    for v in kern.values():  # HKH in place: subtract row means, then column means
        v -= v.mean(axis=1, keepdims=True)
        v -= v.mean(axis=0, keepdims=True)
    biased = {a + b: _dot(kern[a], kern[b]) for a, b in pairs}  # tr(HKH·HLH)
    spent = time.perf_counter() - t0
    return {
        "time_s": spent,
        "cka_biased": biased["xy"] / math.sqrt(biased["xx"] * biased["yy"]),
        "cka_debiased": unbiased["xy"] / math.sqrt(unbiased["xx"] * unbiased["yy"]),
    }


def run_features(n: int, d: int) -> dict[str, Any]:
    """X, Y materialized and centered exactly (two passes), CKA in feature space.

    Biased: ‖X̄ᵀȲ‖²_F/(‖X̄ᵀX̄‖_F‖ȲᵀȲ‖_F). Debiased: the same unbiased-HSIC expansion as the
    statistics form (Σx̄ = 0 here, so 1ᵀK̃1 = −Σqᵢ and 1ᵀK̃L̃1 = Σqᵢrᵢ), but in one shot on the
    whole centered X: no shards, no shift algebra, no merging.
    """
    parts = list(shards(n, d))
    x_ND = np.concatenate([p[0] for p in parts])
    y_ND = np.concatenate([p[1] for p in parts])
    del parts
    t0 = time.perf_counter()
    x_ND -= x_ND.mean(axis=0)
    y_ND -= y_ND.mean(axis=0)
    q_N = np.einsum("ij,ij->i", x_ND, x_ND)
    r_N = np.einsum("ij,ij->i", y_ND, y_ND)
    cross = {"xy": x_ND.T @ y_ND, "xx": x_ND.T @ x_ND, "yy": y_ND.T @ y_ND}
    sq = {k: _dot(v, v) for k, v in cross.items()}  # ‖X̄ᵀȲ‖²_F, …
    tot = {"x": q_N.sum(), "y": r_N.sum()}
    qq = {"xy": q_N @ r_N, "xx": q_N @ q_N, "yy": r_N @ r_N}
    unb = {
        k: (sq[k] - qq[k] + tot[k[0]] * tot[k[1]] / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * qq[k])
        / (n * (n - 3))
        for k in cross
    }
    spent = time.perf_counter() - t0
    return {
        "time_s": spent,
        "cka_biased": sq["xy"] / math.sqrt(sq["xx"] * sq["yy"]),
        "cka_debiased": unb["xy"] / math.sqrt(unb["xx"] * unb["yy"]),
    }


def run_ckatorch(n: int, d: int) -> dict[str, Any]:  # pragma: no cover - optional package
    """ckatorch.core.cka_base (Gram form in torch; its tensors are not seen by tracemalloc)."""
    import torch
    from ckatorch.core import cka_base  # type: ignore[import-not-found]

    parts = list(shards(n, d))
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    t0 = time.perf_counter()
    biased = float(cka_base(x, y, kernel="linear", unbiased=False))
    debiased = float(cka_base(x, y, kernel="linear", unbiased=True))
    return {"time_s": time.perf_counter() - t0, "cka_biased": biased, "cka_debiased": debiased}


def have_ckatorch() -> bool:
    try:
        import ckatorch  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="n ≤ 10⁴ at d=128, n = 10³ at d=4096")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()

    ns = [1_000, 10_000, 100_000, 1_000_000]
    ds = [128, 4096]
    quick_cut = {128: 10_000, 4096: 1_000}
    ckt = have_ckatorch()
    rows: list[dict[str, Any]] = []
    for d in ds:
        for n in ns:
            if args.quick and n > quick_cut[d]:
                rows.append(
                    {"d": d, "n": n, "method": "all", "status": "skipped", "note": "--quick"}
                )
                continue
            plan: list[tuple[str, Callable[[int, int], dict[str, Any]], str | None]] = [
                ("stats", run_stats, STATS_TOO_SLOW.get((d, n))),
                (
                    "gram",
                    run_gram,
                    None if n <= GRAM_MAX_N else f"n×n kernels: {2 * n * n * 8 / 2**30:,.0f} GiB",
                ),
                (
                    "features",
                    run_features,
                    None
                    if 2 * n * d * 8 <= FEATURES_MAX_BYTES
                    else f"X, Y would take {2 * n * d * 8 / 2**30:.0f} GiB",
                ),
            ]
            if n <= GRAM_MAX_N:
                plan.append(("ckatorch", run_ckatorch, None if ckt else "ckatorch not installed"))
            for method, fn, skip in plan:
                row: dict[str, Any] = {"d": d, "n": n, "method": method}
                if skip is not None:
                    rows.append({**row, "status": "skipped", "note": skip})
                    continue
                rows.append({**row, "status": "ok", **measure(lambda f=fn, n=n, d=d: f(n, d))})
            # max |Δ| (over the biased and debiased value) of each method against the Gram form,
            # or against the materialized feature-space computation where Gram does not fit.
            done = {
                r["method"]: r for r in rows if (r["d"], r["n"]) == (d, n) and r["status"] == "ok"
            }
            ref = done.get("gram") or done.get("features")
            for r in done.values():
                if ref is not None and r is not ref:
                    r["max_abs_diff"] = max(
                        abs(r["cka_biased"] - ref["cka_biased"]),
                        abs(r["cka_debiased"] - ref["cka_debiased"]),
                    )
                    r["diff_against"] = ref["method"]
            print(f"done d={d} n={n}", flush=True)

    header = (
        "| d | n | method | time (s) | peak MiB | CKA biased | CKA debiased | max abs diff | note |"
    )
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        if r["status"] != "ok":
            lines.append(
                f"| {r['d']} | {r['n']:,} | {r['method']} | – | – | – | – | – "
                f"| skipped: {r['note']} |"
            )
            continue
        diff = f"{r['max_abs_diff']:.1e} vs {r['diff_against']}" if "max_abs_diff" in r else "–"
        lines.append(
            f"| {r['d']} | {r['n']:,} | {r['method']} | {r['time_s']:.3f} "
            f"| {r['peak_mib']:.1f} | {r['cka_biased']:.12f} "
            f"| {r['cka_debiased']:.12f} | {diff} | |"
        )
    print("\n".join(lines))
    print("\npeak memory: tracemalloc peak of Python/numpy allocations (BLAS buffers excluded)")
    for d in ds:
        peaks = [
            r["peak_mib"]
            for r in rows
            if r["d"] == d and r["method"] == "stats" and r["status"] == "ok"
        ]
        if peaks:
            print(f"stats form, d={d}: peak {min(peaks):.1f}–{max(peaks):.1f} MiB over n")
    if not ckt:
        print("ckatorch: not installed, skipped (this benchmark does not install it)")
    if args.out:
        meta = {
            "shard_rows": SHARD_ROWS,
            "seed": SEED,
            "quick": args.quick,
            "machine": platform.platform(),
            "memory": "tracemalloc peak, MiB",
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
