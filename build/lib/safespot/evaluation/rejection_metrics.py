"""Worst-case metrics of classifiers with rejection (Addepalli et al., 2021, "Boosting Adversarial
Robustness using Feature Level Stochastic Smoothing", paper 004, Section 4.4, Eqs. 3-8, Table 1).

For each test image ``i`` and each *point* ``x~`` of its attack set, the classifier either rejects
the point (``D(x~) = 1``: its confidence score is below the threshold) or accepts it and predicts a
class. The paper's attack set is ``A(x) = {x~ : ||x - x~||_inf <= delta}`` (Section 3), which
contains the clean image ``x`` itself; in practice (Eq. 5) it is replaced by the points actually
evaluated: **the clean image and the output of every attack of the ensemble**. With ``P_i`` those
points of image ``i``:

* ``S_FC = {i : D(x~) = 0 and C(x~) = y_i for every x~ in P_i}`` (flag correct, Eq. 3): accepted
  and correctly classified at every point, the clean image included (the intersection of Eq. 5);
* ``S_FW = {i : D(x~) = 0 and C(x~) != y_i for some x~ in P_i}`` (flag wrong, Eq. 4): accepted and
  misclassified at one point at least (the union of Eq. 5);
* ``R = {i : D(x~) = 1 for some x~ in P_i}`` (Eq. 8): rejected at one point at least, e.g. an image
  rejected when clean counts in ``R`` even if every attack's output is accepted;
* ``FC = |S_FC| / |X|``, ``FW = |S_FW| / |X|`` (Eq. 6), ``MPR = |R| / |X|`` (Eq. 8), in percent;
* ``Acc_adv,10% = |S_FC| / (|S_FC| + |S_FW|)`` (Eq. 7): worst-case accuracy on accepted images.

Every point is either rejected, or accepted and correct, or accepted and wrong, so an image not in
``S_FC`` lies in ``S_FW`` or in ``R``: ``S_FC``, ``S_FW`` and ``R`` cover the test set, ``S_FC`` is
disjoint from both others, and ``FC + |S_FW ∪ R| / |X| = 100``; hence ``FC + FW <= 100`` and
``FC + MPR <= 100``. ``S_FW`` and ``R`` may overlap (an image accepted and wrong under one attack and
rejected under another), so ``FC + FW + MPR`` may exceed 100, as in the paper's Table 1 (PGD-AT on
CIFAR-10: 43.99 + 42.00 + 44.19).

Earlier versions of this module left the clean image out of these sets (only the attacks' outputs
were intersected and united); that missed images rejected or misclassified when clean in ``R`` and
``S_FW`` and could count them in ``S_FC``.

The threshold (Section 4.4, "Selection of threshold for rejection") is calibrated on the clean
test images: the largest threshold such that at most 10% of the clean images are correctly
classified *and* rejected. The paper counts that 10% of the test set, which makes the number of
correctly classified images allowed to be rejected independent of the classifier's accuracy
(``reference="test_set"``, the default); ``reference="correct"`` counts 10% of the correctly
classified clean images instead (Stutz et al.'s convention for CCAT). An image is rejected when its
score is *strictly* below the threshold, so tied scores are accepted together.

Columns of Table 1: ``Acc_nat,NS`` and ``Acc_adv,NS`` are the accuracies of the no-sampling
classifier without rejection (``ns`` view), ``Acc_*,0%`` those of the chosen view without rejection
and ``Acc_*,10%`` those with the calibrated threshold (``Acc_nat,10%``: accuracy on the accepted
clean images). The ``Acc_adv`` columns are worst-case accuracies over the same points (clean image
and attacks): without rejection, the share of images classified correctly at every point. Inputs
are the per-image records of :class:`safespot.evaluation.rejection.RejectionEvaluation`.

Intervals (:func:`bootstrap_metrics`): the images are resampled with replacement and every metric
recomputed on the resample, the threshold recalibrated on it (the threshold is a function of the
test set, so its variation belongs in the interval); every row of a table takes the same resamples,
so differences between rows are paired. The reduced Table 1 is ``conf/reproduce/paper004.yaml``
(``safespot-reproduce run paper004``), rendered by :mod:`safespot.reproduce.tables.rejection`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from safespot.evaluation.rejection import VIEWS

REFERENCES: tuple[str, ...] = ("test_set", "correct")
CLEAN = "clean"  # the clean image's point set: x itself lies in A(x) (paper 004, Section 3)
THRESHOLDING = {"ns": "Confidence", "vote": "Maj. Vote", "mean": "Mean softmax"}
_REJECTION_TARGET = "RejectionEvaluation"
#: Table 1's metric columns, in its order (keys of :func:`rejection_metrics`)
TABLE_KEYS: tuple[str, ...] = (
    "acc_nat_ns",
    "acc_nat_0",
    "acc_nat_rej",
    "acc_adv_ns",
    "acc_adv_0",
    "acc_adv_rej",
    "fc",
    "fw",
    "mpr",
)


def calibrate_threshold(scores: Any, correct: Any, budget: float = 0.10, reference: str = "test_set") -> float:
    """The largest threshold ``t`` such that rejecting every clean image with score ``< t``
    rejects at most ``floor(budget * n_ref)`` correctly classified images (paper 004, Section
    4.4), ``n_ref`` the test-set size (``reference="test_set"``) or the number of correctly
    classified images (``"correct"``). ``-inf`` (nothing is rejected) when no clean image is
    classified correctly, ``inf`` when every correctly classified image may be rejected."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=bool).ravel()
    if scores.shape != correct.shape:
        raise ValueError(f"scores and correct must have the same length, got {scores.shape} and {correct.shape}")
    if not 0 <= budget <= 1:
        raise ValueError(f"budget must lie in [0, 1], got {budget}")
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {list(REFERENCES)}, got {reference!r}")
    right = np.sort(scores[correct])
    n_ref = len(scores) if reference == "test_set" else len(right)
    allowed = math.floor(budget * n_ref + 1e-9)
    if len(right) == 0:
        return -math.inf
    if allowed >= len(right):
        return math.inf
    return float(right[allowed])  # exactly the `allowed` lowest-scoring correct images lie strictly below


