"""Sections of reproductions with rejection (paper 004, Table 1) and of their training runs.

The spec names its Table 1 rows once, in ``rejection_rows`` (``KEY: {label, evaluation, view}``;
``view``: ``ns`` for confidence thresholding of the no-sampling output, ``vote`` for the majority
vote), and the bootstrap in ``bootstrap: {replicates, seed}``. Sections:

- ``rejection_table``: Table 1 (:func:`safespot.evaluation.rejection_metrics.rejection_metrics`)
  for the rows ``rows``, every cell with its 95% percentile bootstrap interval
  (:func:`safespot.evaluation.rejection_metrics.bootstrap_metrics`: images resampled, the threshold
  recalibrated on every resample, the same resamples for every row).
- ``rejection_claims``: the paper's claims on a metric of two rows, ``a`` minus ``b`` on the same
  resamples (paired), verdicts as :mod:`safespot.reproduce.claims` gives them (``kind``,
  ``margin``, the spec's smallest effect; ``direction: lower`` for a metric where lower is
  better, e.g. FW: verdict and size on ``b`` minus ``a``); ``paper`` the paper's ``a`` minus ``b``.
- ``rejection_points``: each row's accuracy at every point of the attack set, its worst case,
  the median clean score and the images correct when clean that exactly one point breaks.
- ``rejection_ensemble``: the attack set of each evaluation of the rows, as its records hold it
  (the attack configs of its ``results.json``), so a row's ensemble is read, never assumed.
- ``training_table``: training runs (command, epochs, wall time, validation accuracy, the
  checkpoint their evaluations scored and its epoch) with a note when the evaluated models'
  budgets differ or an evaluation of the spec has no records yet.
- ``training_curve``: one training run's logged metrics per epoch.

A row or claim whose evaluation has no records yet renders as not measured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from safespot.evaluation.rejection_metrics import (
    TABLE_KEYS,
    THRESHOLDING,
    TableRow,
    bootstrap_draws,
    bootstrap_metrics,
    metrics_of,
    point_sets,
    rejection_evaluations,
    row_of,
    table_columns,
    with_clean,
)
from safespot.reproduce.claims import ClaimResult, claim_verdict, size_verdict
from safespot.reproduce.evidence import Evidence
from safespot.reproduce.sections import MISSING, context, section
from safespot.reproduce.spec import SpecError
from safespot.stats import MeanInterval, accuracy, percentile_interval
from safespot.utils.tables import markdown_table

#: the share of the test set allowed to be correctly classified and rejected (paper 004, Section 4.4)
BUDGET = 0.10
NOT_MEASURED = "not measured (no records)"
CHECKPOINT_EPOCH = re.compile(r"epoch=?(\d+)")
CHECKPOINT_COLUMN = "Evaluated checkpoint: epoch, val/acc / val/robust_acc"


# --- rows and their bootstrap ------------------------------------------------------------------
@dataclass(frozen=True)
class RowSpec:
    key: str
    label: str
    evaluation: str
    view: str


def row_spec(evidence: Evidence, key: str) -> RowSpec:
    rows = evidence.spec.settings.get("rejection_rows") or {}
    if key not in rows:
        raise SpecError(f"{evidence.spec.name}: no rejection row {key!r} (rejection_rows: {sorted(rows)})")
    entry = rows[key]
    evaluation = str(entry["evaluation"])
    if evaluation not in evidence.spec.evaluations:
        raise SpecError(f"{evidence.spec.name}: rejection row {key!r} names no evaluation of the spec: {evaluation!r}")
    return RowSpec(key, str(entry.get("label", key)), evaluation, str(entry.get("view", "vote")))


def table_row(evidence: Evidence, spec: RowSpec) -> TableRow:
    """The records of a row's evaluation (sorted by image) as a Table 1 row."""
    records = evidence.records(spec.evaluation).copy().reset_index()  # copy: one block, not many columns
    return row_of(spec.label, records, evidence.meta(spec.evaluation), spec.view)


