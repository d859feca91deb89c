"""CKA between a student's and a teacher's hidden states: statistics, activation capture,
actor pool, plots.

`stats` holds the math: exact, mergeable linear CKA (biased and debiased, optionally
standardized) from additive float64 sufficient statistics, the per-sequence token-trajectory
form, and a differentiable torch CKA for training losses.
"""

from sdftlab.cka.stats import (
    CKAStats,
    MeanStat,
    Standardizer,
    cka,
    linear_cka_torch,
    sequence_cka,
)

__all__ = [
    "CKAStats",
    "MeanStat",
    "Standardizer",
    "cka",
    "linear_cka_torch",
    "sequence_cka",
]

# Capture, accumulation, the Ray actor pool and the comparison driver load on first use
# (PEP 562): importing the math needs neither Ray nor the lineage. Plots stay in
# `sdftlab.cka.plots` (matplotlib is not needed to compute CKA).
_LAZY = {
    "CKAAccumulator": "capture",
    "LayerPairs": "capture",
    "capture_hidden_states": "capture",
    "collate": "capture",
    "encode_examples": "capture",
    "relative_depth_map": "capture",
    "CKAOptions": "pool",
    "CKAWorker": "pool",
    "cka_local": "pool",
    "cka_over_dataset": "pool",
    "compare_states": "run",
    "format_table": "run",
}
__all__ += sorted(_LAZY)


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'sdftlab.cka' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"sdftlab.cka.{_LAZY[name]}"), name)
