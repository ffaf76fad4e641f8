"""OOD detectors, one per module, on the base class of :mod:`safespot.ood.detectors.base`:
per-image anomaly scores (higher = more anomalous, see :mod:`safespot.ood.metrics`) from a
trained classifier.

- :class:`MSP` (:mod:`.msp`): the negated maximum softmax probability (Hendrycks & Gimpel,
  2017); on a model trained with Outlier Exposure the "OE" detector of paper 000, Table 4.
- :class:`Energy` (:mod:`.energy`): the free energy ``-T logsumexp(logits / T)`` (Liu et al., 2020).
- :class:`Mahalanobis` (:mod:`.mahalanobis`): Lee et al. (2018), Eqs. 1-3 and Algorithm 1.
- :class:`GramDetector` (:mod:`.gram`): Sastry & Oore (2020), in a simple form.
- :class:`SafeSpotScore` (:mod:`.safe_spot`): paper 000, Section 3.6,
  ``D(x) = mu * MSP(x) + (1 - mu) * MSP(x_a*)``.

The layers the feature-based detectors read are in :mod:`.layers`.
"""

from safespot.ood.detectors.base import FIT_SLICES, TUNE_IN, TUNE_OUT, Batches, Detector, DetectorError
from safespot.ood.detectors.energy import Energy
from safespot.ood.detectors.gram import GramDetector
from safespot.ood.detectors.layers import capture, resolve_layers, stage_modules
from safespot.ood.detectors.mahalanobis import Mahalanobis
from safespot.ood.detectors.msp import MSP
from safespot.ood.detectors.safe_spot import SafeSpotScore

__all__ = [
    "FIT_SLICES",
    "MSP",
    "TUNE_IN",
    "TUNE_OUT",
    "Batches",
    "Detector",
    "DetectorError",
    "Energy",
    "GramDetector",
    "Mahalanobis",
    "SafeSpotScore",
    "capture",
    "resolve_layers",
    "stage_modules",
]
