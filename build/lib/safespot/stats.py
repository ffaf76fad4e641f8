"""Intervals and paired comparisons for accuracies measured on the same images.

Every accuracy a report prints comes with a 95% interval: Wilson's score interval for a binomial
proportion (``scipy.stats.binomtest(...).proportion_ci(method="wilson")``), which stays inside
[0, 1] and keeps its coverage for small samples and accuracies near 0 or 1. Two accuracies
measured on the *same* images (a robustified image against its original, one model against
another) are compared per image: the difference of the two accuracies with Newcombe's paired
score interval (which, unlike a Wald interval, stays informative with few discordant pairs) and
McNemar's exact test (a two-sided binomial test on the discordant pairs), from which
:func:`verdict` reads a plain "holds / does not hold / inconclusive at this scale".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

#: The confidence level of every interval.
LEVEL = 0.95


@dataclass(frozen=True)
class Accuracy:
    """An accuracy on ``n`` images with its Wilson interval (fractions in [0, 1])."""

    correct: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    def percent(self, digits: int = 1) -> str:
        """``"48.5 [41.7, 55.4]"``: the accuracy and its 95% interval in percent."""
        if not self.n:
            return "–"
        return f"{100 * self.value:.{digits}f} [{100 * self.low:.{digits}f}, {100 * self.high:.{digits}f}]"


def _as_bool(correct: Sequence[bool] | np.ndarray) -> np.ndarray:
    array = np.asarray(correct)
    if array.ndim != 1:
        raise ValueError(f"expected one flag per image, got shape {array.shape}")
    if array.dtype != bool:
        if not np.isin(array, (0, 1)).all():
            raise ValueError("per-image correctness must be booleans or 0/1")
        array = array.astype(bool)
    return array


def accuracy(correct: Sequence[bool] | np.ndarray, level: float = LEVEL) -> Accuracy:
    """The accuracy of per-image correctness flags with its Wilson score interval."""
    flags = _as_bool(correct)
    n, k = int(flags.size), int(flags.sum())
    if n == 0:
        return Accuracy(0, 0, float("nan"), float("nan"))
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return Accuracy(k, n, float(ci.low), float(ci.high))


@dataclass(frozen=True)
class PairedDifference:
    """``acc(a) - acc(b)`` on the same ``n`` images: ``a_only`` images correct under ``a`` only,
    ``b_only`` under ``b`` only; a 95% interval of the difference and McNemar's exact p-value."""

    n: int
    a_only: int
    b_only: int
    low: float
    high: float
    p_value: float

    @property
    def value(self) -> float:
        return (self.a_only - self.b_only) / self.n if self.n else float("nan")

    def percent(self, digits: int = 1) -> str:
        """``"+16.0 pp [+10.9, +21.1], McNemar p = 3e-09"`` (percentage points)."""
        if not self.n:
            return "–"
        v, lo, hi = (100 * t for t in (self.value, self.low, self.high))
        return f"{v:+.{digits}f} pp [{lo:+.{digits}f}, {hi:+.{digits}f}], McNemar p = {self.p_value:.2g}"


def newcombe_interval(both: int, a_only: int, b_only: int, neither: int, level: float = LEVEL) -> tuple[float, float]:
    """Newcombe's hybrid score interval for the difference of two proportions measured on the same
    units (Newcombe 1998, "Improved confidence intervals for the difference between binomial
    proportions based on paired data", Stat. Med. 17, method 10): the Wilson intervals of the two
    accuracies combined with the estimated correlation of the pairs (its continuity-corrected
    form, 0 for ``0 <= ad - bc <= n/2``). Unlike the Wald interval it does not collapse to a point
    when the discordant pairs are few or none, and stays inside [-1, 1]."""
    n = both + a_only + b_only + neither
    p1, p2 = (both + a_only) / n, (both + b_only) / n
    l1, u1 = _wilson(both + a_only, n, level)
    l2, u2 = _wilson(both + b_only, n, level)
    margins = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    cross = both * neither - a_only * b_only
    if margins == 0 or 0 <= cross <= n / 2:
        phi = 0.0
    else:
        phi = (cross - n / 2 if cross > n / 2 else cross) / math.sqrt(margins)
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, p1 - p2 - below), min(1.0, p1 - p2 + above)


