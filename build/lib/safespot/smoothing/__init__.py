"""Randomised smoothing: noisy and soft-smoothed views of a classifier, the smoothed
classifier with its votes, Cohen et al.'s PREDICT / CERTIFY, and certified accuracy; per-image
seeded noise (:func:`seeded_noise`) and the draws per forward pass by role
(:func:`smoothing_draws`)."""

from safespot.smoothing.certified import (
    certified_accuracy,
    certified_curve,
    certified_table,
    plot_certified_accuracy,
    write_certified_accuracy,
)
from safespot.smoothing.smoothed import (
    RANK_WEIGHTS,
    VOTES,
    Certificate,
    SmoothedClassifier,
    clopper_pearson_lower,
)
from safespot.smoothing.soft import (
    NoiseSeeding,
    NoisyClassifier,
    SoftSmoothed,
    seeded_noise,
    smoothing_draws,
    unseeded_noise,
)

__all__ = [
    "RANK_WEIGHTS",
    "VOTES",
    "Certificate",
    "NoiseSeeding",
    "NoisyClassifier",
    "SmoothedClassifier",
    "SoftSmoothed",
    "certified_accuracy",
    "certified_curve",
    "certified_table",
    "clopper_pearson_lower",
    "plot_certified_accuracy",
    "seeded_noise",
    "smoothing_draws",
    "unseeded_noise",
    "write_certified_accuracy",
]
