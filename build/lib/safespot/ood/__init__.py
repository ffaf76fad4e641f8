"""Out-of-distribution detection (paper 000, Sections 3.6 and 4.4): detectors, metrics,
reports and the ``ood.py`` entry point (:mod:`safespot.ood.evaluate`)."""

from safespot.ood.detectors import MSP, Detector, DetectorError, Energy, GramDetector, Mahalanobis, SafeSpotScore
from safespot.ood.metrics import fpr_at_tpr, mean_std, ood_metrics

__all__ = [
    "MSP",
    "Detector",
    "DetectorError",
    "Energy",
    "GramDetector",
    "Mahalanobis",
    "SafeSpotScore",
    "fpr_at_tpr",
    "mean_std",
    "ood_metrics",
]