def _wilson(k: int, n: int, level: float) -> tuple[float, float]:
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def paired_difference(
    a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray, level: float = LEVEL
) -> PairedDifference:
    """Compare two accuracies measured on the same images (image ``i`` in both ``a[i]`` and
    ``b[i]``): the difference with Newcombe's paired score interval (:func:`newcombe_interval`)
    and McNemar's exact two-sided test, ``binomtest(a_only, a_only + b_only, 0.5)``."""
    fa, fb = _as_bool(a), _as_bool(b)
    if fa.shape != fb.shape:
        raise ValueError(f"paired comparison needs the same images: {fa.size} vs {fb.size} flags")
    n = int(fa.size)
    a_only, b_only = int((fa & ~fb).sum()), int((fb & ~fa).sum())
    if n == 0:
        return PairedDifference(0, 0, 0, float("nan"), float("nan"), float("nan"))
    both = int((fa & fb).sum())
    low, high = newcombe_interval(both, a_only, b_only, n - both - a_only - b_only, level)
    discordant = a_only + b_only
    p = float(stats.binomtest(a_only, discordant, 0.5).pvalue) if discordant else 1.0
    return PairedDifference(n, a_only, b_only, low, high, p)


@dataclass(frozen=True)
class MeanInterval:
    """The mean of per-image values (e.g. a difference of two paired gains, in {-2, ..., 2}) with a
    95% Wald interval; ``n`` images."""

    n: int
    value: float
    low: float
    high: float

    def percent(self, digits: int = 1) -> str:
        return f"{100 * self.value:+.{digits}f} pp [{100 * self.low:+.{digits}f}, {100 * self.high:+.{digits}f}]"