def worst_case(correct: Any, rejected: Any) -> dict[str, float]:
    """Eqs. 3-8 from ``(n_points, n_images)`` boolean arrays (correct prediction, rejected), one row
    per evaluated point of ``A(x)``; callers include the clean image's row (see
    :func:`rejection_metrics`). Returns ``fc`` (accepted and correct at every point, Eq. 3), ``fw``
    (accepted and wrong at one point at least, Eq. 4), ``mpr`` (rejected at one point at least,
    Eq. 8) and ``acc`` (Eq. 7), all in percent of the images; ``acc`` is NaN when ``S_FC`` and
    ``S_FW`` are both empty. ``fc + fw <= 100`` and ``fc + mpr <= 100``; ``fw + mpr`` may exceed
    ``100 - fc`` when ``S_FW`` and ``R`` overlap."""
    correct = np.atleast_2d(np.asarray(correct, dtype=bool))
    rejected = np.atleast_2d(np.asarray(rejected, dtype=bool))
    if correct.shape != rejected.shape:
        raise ValueError(f"correct and rejected must have the same shape, got {correct.shape} and {rejected.shape}")
    n = correct.shape[1]
    accepted = ~rejected
    flag_correct = (accepted & correct).all(0)  # Eq. 3 / 5: intersection over the points
    flag_wrong = (accepted & ~correct).any(0)  # Eq. 4 / 5: union over the points
    rejected_any = rejected.any(0)  # Eq. 8
    fc, fw = int(flag_correct.sum()), int(flag_wrong.sum())
    return {
        "fc": 100.0 * fc / n if n else math.nan,
        "fw": 100.0 * fw / n if n else math.nan,
        "mpr": 100.0 * float(rejected_any.sum()) / n if n else math.nan,
        "acc": 100.0 * fc / (fc + fw) if fc + fw else math.nan,
    }


def point_sets(records: pd.DataFrame, name: str, view: str) -> list[str]:
    """The point sets recorded by the rejection evaluation ``name`` under ``view``: ``clean``
    first (``x`` lies in ``A(x)``, paper 004, Section 3), then every attack's outputs."""
    head, tail = f"{name}_", f"_{view}/correct"
    found = [c[len(head) : -len(tail)] for c in records.columns if c.startswith(head) and c.endswith(tail)]
    return with_clean(found)


def with_clean(points: Sequence[str]) -> list[str]:
    """``points`` with the clean image's point set first (added when missing, never twice): the
    sets of Eqs. 3-8 are over ``A(x)``, which contains ``x``."""
    return [CLEAN, *(p for p in dict.fromkeys(points) if p != CLEAN)]


def _column(records: pd.DataFrame, name: str, point: str, view: str, field: str) -> np.ndarray:
    key = f"{name}_{point}_{view}/{field}"
    if key not in records:
        raise KeyError(f"records have no column {key!r}")
    return records[key].to_numpy()


@dataclass(frozen=True)
class PointArrays:
    """One model's records as arrays, one row per point of ``A(x)`` (the clean image first), one
    column per image: correctness and score under the chosen view, and correctness under the
    no-sampling view (``None`` when the run has none)."""

    correct: np.ndarray
    scores: np.ndarray
    ns_correct: np.ndarray | None

    def take(self, images: np.ndarray) -> PointArrays:
        """The arrays of the images ``images`` (indices, repeats allowed: a bootstrap resample)."""
        ns = None if self.ns_correct is None else self.ns_correct[:, images]
        return PointArrays(self.correct[:, images], self.scores[:, images], ns)


