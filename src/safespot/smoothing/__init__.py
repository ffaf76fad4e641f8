"""Randomised smoothing: noisy and soft-smoothed views of a classifier, the smoothed
classifier with its votes, Cohen et al.'s PREDICT / CERTIFY, and certified accuracy."""

from safespot.smoothing.attacks import NoisyViewAttack
from safespot.smoothing.certified import (
    certified_accuracy,
    certified_curve,
    certified_table,
    plot_certified_accuracy,
    write_certified_accuracy,
)
from safespot.smoothing.smoothed import VOTES, Certificate, SmoothedClassifier, clopper_pearson_lower
from safespot.smoothing.soft import NoisyClassifier, SoftSmoothed

__all__ = [
    "VOTES",
    "Certificate",
    "NoisyClassifier",
    "NoisyViewAttack",
    "SmoothedClassifier",
    "SoftSmoothed",
    "certified_accuracy",
    "certified_curve",
    "certified_table",
    "clopper_pearson_lower",
    "plot_certified_accuracy",
    "write_certified_accuracy",
]
