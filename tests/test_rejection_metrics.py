"""Paper 004's worst-case metrics with rejection (Section 4.4, Eqs. 3-8): the clean image belongs to
the attack set ``A(x)`` (Section 3), so it joins every intersection and union, and the sets
``S_FC``, ``S_FW`` and ``R`` obey the identities that follow from their definitions."""

import math

import numpy as np
import pandas as pd
import pytest

from safespot.evaluation.rejection_metrics import (
    TABLE_KEYS,
    bootstrap_draws,
    bootstrap_metrics,
    calibrate_threshold,
    point_arrays,
    point_sets,
    rejection_metrics,
    with_clean,
    worst_case,
)
from safespot.stats import percentile_interval

N_DRAWS = 400


def _records(correct: np.ndarray, scores: np.ndarray, points: list[str], name: str = "r", view: str = "vote"):
    """A records table with one ``(correct, score)`` column pair per point set (rows of the arrays)."""
    columns: dict[str, np.ndarray] = {"index": np.arange(correct.shape[1])}
    for row, point in enumerate(points):
        columns[f"{name}_{point}_{view}/correct"] = correct[row]
        columns[f"{name}_{point}_{view}/score"] = scores[row]
    return pd.DataFrame(columns)


def _random_table(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Random correctness and scores for the clean image and 1-4 attacks on 1-40 images; scores
    on a coarse grid so that ties with the threshold occur."""
    n_images, n_attacks = int(rng.integers(1, 41)), int(rng.integers(1, 5))
    points = ["clean", *(f"atk{k}" for k in range(n_attacks))]
    correct = rng.random((len(points), n_images)) < rng.uniform(0.1, 0.9)
    scores = rng.integers(0, 11, (len(points), n_images)) / 10
    return correct, scores, points


def _same(a: dict[str, float], b: dict[str, float]) -> bool:
    """Equal metric dictionaries, NaN equal to NaN."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def _sets_by_definition(correct: np.ndarray, rejected: np.ndarray) -> tuple[set[int], set[int], set[int]]:
    """``S_FC``, ``S_FW`` and ``R`` of Eqs. 3, 4 and 8, image by image, over every row (point)."""
    n_points, n_images = correct.shape
    s_fc, s_fw, r = set(), set(), set()
    for i in range(n_images):
        points = range(n_points)
        if all(not rejected[p, i] and correct[p, i] for p in points):
            s_fc.add(i)
        if any(not rejected[p, i] and not correct[p, i] for p in points):
            s_fw.add(i)
        if any(rejected[p, i] for p in points):
            r.add(i)
    return s_fc, s_fw, r


def test_worst_case_identities_over_random_tables():
    """FC + FW <= 100, FC + MPR <= 100 and FC + |S_FW ∪ R| = 100 (S_FC, S_FW, R cover the test set
    and S_FC is disjoint from both); FC + FW + MPR may exceed 100 since S_FW and R may overlap."""
    rng = np.random.default_rng(20261122)
    overlapping = 0
    for _ in range(N_DRAWS):
        correct, scores, _ = _random_table(rng)
        rejected = scores < rng.uniform(0, 1.1)
        m = worst_case(correct, rejected)
        s_fc, s_fw, r = _sets_by_definition(correct, rejected)
        n = correct.shape[1]
        assert (m["fc"], m["fw"], m["mpr"]) == pytest.approx(
            (100 * len(s_fc) / n, 100 * len(s_fw) / n, 100 * len(r) / n)
        )
        assert m["fc"] + m["fw"] <= 100 + 1e-9 and m["fc"] + m["mpr"] <= 100 + 1e-9
        assert m["fc"] + 100 * len(s_fw | r) / n == pytest.approx(100)
        assert not s_fc & s_fw and not s_fc & r
        overlapping += m["fc"] + m["fw"] + m["mpr"] > 100 + 1e-9
    assert overlapping > 0  # as in paper 004's Table 1 (PGD-AT: 43.99 + 42.00 + 44.19)


def test_rejection_metrics_count_the_clean_image_in_every_set_over_random_tables():
    """On random record tables, FC/FW/MPR and Acc_adv,10% equal Eqs. 3-8 over the clean image and
    every attack at the calibrated threshold, whether the attacks are found in the records or passed
    without ``clean`` (as ``load_row`` does)."""
    rng = np.random.default_rng(7)
    for _ in range(N_DRAWS):
        correct, scores, points = _random_table(rng)
        records = _records(correct, scores, points)
        budget = float(rng.choice([0.0, 0.1, 0.25, 0.5]))
        m = rejection_metrics(records, "r", "vote", budget=budget)
        assert _same(m, rejection_metrics(records, "r", "vote", attacks=points[1:], budget=budget))
        s_fc, s_fw, r = _sets_by_definition(correct, scores < m["threshold"])
        n = correct.shape[1]
        assert m["fc"] == pytest.approx(100 * len(s_fc) / n)
        assert m["fw"] == pytest.approx(100 * len(s_fw) / n)
        assert m["mpr"] == pytest.approx(100 * len(r) / n)
        assert m["fc"] + m["fw"] <= 100 + 1e-9 and m["fc"] + m["mpr"] <= 100 + 1e-9
        assert m["fc"] + 100 * len(s_fw | r) / n == pytest.approx(100)
        # everything rejected when clean is in R: MPR is at least the share of rejected clean images
        assert m["mpr"] >= m["clean_rejected"] - 1e-9
        if s_fc or s_fw:
            assert m["acc_adv_rej"] == pytest.approx(100 * len(s_fc) / (len(s_fc) + len(s_fw)))
        # without rejection: correct at every point, the clean image included
        assert m["acc_adv_0"] == pytest.approx(100 * correct.all(0).mean())


def test_an_image_rejected_when_clean_counts_in_r_and_not_in_fc():
    # four images, two attacks; budget 25% of 4 images: one correct clean image may be rejected,
    # so the threshold is the second-lowest correct clean score, 0.8
    #   image 0: accepted and correct everywhere                          -> FC
    #   image 1: wrong and rejected when clean, accepted and wrong under both attacks -> FW and R
    #   image 2: correct but rejected when clean, accepted and correct under both attacks -> R only
    #   image 3: accepted when clean, accepted and wrong under attack a  -> FW
    points = ["clean", "a", "b"]
    correct = np.array([[1, 0, 1, 1], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=bool)
    scores = np.array([[0.9, 0.2, 0.3, 0.8], [0.9, 0.9, 0.9, 0.9], [0.9, 0.9, 0.9, 0.9]])
    records = _records(correct, scores, points)
    m = rejection_metrics(records, "r", "vote", budget=0.25)
    assert m["threshold"] == 0.8 and m["clean_rejected"] == 50.0 and m["clean_correct_rejected"] == 25.0
    # the attacks alone reject nothing and leave image 2 correct: without the clean image MPR
    # would be 0 and FC 50
    assert (m["fc"], m["fw"], m["mpr"]) == (25.0, 50.0, 50.0)
    assert m["fc"] + m["fw"] + m["mpr"] > 100  # image 1 lies in S_FW and R
    assert m["acc_adv_rej"] == pytest.approx(100 / 3)
    assert m["acc_adv_0"] == 50.0  # images 0 and 2 are correct at every point
    assert _same(rejection_metrics(records, "r", "vote", attacks=["a", "b"], budget=0.25), m)


def test_point_sets_put_the_clean_image_first():
    correct, scores = np.ones((3, 2), dtype=bool), np.ones((3, 2))
    records = _records(correct, scores, ["pgd", "clean", "pgd_ns"])
    assert point_sets(records, "r", "vote") == ["clean", "pgd", "pgd_ns"]
    assert with_clean(["a", "clean", "a", "b"]) == ["clean", "a", "b"]
    with pytest.raises(ValueError, match="no attacks"):
        rejection_metrics(_records(correct[:1], scores[:1], ["clean"]), "r", "vote")


def test_threshold_at_ten_percent_rejection_on_hand_built_scores_with_a_tie():
    """25 clean images, 19 correct with scores 0.1, 0.2, 0.3, 0.3, 0.5, ..., 6 wrong (scores 0.05
    and 0.9: rejecting wrong images costs nothing). ``test_set``: floor(0.1 * 25) = 2 correct images
    may be rejected, the threshold is the third-lowest correct score 0.3 and rejects 0.1 and 0.2
    (the tied 0.3s are accepted together, the score 0.3 itself is accepted). ``correct``:
    floor(0.1 * 19) = 1, threshold 0.2."""
    correct_scores = [0.1, 0.2, 0.3, 0.3] + [0.5 + 0.02 * i for i in range(15)]
    scores = np.array(correct_scores + [0.05] * 3 + [0.9] * 3)
    correct = np.arange(25) < 19
    assert calibrate_threshold(scores, correct, 0.10) == 0.3
    assert calibrate_threshold(scores, correct, 0.10, "correct") == 0.2
    points = ["clean", "a"]
    records = _records(np.stack([correct, correct]), np.stack([scores, np.full(25, 0.3)]), points)
    m = rejection_metrics(records, "r", "vote", budget=0.10)
    assert m["threshold"] == 0.3
    assert m["clean_correct_rejected"] == pytest.approx(100 * 2 / 25)
    assert m["clean_rejected"] == pytest.approx(100 * 5 / 25)  # and the three wrong images at 0.05
    assert m["acc_nat_rej"] == pytest.approx(100 * 17 / 20)  # 17 correct of the 20 accepted
    assert m["mpr"] == pytest.approx(100 * 5 / 25)  # attack a's points score 0.3: accepted


def test_the_bootstrap_recomputes_every_metric_on_each_resample_with_its_own_threshold():
    """Each replicate of :func:`bootstrap_metrics` is :func:`rejection_metrics` of the resampled
    records (the threshold recalibrated on the resample); the same draws resample every model, so
    two models with the same clean correctness have the same clean-accuracy replicates (paired)."""
    rng = np.random.default_rng(3)
    correct, scores, points = rng.random((3, 60)) < 0.6, rng.integers(0, 11, (3, 60)) / 10, ["clean", "a", "b"]
    records = _records(correct, scores, points)
    other = _records(correct, rng.random((3, 60)), points)  # other scores, same correctness
    draws = bootstrap_draws(60, 40, seed=0)
    assert draws.shape == (40, 60) and np.array_equal(draws, bootstrap_draws(60, 40, seed=0))
    samples = bootstrap_metrics(point_arrays(records, "r", "vote"), draws)
    for k in (0, 17, 39):
        expected = rejection_metrics(records.iloc[draws[k]], "r", "vote")
        assert np.allclose(samples[k], [expected[key] for key in TABLE_KEYS], equal_nan=True)
    again = bootstrap_metrics(point_arrays(other, "r", "vote"), draws)
    j = TABLE_KEYS.index("acc_nat_0")
    assert np.array_equal(samples[:, j], again[:, j])
    assert not np.array_equal(samples[:, TABLE_KEYS.index("acc_nat_rej")], again[:, TABLE_KEYS.index("acc_nat_rej")])
    with pytest.raises(ValueError, match="one column per image"):
        bootstrap_metrics(point_arrays(records, "r", "vote"), draws[:, :10])


def test_percentile_interval_leaves_out_undefined_replicates():
    """The 2.5% and 97.5% quantiles of the defined replicates (linear interpolation: 0.025 and
    0.975 on 0, 1); NaN replicates (Acc_adv,10% of a resample with nothing accepted) are left
    out, and an undefined statistic has no interval."""
    interval = percentile_interval(0.4, [0.0, np.nan, 1.0, np.nan])
    assert (interval.n, interval.value, interval.low, interval.high) == (2, 0.4, pytest.approx(0.025), 0.975)
    assert percentile_interval(np.nan, [0.1, 0.2]).n == 0
    assert percentile_interval(0.5, [np.nan, np.inf]).n == 0
