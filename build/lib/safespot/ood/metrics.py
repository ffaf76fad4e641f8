"""OOD detection metrics (Hendrycks et al., 2019, "Deep Anomaly Detection with Outlier
Exposure", Section 4.2; paper 000, Section 4.4 and Table 4): AUROC, AUPR and FPR95.

One convention throughout the framework:

- **outliers are the positive class** (label 1), in-distribution images the negatives (0);
- **a higher score means more anomalous**; confidences such as the maximum softmax
  probability (MSP) are negated before they are scored.

So AUROC is the probability that a random outlier scores higher than a random
in-distribution image (ties count one half), AUPR is the average precision with outliers as
positives ("AUPR-Out"), and FPR95 is the fraction of in-distribution images flagged as
outliers at the most demanding threshold that still detects at least 95% of the outliers
(true-positive rate >= 0.95). Note that the Mahalanobis and ODIN papers use the opposite
convention (in-distribution positive, "TNR at 95% TPR"); their numbers are not comparable
one-to-one with these.

The curves come from :mod:`torchmetrics` (``binary_auroc``, ``binary_average_precision``,
``binary_roc`` with exact thresholds). torchmetrics applies a sigmoid to scores outside
[0, 1]; scores are therefore first replaced by their dense ranks scaled to [0, 1], which keeps
their order and their ties exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc, binary_average_precision, binary_roc

METRICS = ("fpr95", "auroc", "aupr")
_TPR_TOLERANCE = 1e-6


def _as_tensor(values: torch.Tensor | np.ndarray | Sequence[float]) -> torch.Tensor:
    """Scores as a float64 CPU tensor (metrics are computed once per run, on the host, next to
    the CPU targets they are compared with)."""
    if torch.is_tensor(values):
        return values.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def rank_scores(scores: torch.Tensor) -> torch.Tensor:
    """Dense ranks of ``scores`` scaled to [0, 1] (equal scores keep equal values)."""
    unique, inverse = torch.unique(scores.double().flatten(), sorted=True, return_inverse=True)
    return inverse.double() / max(len(unique) - 1, 1)


def labelled(
    in_scores: torch.Tensor | Sequence[float], out_scores: torch.Tensor | Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores ranked to [0, 1], targets)`` with outliers as positives (1)."""
    a, b = _as_tensor(in_scores).flatten(), _as_tensor(out_scores).flatten()
    if len(a) == 0 or len(b) == 0:
        raise ValueError("OOD metrics need at least one in-distribution and one outlier score")
    scores = torch.cat([a, b])
    if not torch.isfinite(scores).all():
        raise ValueError("OOD scores must be finite")
    targets = torch.cat([torch.zeros(len(a), dtype=torch.long), torch.ones(len(b), dtype=torch.long)])
    return rank_scores(scores), targets


def fpr_at_tpr(scores: torch.Tensor, targets: torch.Tensor, tpr_level: float = 0.95) -> float:
    """The smallest false-positive rate over the ROC operating points (exact thresholds, so
    tied scores move together) whose true-positive rate is at least ``tpr_level``."""
    fpr, tpr, _ = binary_roc(scores, targets, thresholds=None)
    reached = tpr >= tpr_level - _TPR_TOLERANCE
    return float(fpr[reached].min())


def ood_metrics(
    in_scores: torch.Tensor | Sequence[float], out_scores: torch.Tensor | Sequence[float]
) -> dict[str, float]:
    """``{"fpr95", "auroc", "aupr"}`` (fractions in [0, 1]) for anomaly scores of
    in-distribution images and outliers (higher = more anomalous; outliers positive)."""
    scores, targets = labelled(in_scores, out_scores)
    return {
        "fpr95": fpr_at_tpr(scores, targets, 0.95),
        "auroc": float(binary_auroc(scores, targets, thresholds=None)),
        "aupr": float(binary_average_precision(scores, targets, thresholds=None)),
    }


def threshold_at_tpr(
    in_scores: torch.Tensor | Sequence[float], out_scores: torch.Tensor | Sequence[float], tpr_level: float = 0.95
) -> float:
    """The score threshold (flag ``score >= threshold``) of the FPR95 operating point, in the
    scores' own units (for the dotted lines of the histograms)."""
    out = _as_tensor(out_scores).flatten().sort(descending=True).values
    k = max(math.ceil(tpr_level * len(out) - _TPR_TOLERANCE), 1)
    return float(out[k - 1])


def mean_std(runs: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``{metric: {"mean", "std", "n"}}`` over repeated runs (sample standard deviation,
    ``ddof = 1``; 0 for a single run), for tables "averaged over 10 runs" (paper 000, Table 4)."""
    if not runs:
        raise ValueError("mean_std needs at least one run")
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    out: dict[str, dict[str, float]] = {}
    for k in keys:
        values = np.asarray([float(r[k]) for r in runs], dtype=np.float64)
        out[k] = {
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values),
        }
    return out