def mean_interval(values: Sequence[float] | np.ndarray, level: float = LEVEL) -> MeanInterval:
    """Mean and Wald interval of per-image values measured on the same images."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or v.size == 0:
        raise ValueError("expected one value per image")
    z = float(stats.norm.ppf(0.5 + level / 2))
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("inf")
    return MeanInterval(int(v.size), float(v.mean()), float(v.mean() - z * se), float(v.mean() + z * se))


#: the smallest difference of accuracies a reproduction's claim is about (1 percentage point): a
#: claim "a beats b" does not hold when its interval excludes every difference of that size
SMALLEST_EFFECT = 0.01


def verdict(
    difference: PairedDifference | MeanInterval, claim: str = "greater", margin: float = 0.0, smallest: float = 0.0
) -> str:
    """A plain verdict on a claim about ``acc(a) - acc(b)`` from its 95% interval.

    ``claim="greater"``: a beats b by more than ``margin`` (a negative margin: a non-inferiority
    claim, "at most -margin worse"): holds when the interval lies above ``margin``, does not hold
    when it lies below ``margin + smallest`` (``smallest``: the smallest effect the claim is about,
    declared before the data, e.g. :data:`SMALLEST_EFFECT`; with 0, only an interval entirely at
    or below ``margin``), else inconclusive. ``"equal"``: the two agree within ``margin`` (a
    reproduction's "matches the published number up to margin")."""
    lo, hi = difference.low, difference.high
    if not difference.n or not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive at this scale"
    if claim == "greater":
        if lo > margin:
            return "holds"
        below = hi < margin + smallest if smallest > 0 else hi <= margin
        return "does not hold" if below else "inconclusive at this scale"
    if claim == "equal":
        if -margin <= lo and hi <= margin:
            return "holds"
        return "does not hold" if (lo > margin or hi < -margin) else "inconclusive at this scale"
    raise ValueError(f"claim must be 'greater' or 'equal', got {claim!r}")


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | np.ndarray:
    """Area under the ROC curve of ``scores`` (higher = more likely positive) by the Mann-Whitney
    statistic, ties counted one half (the same value as ``torchmetrics``' binary AUROC). A 2-D
    ``scores`` with a 2-D ``positive`` gives one AUROC per row."""
    scores, positive = np.asarray(scores, dtype=float), np.asarray(positive, dtype=bool)
    n_pos, n_neg = positive.sum(axis=-1), (~positive).sum(axis=-1)
    ranks = stats.rankdata(scores, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = ((ranks * positive).sum(axis=-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return float(value) if np.ndim(value) == 0 else value


def auroc_difference(
    groups: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = LEVEL,
) -> MeanInterval:
    """``AUROC(a) - AUROC(b)`` of two detectors scored on the same images, averaged over
    ``groups`` (one ``(scores_a, scores_b, positive)`` per independent run, e.g. per training
    seed), with a percentile bootstrap interval: each replicate resamples the positives and the
    negatives of every group with replacement (the same resample for both detectors, so the
    comparison is paired). ``n`` is the number of groups."""
    if not groups:
        raise ValueError("auroc_difference needs at least one group")
    rng = np.random.default_rng(seed)
    point = float(np.mean([auroc(a, p) - auroc(b, p) for a, b, p in groups]))
    replicates = np.zeros(n_boot)
    for a, b, p in groups:
        a, b, p = np.asarray(a, dtype=float), np.asarray(b, dtype=float), np.asarray(p, dtype=bool)
        pos, neg = np.flatnonzero(p), np.flatnonzero(~p)
        idx = np.concatenate([rng.choice(pos, (n_boot, pos.size)), rng.choice(neg, (n_boot, neg.size))], axis=1)
        replicates += auroc(a[idx], p[idx]) - auroc(b[idx], p[idx])
    replicates /= len(groups)
    tail = (1 - level) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    return MeanInterval(len(groups), point, float(low), float(high))


@dataclass(frozen=True)
class SeedInterval:
    """The mean of one value per training seed (e.g. a paired AUROC difference measured on each
    seed's models and test images) with a 95% interval over the seeds; ``n`` seeds."""

    per_seed: tuple[float, ...]
    value: float
    low: float
    high: float

    @property
    def n(self) -> int:
        return len(self.per_seed)

    def percent(self, digits: int = 1) -> str:
        """``"-9.9 pp [-28.5, +8.7]"`` (percentage points)."""
        v, lo, hi = (100 * t for t in (self.value, self.low, self.high))
        return f"{v:+.{digits}f} pp [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def seed_t_interval(
    per_seed: Sequence[float] | np.ndarray, level: float = LEVEL, bounds: tuple[float, float] = (-1.0, 1.0)
) -> SeedInterval:
    """Mean of per-seed values with Student's t interval over the seeds, ``mean ± t_{k-1} s / sqrt(k)``
    (``s`` the sample standard deviation of the k values), clipped to ``bounds`` (the values' range,
    e.g. [-1, 1] for a difference of AUROCs); with one seed, the whole range.

    For a claim about a mean over training seeds (paper 000, Table 4: "averaged over 10 runs"), the
    interval must hold the seed-to-seed variation. When every seed is scored on its own seeded draw
    of test images, each per-seed value carries both the variation between trained models and the
    sampling of its images, so the spread of the k values estimates the variance of their mean
    without a model of either level, and the t quantile accounts for estimating it from k values.
    A bootstrap over so few seeds does not: with k = 3 there are 10 distinct resamples of the seeds,
    the bootstrap variance of their mean is (k - 1) / k of the sample's, and a percentile interval
    ignores the t quantile (4.30 for k = 3 against 1.96), so it is far too narrow."""
    values = np.asarray(per_seed, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("expected one value per seed")
    mean, low_bound, high_bound = float(values.mean()), *bounds
    if values.size == 1:
        return SeedInterval((float(values[0]),), mean, low_bound, high_bound)
    half = float(stats.t.ppf(0.5 + level / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size))
    low, high = max(low_bound, mean - half), min(high_bound, mean + half)
    return SeedInterval(tuple(float(v) for v in values), mean, low, high)


def auroc_difference_over_seeds(
    groups: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], level: float = LEVEL
) -> SeedInterval:
    """``AUROC(a) - AUROC(b)`` of two detectors scored on the same images, one
    ``(scores_a, scores_b, positive)`` group per training seed, averaged over the seeds with the
    t interval over the per-seed differences (:func:`seed_t_interval`). Unlike
    :func:`auroc_difference`, whose bootstrap resamples images within fixed trained models, the
    interval includes the variation between training seeds."""
    if not groups:
        raise ValueError("auroc_difference_over_seeds needs at least one group")
    per_seed = [float(auroc(a, p) - auroc(b, p)) for a, b, p in groups]
    return seed_t_interval(per_seed, level, (-1.0, 1.0))


def percentile_interval(point: float, replicates: Sequence[float] | np.ndarray, level: float = LEVEL) -> MeanInterval:
    """A statistic ``point`` with the percentile bootstrap interval of its ``replicates`` (the
    statistic recomputed on resamples): the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles,
    linearly interpolated, as :func:`auroc_difference` takes them. Replicates where the statistic
    is undefined (NaN, e.g. a ratio with an empty denominator on that resample) are left out; ``n``
    counts the replicates used, 0 (no interval) when ``point`` is undefined or none is left."""
    values = np.asarray(replicates, dtype=float).ravel()
    values = values[np.isfinite(values)]
    if not math.isfinite(point) or not values.size:
        return MeanInterval(0, float(point), float("nan"), float("nan"))
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return MeanInterval(int(values.size), float(point), float(low), float(high))