class Bootstrap:
    """Table 1's metrics of the rows of one evidence and their bootstrap replicates, computed once
    per row; every row is resampled with the same draws (its images must be the first row's)."""

    def __init__(self, evidence: Evidence) -> None:
        self.evidence = evidence
        settings = evidence.spec.settings.get("bootstrap") or {}
        self.replicates, self.seed = int(settings.get("replicates", 1000)), int(settings.get("seed", 0))
        self.images: pd.Index | None = None
        self.cache: dict[str, tuple[dict[str, float], np.ndarray]] = {}

    def of(self, spec: RowSpec) -> tuple[dict[str, float], np.ndarray]:
        """``(metrics, replicates)`` of a row: its Table 1 metrics and ``(replicates, TABLE_KEYS)``."""
        if spec.key not in self.cache:
            row = table_row(self.evidence, spec)
            images = pd.Index(row.records["index"])
            if self.images is None:
                self.images = images
            elif not images.equals(self.images):
                raise SpecError(
                    f"{self.evidence.spec.name}: rejection row {spec.key!r} is not on the other rows' images"
                )
            arrays = row.arrays()
            draws = bootstrap_draws(len(images), self.replicates, self.seed)
            self.cache[spec.key] = (metrics_of(arrays, BUDGET), bootstrap_metrics(arrays, draws, BUDGET))
        return self.cache[spec.key]


def bootstrap(evidence: Evidence) -> Bootstrap:
    """The evidence's :class:`Bootstrap` (one per rendering, shared by its sections)."""
    found = getattr(evidence, "_rejection_bootstrap", None)
    if found is None:
        found = Bootstrap(evidence)
        evidence._rejection_bootstrap = found  # type: ignore[attr-defined]
    return found


def interval_cell(interval: MeanInterval) -> str:
    """``"52.8 [48.2, 57.0]"`` (percent, one decimal, rounded), ``–`` without an interval."""
    if not interval.n:
        return MISSING
    return f"{interval.value:.1f} [{interval.low:.1f}, {interval.high:.1f}]"


@section("rejection_table")
def rejection_table_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """Table 1 with a bootstrap interval per cell; rows without records listed below it."""
    rows, missing = [], []
    for key in spec_section["rows"]:
        spec = row_spec(evidence, key)
        if not evidence.has(spec.evaluation):
            rows.append([spec.label, THRESHOLDING[spec.view], *[MISSING] * len(TABLE_KEYS)])
            missing.append(f"{spec.label} (`{spec.evaluation}`)")
            continue
        metrics, samples = bootstrap(evidence).of(spec)
        cells = [interval_cell(percentile_interval(metrics[k], samples[:, j])) for j, k in enumerate(TABLE_KEYS)]
        rows.append([spec.label, THRESHOLDING[spec.view], *cells])
    lines = _head(evidence, spec_section)
    lines.append(markdown_table(pd.DataFrame(rows, columns=table_columns(BUDGET))))
    if missing:
        lines += [f"Not measured (no records yet): {', '.join(missing)}.", ""]
    return lines


