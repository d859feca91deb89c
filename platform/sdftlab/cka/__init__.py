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