def point_arrays(
    records: pd.DataFrame,
    name: str = "rejection",
    view: str = "vote",
    attacks: Sequence[str] | None = None,
    ns_view: str = "ns",
) -> PointArrays:
    """:class:`PointArrays` of one rejection evaluation's records. ``attacks`` defaults to every
    attacked point set recorded; the clean image's point set is always added to them, first (Eqs.
    3-8 are over ``A(x)``, which contains ``x``)."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {list(VIEWS)}, got {view!r}")
    points = with_clean(attacks if attacks is not None else point_sets(records, name, view))
    if len(points) < 2:
        raise ValueError(f"no attacks recorded for evaluation {name!r} under view {view!r}")
    correct = np.stack([_column(records, name, p, view, "correct").astype(bool) for p in points])
    scores = np.stack([_column(records, name, p, view, "score").astype(np.float64) for p in points])
    ns = None
    if f"{name}_clean_{ns_view}/correct" in records:
        ns = np.stack([_column(records, name, p, ns_view, "correct").astype(bool) for p in points])
    return PointArrays(correct, scores, ns)


def metrics_of(arrays: PointArrays, budget: float = 0.10, reference: str = "test_set") -> dict[str, float]:
    """Table 1's metrics of :func:`rejection_metrics` from :class:`PointArrays`, the threshold
    calibrated on these images' clean scores (Section 4.4)."""
    clean_correct, clean_score = arrays.correct[0], arrays.scores[0]
    threshold = calibrate_threshold(clean_score, clean_correct, budget, reference)
    clean_rejected = clean_score < threshold
    accepted = ~clean_rejected
    with_rejection = worst_case(arrays.correct, arrays.scores < threshold)
    without = worst_case(arrays.correct, np.zeros_like(arrays.correct))
    n = arrays.correct.shape[1]
    out = {
        "n_images": float(n),
        "threshold": threshold,
        "acc_nat_0": 100.0 * clean_correct.mean() if n else math.nan,
        "acc_nat_rej": 100.0 * (clean_correct & accepted).sum() / accepted.sum() if accepted.any() else math.nan,
        "acc_adv_0": without["acc"],
        "acc_adv_rej": with_rejection["acc"],
        "fc": with_rejection["fc"],
        "fw": with_rejection["fw"],
        "mpr": with_rejection["mpr"],
        "clean_rejected": 100.0 * clean_rejected.mean() if n else math.nan,
        "clean_correct_rejected": 100.0 * (clean_rejected & clean_correct).mean() if n else math.nan,
        "acc_nat_ns": math.nan,
        "acc_adv_ns": math.nan,
    }
    if arrays.ns_correct is not None:
        out["acc_nat_ns"] = 100.0 * arrays.ns_correct[0].mean() if n else math.nan
        out["acc_adv_ns"] = worst_case(arrays.ns_correct, np.zeros_like(arrays.ns_correct))["acc"]
    return out


def rejection_metrics(
    records: pd.DataFrame,
    name: str = "rejection",
    view: str = "vote",
    attacks: Sequence[str] | None = None,
    budget: float = 0.10,
    reference: str = "test_set",
    ns_view: str = "ns",
) -> dict[str, float]:
    """Paper 004's Table 1 metrics for one model from its per-image records (percentages).

    Returns ``acc_nat_ns``, ``acc_nat_0``, ``acc_nat_rej``, ``acc_adv_ns``, ``acc_adv_0``,
    ``acc_adv_rej``, ``fc``, ``fw``, ``mpr`` (Eqs. 3-8 at the calibrated threshold), ``threshold``,
    ``clean_rejected`` and ``clean_correct_rejected`` (percent of the test set) and ``n_images``.
    ``attacks`` defaults to every attacked point set recorded; the clean image's point set is
    always added to them (Eqs. 3-8 are over ``A(x)``, which contains ``x``), so the worst-case
    columns (``acc_adv_*``, ``fc``, ``fw``, ``mpr``) count an image rejected or misclassified when
    clean like one rejected or misclassified under an attack. ``*_ns`` columns are NaN without an
    ``ns`` view.
    """
    return metrics_of(point_arrays(records, name, view, attacks, ns_view), budget, reference)


def bootstrap_draws(n_images: int, replicates: int, seed: int) -> np.ndarray:
    """``(replicates, n_images)`` image indices drawn with replacement from ``default_rng(seed)``:
    one resample of the test images per row; the same draws serve every model of a table, so
    the models' differences are paired."""
    if n_images < 1 or replicates < 1:
        raise ValueError(f"a bootstrap needs images and replicates, got {n_images} and {replicates}")
    return np.random.default_rng(seed).integers(0, n_images, size=(replicates, n_images))