def _head(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    lines = [str(spec_section["title"]).strip(), ""] if spec_section.get("title") else []
    notes = [str(n).strip().format_map(context(evidence)) for n in spec_section.get("notes") or ()]
    return [*lines, *notes, *([""] if notes else [])]


# --- claims ------------------------------------------------------------------------------------
def rejection_claim(evidence: Evidence, claim: dict[str, Any]) -> ClaimResult | None:
    """One claim on Table 1's ``metric`` of rows ``a`` and ``b`` (see the module docstring);
    ``None`` when a row's evaluation has no records yet."""
    a, b = row_spec(evidence, claim["a"]), row_spec(evidence, claim["b"])
    metric = str(claim["metric"])
    if metric not in TABLE_KEYS:
        raise SpecError(f"claim {claim['text']!r}: metric must be one of {list(TABLE_KEYS)}, got {metric!r}")
    if not (evidence.has(a.evaluation) and evidence.has(b.evaluation)):
        return None
    j = TABLE_KEYS.index(metric)
    (point_a, samples_a), (point_b, samples_b) = bootstrap(evidence).of(a), bootstrap(evidence).of(b)
    shown = percentile_interval(point_a[metric] - point_b[metric], samples_a[:, j] - samples_b[:, j])
    difference = MeanInterval(shown.n, shown.value / 100, shown.low / 100, shown.high / 100)
    direction = str(claim.get("direction", "higher"))
    if direction not in ("higher", "lower"):
        raise SpecError(f"claim {claim['text']!r}: direction must be higher or lower, got {direction!r}")
    paper = None if claim.get("paper") is None else float(claim["paper"])
    judged, judged_paper = difference, paper
    if direction == "lower":  # "a lowers the metric": verdict and size on b minus a
        judged = MeanInterval(difference.n, -difference.value, -difference.high, -difference.low)
        judged_paper = None if paper is None else -paper
    kind, margin = str(claim.get("kind", "superiority")), float(claim.get("margin", 0.0))
    word = claim_verdict(judged, kind, margin, evidence.spec.smallest_effect)  # type: ignore[arg-type]
    size = size_verdict(judged, judged_paper)  # type: ignore[arg-type]
    return ClaimResult(str(claim["text"]), difference, word, paper, size)  # type: ignore[arg-type]


def not_measured(claim: dict[str, Any]) -> dict[str, str]:
    """The row of a claim whose evaluations have no records yet."""
    paper = MISSING if claim.get("paper") is None else f"{float(claim['paper']):+.2f}"
    row = {"Claim (same images)": str(claim["text"]), "Difference [95% CI]": MISSING, "Verdict": NOT_MEASURED}
    return {**row, "Paper": paper, "Size vs paper": MISSING}


@section("rejection_claims")
def rejection_claims_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    results = [(claim, rejection_claim(evidence, claim)) for claim in spec_section["claims"]]
    rows = [not_measured(claim) if result is None else result.row() for claim, result in results]
    return [*_head(evidence, spec_section), markdown_table(pd.DataFrame(rows)), ""]


# --- the points of the attack set --------------------------------------------------------------
def point_flags(row: TableRow) -> dict[str, np.ndarray]:
    """Per point of the row's attack set (the clean image first), its per-image correctness
    under the row's view."""
    points = with_clean(row.attacks or point_sets(row.records, row.name, row.view))
    return {p: row.records[f"{row.name}_{p}_{row.view}/correct"].to_numpy().astype(bool) for p in points}


def point_cells(row: TableRow, points: list[str]) -> list[str]:
    """A row's column of :func:`rejection_points_section`."""
    flags = point_flags(row)
    cells = [accuracy(flags[p]).percent() if p in flags else MISSING for p in points]
    stacked = np.stack(list(flags.values()))
    clean_score = row.records[f"{row.name}_clean_{row.view}/score"].to_numpy(dtype=float)
    broken_once = int((stacked[0] & ((~stacked).sum(0) == 1)).sum())
    worst = accuracy(stacked.all(0)).percent()
    return [*cells, worst, f"{np.median(clean_score):.2f}", f"{broken_once} of {len(row.records)}"]


@section("rejection_points")
def rejection_points_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """Per row (with records): accuracy (Wilson interval) at each point of the attack set and at
    the worst case over them (no rejection), the median clean score and the images correct when
    clean that exactly one of the points breaks."""
    specs = [row_spec(evidence, key) for key in spec_section["rows"]]
    rows = {s: table_row(evidence, s) for s in specs if evidence.has(s.evaluation)}
    points = with_clean([p for row in rows.values() for p in point_flags(row)])
    table = {"Point": [*points, "worst case", "median clean score", "broken at one point only"]}
    table |= {f"{s.label}, {s.view}": point_cells(row, points) for s, row in rows.items()}
    return [*_head(evidence, spec_section), markdown_table(pd.DataFrame(table)), ""]


# --- the attack sets ---------------------------------------------------------------------------
def describe_attack(config: dict[str, Any]) -> str:
    """An attack config of the records in a few words, e.g. ``PGD-100, cw`` or ``GAMA-MT-100, 9 targets``."""
    kind = str(config.get("_target_", "")).rsplit(".", 1)[-1]
    steps = config.get("steps")
    if kind == "PGD":
        words = [f"PGD-{steps}", str(config.get("loss", "ce"))]
        words += [f"EOT {config['eot']}"] if int(config.get("eot") or 1) > 1 else []
        return ", ".join(words + ([f"{config['restarts']} restarts"] if int(config.get("restarts") or 1) > 1 else []))
    if kind == "AutoAttack":
        members = "+".join(str(a).upper() for a in config.get("attacks") or [f"AutoAttack {config.get('version')}"])
        words = [members, f"{config.get('n_iter')} iterations"]
        rand = config.get("version") == "rand" and int(config.get("eot_iter") or 1) > 1
        return ", ".join(words + ([f"EOT {config['eot_iter']}"] if rand else []))
    if kind == "GAMA":
        targets = config.get("n_targets")
        return f"GAMA-MT-{steps}, {targets} targets" if targets else f"GAMA-PGD-{steps}"
    if kind == "MultiTargetedPGD":
        return f"MT-PGD-{steps}, {config.get('n_targets')} targets"
    return kind or "?"


def attack_set(evidence: Evidence, evaluation: str) -> str:
    """The attack set of an evaluation's records: each attack key with its description, then the
    attacks that also ran on the no-sampling classifier ``C(x, 0)``."""
    found = rejection_evaluations(evidence.meta(evaluation))
    if len(found) != 1:
        raise SpecError(
            f"{evidence.spec.name}: evaluation {evaluation!r} ran {len(found)} rejection evaluations, not one"
        )
    (config,) = found.values()
    attacks = {k: v for k, v in (config.get("attacks") or {}).items() if v is not None}
    listed = ", ".join(f"`{k}` ({describe_attack(v)})" for k, v in attacks.items())
    ns = config.get("attack_ns")
    ns_keys = list(attacks) if ns is True else list(ns or [])
    return listed + (f"; on C(x, 0): {', '.join(f'`{k}_ns`' for k in ns_keys)}" if ns_keys else "")


@section("rejection_ensemble")
def rejection_ensemble_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """``rows``: Table 1 rows; one line per evaluation of them (in their order), its attack set as
    its records hold it (:func:`attack_set`), or not measured."""
    rows: dict[str, list[str]] = {}
    for key in spec_section["rows"]:
        spec = row_spec(evidence, key)
        rows.setdefault(spec.evaluation, []).append(spec.label)
    table = []
    for evaluation, labels in rows.items():
        found = attack_set(evidence, evaluation) if evidence.has(evaluation) else NOT_MEASURED
        table.append({"Evaluation": f"`{evaluation}`", "Rows": "; ".join(dict.fromkeys(labels)), "Attack set": found})
    return [*_head(evidence, spec_section), markdown_table(pd.DataFrame(table)), ""]


# --- training runs -----------------------------------------------------------------------------
def epochs_of(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per trained epoch, the last logged value of every column (the test step's row, logged after
    the last epoch, left out)."""
    train = [c for c in metrics.columns if c.startswith(("train/", "val/"))]
    logged = metrics.dropna(subset=train, how="all")
    return logged.groupby("epoch")[train].last().sort_index()


def training_command(evidence: Evidence, key: str) -> str | None:
    """The overrides the training run ran with: its log line's, else its stored ones."""
    for entry in evidence.log:
        if entry.get("key") == f"train/{key}":
            return entry["command"].split("train.py", 1)[1].strip()
    stored = evidence.overrides("train", key)
    return None if stored is None else " ".join(stored)


def run_minutes(evidence: Evidence, key: str) -> str:
    minutes = [e.get("minutes") for e in evidence.log if e.get("key") == f"train/{key}"]
    return f"{minutes[-1]:.1f} min" if minutes and isinstance(minutes[-1], int | float) else MISSING


def evaluated_checkpoint(evidence: Evidence, run: str) -> tuple[str, list[str]] | None:
    """``(checkpoint file name, evaluations)``: the checkpoint the evaluations of ``run`` with
    records scored (their ``results.json``), checked against the run's kept checkpoints; ``None``
    when no evaluation of it has records. Evaluations of one run that scored different checkpoints,
    or a checkpoint the run's records do not keep, are an error: the report would name the wrong
    training."""
    scored = {}
    for key, evaluation in evidence.spec.evaluations.items():
        if evaluation.run == run and evidence.has(key):
            scored[key] = Path(str(evidence.meta(key).get("ckpt_path", ""))).name
    if not scored:
        return None
    names = set(scored.values())
    if len(names) > 1:
        raise SpecError(f"{evidence.spec.name}: the evaluations of run {run!r} scored different checkpoints: {scored}")
    (name,) = names
    kept = evidence.train_dir(run) / "checkpoints"
    if kept.is_dir() and not (kept / name).is_file():
        raise SpecError(
            f"{evidence.spec.name}: {sorted(scored)} scored {name!r}, which run {run!r} does not keep "
            f"({sorted(p.name for p in kept.glob('*.ckpt'))}): not that run's checkpoint"
        )
    return name, sorted(scored)


def _pct(value: float) -> str:
    return MISSING if not np.isfinite(value) else f"{100 * value:.1f}"


def training_row(evidence: Evidence, key: str, label: str) -> dict[str, str]:
    """One run's row of :func:`training_table_section`."""
    epochs = epochs_of(evidence.training_metrics(key))
    n = len(epochs)
    last = epochs.iloc[-1]
    best_epoch = epochs["val/acc"].idxmax()
    row = {
        "Model": label,
        "Overrides": f"`{training_command(evidence, key) or MISSING}`",
        "Epochs": str(n),
        "Wall": run_minutes(evidence, key),
        "val/acc, last epoch": _pct(last.get("val/acc", np.nan)),
        "val/acc, best (epoch)": f"{_pct(epochs['val/acc'].max())} ({int(best_epoch) + 1})",
        "val/robust_acc, last epoch": _pct(last.get("val/robust_acc", np.nan)),
    }
    row[CHECKPOINT_COLUMN] = checkpoint_cell(evidence, key, epochs)
    return row


def checkpoint_cell(evidence: Evidence, key: str, epochs: pd.DataFrame) -> str:
    """The checkpoint a run's evaluations scored (:func:`evaluated_checkpoint`), or, when none has
    records, the best one the run keeps (marked "kept, not evaluated"): its epoch of the run's
    epochs and its validation accuracies."""
    scored = evaluated_checkpoint(evidence, key)
    name, prefix = (scored[0], "") if scored is not None else (None, "kept, not evaluated: ")
    if name is None:
        kept = sorted((evidence.train_dir(key) / "checkpoints").glob("best-*.ckpt"))
        if not kept:
            return MISSING
        name = kept[-1].name
    found = CHECKPOINT_EPOCH.search(name)
    epoch = int(found[1]) if found else None
    if epoch is None or epoch not in epochs.index:
        return f"{prefix}{name}"
    at = epochs.loc[epoch]
    return f"{prefix}{epoch + 1} of {len(epochs)}: {_pct(at['val/acc'])} / {_pct(at['val/robust_acc'])}"


@section("training_table")
def training_table_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """``runs: {RUN: label}``; ``columns`` (optional) keeps those columns only; ``budget_note``
    adds which budgets the evaluated models had and which evaluations have no records yet, with
    ``missing_command`` (the command that adds them)."""
    runs = dict(spec_section["runs"])
    unknown = [k for k in runs if k not in evidence.spec.runs]
    if unknown:
        raise SpecError(f"{evidence.spec.name}: training_table names runs the spec does not have: {unknown}")
    present = {k: v for k, v in runs.items() if (evidence.train_dir(k)).is_dir()}
    table = pd.DataFrame([training_row(evidence, k, v) for k, v in present.items()])
    if spec_section.get("columns"):
        table = table[["Model", *spec_section["columns"]]]
    lines = [*_head(evidence, spec_section), markdown_table(table), ""]
    if spec_section.get("budget_note"):
        lines += budget_note(evidence, runs, str(spec_section.get("missing_command", "")).strip())
    return lines


def budget_note(evidence: Evidence, runs: dict[str, str], command: str) -> list[str]:
    """Which training budgets (epochs, from each run's metrics) the evaluated models had, and the
    evaluations of the spec on these runs that have no records yet (with the command that runs them)."""
    budgets, missing = {}, []
    for key, label in runs.items():
        evaluations = [e for e, ev in evidence.spec.evaluations.items() if ev.run == key]
        epochs = len(epochs_of(evidence.training_metrics(key))) if evidence.train_dir(key).is_dir() else None
        if any(evidence.has(e) for e in evaluations):
            budgets[label] = epochs
        absent = [f"`{e}`" for e in evaluations if not evidence.has(e)]
        if absent:
            trained = f", {epochs} epochs" if epochs is not None else ""
            missing.append(f"{', '.join(absent)} (run `{key}`{trained})")
    lines = []
    if len(set(budgets.values())) > 1:
        listed = "; ".join(f"{label}: {n} epochs" for label, n in budgets.items())
        lines.append(f"The evaluated models trained for different numbers of epochs ({listed}).")
    if missing:
        lines.append(
            f"No records yet of the evaluations {'; '.join(missing)}: their rows are not measured."
            + (f" `{command}` runs them (kept checkpoints are evaluated, not retrained)." if command else "")
        )
    return [" ".join(lines), ""] if lines else []


@section("training_curve")
def training_curve_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """``run``: a training run; ``columns: {metric: heading}``: its logged metrics per epoch
    (accuracies in percent, losses with two decimals)."""
    epochs = epochs_of(evidence.training_metrics(str(spec_section["run"])))
    columns = dict(spec_section["columns"])
    absent = [c for c in columns if c not in epochs]
    if absent:
        raise SpecError(f"{evidence.spec.name}: run {spec_section['run']!r} logged no {absent}")
    table = pd.DataFrame({"Epoch": [str(int(e) + 1) for e in epochs.index]})
    for column, heading in columns.items():
        values = epochs[column].to_numpy(dtype=float)
        shown = [_pct(v) if column.endswith("acc") else (MISSING if not np.isfinite(v) else f"{v:.2f}") for v in values]
        table[heading] = shown
    return [*_head(evidence, spec_section), markdown_table(table), ""]
