"""Out-of-distribution detection (paper 000, Sections 3.6 and 4.4): detectors (one module each
under :mod:`safespot.ood.detectors`), metrics, reports, the run's sets
(:mod:`safespot.ood.data`), the LightningModule that fits, tunes and scores
(:mod:`safespot.ood.module`) and the ``ood.py`` entry point (:mod:`safespot.ood.evaluate`)."""

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