def bootstrap_metrics(
    arrays: PointArrays, draws: np.ndarray, budget: float = 0.10, reference: str = "test_set"
) -> np.ndarray:
    """``(replicates, len(TABLE_KEYS))``: Table 1's metrics of one model on each resample of
    ``draws`` (:func:`bootstrap_draws`), the threshold recalibrated on every resample, so the
    interval includes the threshold's own variation. Percentile intervals of the columns:
    :func:`safespot.stats.percentile_interval`."""
    n = arrays.correct.shape[1]
    if draws.ndim != 2 or draws.shape[1] != n:
        raise ValueError(f"draws must have one column per image ({n}), got shape {draws.shape}")
    rows = []
    for images in draws:
        metrics = metrics_of(arrays.take(images), budget, reference)
        rows.append([metrics[k] for k in TABLE_KEYS])
    return np.asarray(rows, dtype=float).reshape(len(draws), len(TABLE_KEYS))


@dataclass
class TableRow:
    """One row of the Table 1 layout: a label, the records of one evaluation run and the view."""

    label: str
    records: pd.DataFrame
    name: str = "rejection"
    view: str = "vote"
    attacks: Sequence[str] | None = None

    def arrays(self) -> PointArrays:
        return point_arrays(self.records, self.name, self.view, self.attacks)


def table_columns(budget: float = 0.10) -> list[str]:
    rej = f"{budget * 100:g}%"
    accs = [f"Acc_{s},{c}" for s in ("nat", "adv") for c in ("NS", "0%", rej)]
    return ["Method", "Thresholding", *accs, "FC", "FW", "MPR"]


def rejection_table(rows: Sequence[TableRow], budget: float = 0.10, reference: str = "test_set") -> pd.DataFrame:
    """Paper 004's Table 1 layout: one row per model (e.g. PGD-AT and TRADES with confidence
    thresholding, FLSS with SD = 1 and 2), percentages."""
    table = []
    for row in rows:
        metrics = rejection_metrics(row.records, row.name, row.view, row.attacks, budget, reference)
        table.append([row.label, THRESHOLDING[row.view], *(metrics[k] for k in TABLE_KEYS)])
    return pd.DataFrame(table, columns=table_columns(budget))


# --- reading evaluation runs ----------------------------------------------------------------
def rejection_evaluations(meta: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: config}`` of the rejection evaluations recorded in a run's ``results.json`` meta."""
    found = {}
    for key, entry in (meta.get("evaluation_config") or {}).items():
        if isinstance(entry, Mapping) and str(entry.get("_target_", "")).endswith(_REJECTION_TARGET):
            found[str(entry.get("name", key))] = dict(entry)
    return found


def row_of(
    label: str, records: pd.DataFrame, meta: Mapping[str, Any], view: str | None = None, name: str | None = None
) -> TableRow:
    """A :class:`TableRow` from an evaluation's records and its ``results.json`` meta: the rejection
    evaluation it ran (``name``, required when it ran several), its attacks (the no-sampling ones
    too) and ``view`` (default ``vote`` when recorded, else ``ns``)."""
    evaluations = rejection_evaluations(meta)
    if name is None:
        if len(evaluations) != 1:
            raise ValueError(f"expected one rejection evaluation, found {sorted(evaluations) or 'none'}; name one")
        name = next(iter(evaluations))
    config = evaluations.get(name, {})
    views = list(config.get("views") or VIEWS)
    view = view or ("vote" if "vote" in views else "ns")
    attacks = [k for k, v in (config.get("attacks") or {}).items() if v is not None] if config else None
    ns = config.get("attack_ns") if config else None
    if attacks is not None and ns:
        attacks += [f"{a}_ns" for a in (attacks if ns is True else ns)]
    return TableRow(label, records, name, view, attacks or None)


def load_row(label: str, run_dir: str | Path, view: str | None = None, name: str | None = None) -> TableRow:
    """:func:`row_of` an evaluation run directory (``records.csv`` + ``results.json``)."""
    run_dir = Path(run_dir)
    results_file, records_file = run_dir / "results.json", run_dir / "records.csv"
    if not results_file.is_file() or not records_file.is_file():
        raise FileNotFoundError(f"{run_dir} holds no results.json and records.csv of an evaluation run")
    meta = json.loads(results_file.read_text()).get("meta", {})
    try:
        return row_of(label, pd.read_csv(records_file), meta, view, name)
    except ValueError as err:
        raise ValueError(f"{run_dir}: {err}") from err
