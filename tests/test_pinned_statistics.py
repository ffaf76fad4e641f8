"""The intervals, tests and verdicts of :mod:`safespot.stats` pinned to hand-computed values, on data
fine enough that a near miss (a one-sided or mid-p McNemar test, ``ddof=0``, a 90% instead of a
95% level, another quantile convention, ``>=`` for ``>``) changes the number a report prints."""

from __future__ import annotations

import math

import numpy as np
import pytest

from safespot import stats
from safespot.stats import MeanInterval, accuracy, auroc_difference, mean_interval, paired_difference, verdict

Z = 1.959963984540054  # the 97.5% normal quantile: two-sided 95% intervals


def _pairs(a_only: int, b_only: int, both: int = 0, neither: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-image correctness of two classifiers on the same images with the given counts."""
    a = [True] * a_only + [False] * b_only + [True] * both + [False] * neither
    b = [False] * a_only + [True] * b_only + [True] * both + [False] * neither
    return np.array(a), np.array(b)


# --- McNemar's exact test: two-sided binomial on the discordant pairs -------------------------
@pytest.mark.parametrize(
    "a_only,b_only,p",
    [
        (1, 8, 2 * (1 + 9) / 2**9),  # 2 P(X <= 1), X ~ Bin(9, 1/2): 0.0390625
        (8, 1, 2 * (1 + 9) / 2**9),  # the same p whichever classifier wins
        (2, 5, 2 * (1 + 7 + 21) / 2**7),  # 2 P(X <= 2), X ~ Bin(7, 1/2): 0.453125
        (0, 6, 2 / 2**6),  # 0.03125
        (3, 3, 1.0),  # 2 P(X <= 3) = 84/64, capped at 1
        (0, 0, 1.0),  # no discordant pair
    ],
)
def test_mcnemar_is_the_exact_two_sided_binomial_test(a_only, b_only, p):
    """Not one-sided (b=1, c=8: 0.0195 or 0.998), not mid-p (0.0215), not the chi-square
    approximation with continuity correction (0.0455)."""
    diff = paired_difference(*_pairs(a_only, b_only, both=5, neither=4))
    assert (diff.a_only, diff.b_only) == (a_only, b_only)
    assert diff.p_value == pytest.approx(p, rel=1e-9)


def test_mcnemar_p_is_printed_with_two_significant_digits():
    """n = 20, b = 1, c = 8: difference -0.35 with Newcombe's paired interval, McNemar p 20/512."""
    diff = paired_difference(*_pairs(1, 8, both=5, neither=6))
    assert diff.percent() == "-35.0 pp [-56.3, -6.4], McNemar p = 0.039"


# --- the paired difference: Newcombe's hybrid score interval (1998, method 10) -----------------
def _wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson's score interval in closed form."""
    p = k / n
    centre, spread = p + Z**2 / (2 * n), Z * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2))
    return (centre - spread) / (1 + Z**2 / n), (centre + spread) / (1 + Z**2 / n)


def test_paired_difference_interval_is_newcombes_published_example():
    """The paired table (59, 6 / 16, 80) of the textbook example (Fagerland, Lydersen and Laake,
    "Statistical Analysis of Contingency Tables", chapter 8): -0.0621 (95% CI -0.1186 to -0.0046)."""
    diff = paired_difference(*_pairs(6, 16, both=59, neither=80))
    assert round(diff.value, 4) == -0.0621
    assert (round(diff.low, 4), round(diff.high, 4)) == (-0.1186, -0.0046)


def test_paired_difference_interval_combines_the_wilson_intervals_with_the_pairs_correlation():
    """10 images, 7 correct under both and 3 under neither: no discordant pair, yet the interval
    is not the point [0, 0]: the Wilson half-widths of 0.7 combined with the continuity-corrected
    correlation (ad - bc - n/2) / sqrt(7 * 3 * 7 * 3) = 16/21."""
    low, high = _wilson(7, 10)
    phi = 16 / 21
    half_below = math.sqrt((0.7 - low) ** 2 - 2 * phi * (0.7 - low) * (high - 0.7) + (high - 0.7) ** 2)
    half_above = math.sqrt((high - 0.7) ** 2 - 2 * phi * (high - 0.7) * (0.7 - low) + (0.7 - low) ** 2)
    diff = paired_difference(*_pairs(0, 0, both=7, neither=3))
    assert diff.value == 0 and diff.p_value == 1.0
    assert (diff.low, diff.high) == pytest.approx((-half_below, half_above), abs=1e-12)
    assert diff.high > 0.19  # a Wald interval would be [0, 0]


