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

# Capture, accumulation, the Ray actor pool and the comparison driver (plots stay in
# `sdftlab.cka.plots`, imported on demand: matplotlib is not needed to compute CKA).
from sdftlab.cka.capture import (
    CKAAccumulator,
    LayerPairs,
    capture_hidden_states,
    collate,
    encode_examples,
    relative_depth_map,
)
from sdftlab.cka.pool import CKAOptions, CKAWorker, cka_local, cka_over_dataset
from sdftlab.cka.run import compare_states, format_table

__all__ += [
    "CKAAccumulator",
    "CKAOptions",
    "CKAWorker",
    "LayerPairs",
    "capture_hidden_states",
    "cka_local",
    "cka_over_dataset",
    "collate",
    "compare_states",
    "encode_examples",
    "format_table",
    "relative_depth_map",
]
