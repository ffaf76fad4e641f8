"""Randomised smoothing: noisy and soft-smoothed views of a classifier."""

from safespot.smoothing.soft import NoisyClassifier, SoftSmoothed

__all__ = ["NoisyClassifier", "SoftSmoothed"]