def test_paired_difference_correlation_is_zero_inside_the_continuity_band_and_clipped_to_one():
    """n = 10, (4 both, 3 / 1 discordant, 2 neither): ad - bc = 5 = n/2, so the correlation term is
    0 and the interval is the square-and-add of the two Wilson intervals; n = 3 with (0, 2, 0, 1):
    a margin is empty, the correlation 0, and the interval stays inside [-1, 1]."""
    (l1, u1), (l2, u2) = _wilson(7, 10), _wilson(5, 10)
    diff = paired_difference(*_pairs(3, 1, both=4, neither=2))
    expected = (0.2 - math.hypot(0.7 - l1, u2 - 0.5), 0.2 + math.hypot(u1 - 0.7, 0.5 - l2))
    assert (diff.low, diff.high) == pytest.approx(expected, abs=1e-12)
    small = paired_difference(*_pairs(2, 0, neither=1))
    (l1, u1), (l2, u2) = _wilson(2, 3), _wilson(0, 3)
    assert (small.low, small.high) == pytest.approx((2 / 3 - math.hypot(2 / 3 - l1, u2), 2 / 3 + u1 - 2 / 3), abs=1e-12)
    assert small.low >= -1 and small.high <= 1


def test_mean_interval_is_the_wald_interval_with_the_sample_deviation():
    """Values (2, 0, -1, 1): mean 0.5, sample variance 5/3, standard error sqrt(5/3) / 2."""
    se = math.sqrt(5 / 3) / 2
    interval = mean_interval([2, 0, -1, 1])
    assert (interval.n, interval.value) == (4, 0.5)
    assert (interval.low, interval.high) == pytest.approx((0.5 - Z * se, 0.5 + Z * se), abs=1e-12)


# --- Wilson's score interval at the edges ------------------------------------------------------
def test_wilson_interval_at_zero_and_all_correct():
    """k = 0 of n = 10: [0, z^2 / (n + z^2)]; k = n: [n / (n + z^2), 1] (Clopper-Pearson would
    give 0.3085 and 0.6915)."""
    none, every = accuracy(np.zeros(10, dtype=bool)), accuracy(np.ones(10, dtype=bool))
    assert (none.low, none.high) == pytest.approx((0.0, Z**2 / (10 + Z**2)), abs=1e-9)
    assert (every.low, every.high) == pytest.approx((10 / (10 + Z**2), 1.0), abs=1e-9)
    assert every.percent() == "100.0 [72.2, 100.0]"


# --- verdicts at the edges of their intervals -------------------------------------------------
@pytest.mark.parametrize(
    "low,high,claim,margin,expected",
    [
        (0.0, 0.1, "greater", 0.0, "inconclusive at this scale"),  # low = margin: not above it
        (1e-9, 0.1, "greater", 0.0, "holds"),
        (-0.1, 0.0, "greater", 0.0, "does not hold"),  # high = margin: cannot exceed it
        (-0.1, 1e-9, "greater", 0.0, "inconclusive at this scale"),
        (0.05, 0.2, "greater", 0.05, "inconclusive at this scale"),
        (-0.05, 0.05, "equal", 0.05, "holds"),  # both ends on the margin: within it
        (-0.05, 0.05 + 1e-9, "equal", 0.05, "inconclusive at this scale"),
        (0.05, 0.1, "equal", 0.05, "inconclusive at this scale"),  # low = margin: may still agree
        (0.05 + 1e-9, 0.1, "equal", 0.05, "does not hold"),
        (-0.1, -0.05 - 1e-9, "equal", 0.05, "does not hold"),
    ],
)
def test_verdict_boundaries(low, high, claim, margin, expected):
    assert verdict(MeanInterval(10, (low + high) / 2, low, high), claim, margin) == expected


# --- the paired bootstrap of AUROC differences: a percentile interval ---------------------------
class _Draws:
    """A stand-in for ``numpy.random.default_rng`` whose resamples are given: replicate ``r``
    takes the first positive ``r`` times and the second one for the rest; one negative."""

    def __init__(self, seed: int) -> None:
        del seed

    def choice(self, population: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        rows, width = size
        if len(population) == 1:
            return np.full(size, population[0])
        r = np.arange(rows)[:, None]
        return np.where(np.arange(width)[None, :] < r, population[0], population[1])


def test_auroc_bootstrap_interval_is_the_2_5_and_97_5_percentiles_of_the_replicates(monkeypatch):
    """One negative (score 0), 20 positives. Detector a ranks every positive above it (AUROC 1);
    b only the first one (score 1, the others -1). Replicate r = 0..20 draws the first positive r
    times, so b's AUROC is r / 20 and the differences are 1 - r / 20: 21 equally spaced values on
    [0, 1], whose 2.5% and 97.5% percentiles are 0.025 and 0.975 by linear interpolation (halfway
    between two replicates: the "lower" convention gives 0 and 0.95, a 90% interval 0.05 and
    0.95). The point estimate is the full sample's: 1 - 1/20."""
    monkeypatch.setattr(stats.np.random, "default_rng", _Draws)
    positive = np.arange(21) > 0
    a = positive.astype(float)
    b = np.where(positive, -1.0, 0.0)
    b[1] = 1.0
    diff = auroc_difference([(a, b, positive)], n_boot=21)
    assert diff.value == pytest.approx(19 / 20)
    assert (diff.low, diff.high) == pytest.approx((0.025, 0.975), abs=1e-12)
    # two groups: the replicates are averaged over the groups (a group with difference 0 halves them)
    same = auroc_difference([(a, b, positive), (a, a, positive)], n_boot=21)
    assert same.n == 2
    assert (same.value, same.low, same.high) == pytest.approx((19 / 40, 0.0125, 0.4875), abs=1e-12)
