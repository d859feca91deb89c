"""Plots of linear CKA: by layer for several states, and misalignment against accuracy.

Linear CKA (Kornblith et al. 2019) between each state's hidden states and a reference
state's, on identical inputs ("CKA as a lens on self-distillation recovery"):
`plot_cka_by_layer` draws the per-sample and per-sequence CKA against relative depth for
several states; `plot_misalignment_vs_accuracy` scatters representational misalignment
(1 − CKA) against the change in task accuracy across pipeline stages, with a fitted line,
and returns the Pearson correlation (Spearman's is annotated on the plot).

PNG files are written atomically (a temporary file in the same folder, then `os.replace`);
matplotlib runs on the Agg backend, without a display.

    sdftlab cka --a forgot --b expert --data science --plot cka_forgot.png

    >>> plot_cka_by_layer({"forgot": df_forgot, "sdft": df_sdft}, "expert", "cka.png")
    >>> r = plot_misalignment_vs_accuracy([("forgot", 0.31, -0.22), ...], "misalign.png")
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from sdftlab.errors import ConfigError, DataError
from sdftlab.paths import atomic_write


def _save_atomic(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Save `fig` as PNG at `path`, whole or not at all (`paths.atomic_write`)."""
    try:
        with atomic_write(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def plot_cka_by_layer(
    results: Mapping[str, pd.DataFrame],
    reference_name: str,
    path: str | os.PathLike[str],
    *,
    column: str = "cka",
) -> Path:
    """CKA with `reference_name` against relative depth, one line per state.

    `results` maps a state name to its `compare_states` DataFrame; each must have one row
    per layer of the state (``layers='diagonal'`` or a list). Left panel: `column` (the
    per-sample headline by default); right panel: the mean per-sequence CKA (± s.e.).
    """
    if not results:
        raise DataError("plot_cka_by_layer: no results to plot")
    for name, df in results.items():
        missing = {column, "layer_a", "relative_depth", "sequence_cka"} - set(df.columns)
        if missing:
            raise ConfigError(f"results for {name!r} lack the column(s) {sorted(missing)}")
        if df["layer_a"].duplicated().any():
            raise ConfigError(
                f"results for {name!r} have several rows per layer_a (layers='all'?); plot "
                "one row per layer: compare with layers='diagonal' or filter the rows"
            )
    fig, (ax_s, ax_q) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for name, df in results.items():
        d = df.sort_values("layer_a")
        x = d["relative_depth"].to_numpy(float)
        ax_s.plot(x, d[column].to_numpy(float), marker="o", label=name)
        seq = d["sequence_cka"].to_numpy(float)
        se = (
            d["sequence_cka_se"].to_numpy(float)
            if "sequence_cka_se" in d
            else np.full_like(seq, np.nan)
        )
        ax_q.errorbar(x, seq, yerr=np.nan_to_num(se), marker="o", capsize=3, label=name)
    ax_s.set_title(f"per-sample CKA ({column}) with {reference_name}")
    ax_q.set_title(f"per-sequence CKA with {reference_name}")
    for ax in (ax_s, ax_q):
        ax.set_xlabel("relative depth (0 = embeddings, 1 = last layer)")
        ax.set_ylabel("linear CKA")
        ax.set_xlim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save_atomic(fig, path)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx = pd.Series(x).rank(method="average").to_numpy()
    ry = pd.Series(y).rank(method="average").to_numpy()
    return _pearson(rx, ry)


def plot_misalignment_vs_accuracy(
    points: Sequence[tuple[str, float, float]], path: str | os.PathLike[str]
) -> float:
    """Scatter (1 − CKA, Δaccuracy) per stage, labelled, with a least-squares line.

    `points` are ``(stage, 1 - cka, delta_accuracy)``. Returns the Pearson correlation;
    Spearman's is annotated. With fewer than 3 points the plot is still drawn but no
    correlation is computed: the title says so and the return value is NaN (also NaN if
    either coordinate is constant).
    """
    if not points:
        raise DataError("plot_misalignment_vs_accuracy: no points to plot")
    labels = [str(p[0]) for p in points]
    x = np.array([float(p[1]) for p in points])
    y = np.array([float(p[2]) for p in points])
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise DataError("plot_misalignment_vs_accuracy: every point needs finite coordinates")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(x, y, zorder=3)
    for label, xi, yi in zip(labels, x, y, strict=True):
        ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(5, 5), fontsize=9)
    if len(x) >= 2 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        xs = np.linspace(x.min(), x.max(), 50)
        ax.plot(xs, slope * xs + intercept, "--", color="gray", label=f"fit: slope {slope:.3g}")
        ax.legend(fontsize=8, loc="best")
    r = _pearson(x, y)
    if len(x) < 3:
        ax.set_title(f"n = {len(x)} < 3 points: correlation not computed")
    else:
        rho = _spearman(x, y)
        ax.set_title(f"Pearson r = {r:.3f}, Spearman ρ = {rho:.3f} (n = {len(x)})")
    ax.set_xlabel("misalignment 1 − CKA")
    ax.set_ylabel("Δ accuracy")
    ax.axhline(0.0, color="k", lw=0.5)
    ax.grid(alpha=0.3)
    _save_atomic(fig, path)
    return r
