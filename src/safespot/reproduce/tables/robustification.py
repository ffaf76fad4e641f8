"""Sections of the robustification reproductions (paper 000 Table 1, paper 002 Tables 1 and 2).

- ``robustification_grid``: paper 002's layout, a row per model and robustifier (None, S-FGSM,
  S-PGD, S-Full) with the accuracies of the robustified images under each attack and their
  Wilson intervals, and the safe-spot rate.
- ``safe_spot_grid``: paper 000's layout, a row per model, "clean / grey-box PGD" per robustifier.

Both take ``preemptions`` ({evaluation name: label}, default :data:`safespot.report.PREEMPTIONS`):
the robustifiers shown and their order, e.g. paper 000's S-Full column from the search started
at x_o (``preempt_sfull_xo``) where paper 002's grid shows the random start (``preempt_sfull``).
- ``validation_choice``: a setting chosen on validation images (held-out training images,
  ``data.eval_split=val``): the candidates' validation accuracies, the choice, and a check that the
  test evaluation ran with the chosen value. The setting is read from the evaluation's stored
  config (``source: evaluation_config``, e.g. a robustifier's beta) or from the evaluated model's
  (``source: model_config``, e.g. a training run's ``backbone.diag_init``).
- ``claims_verdicts``: the ``claims`` table followed by a sentence naming the claims that hold,
  those that do not and the inconclusive ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from safespot.report import PREEMPTIONS
from safespot.reproduce.claims import evaluate_claim
from safespot.reproduce.evidence import Evidence
from safespot.reproduce.sections import MISSING, claims_section, context, not_measured, section, unmeasured
from safespot.reproduce.spec import SpecError
from safespot.stats import accuracy
from safespot.utils.tables import markdown_table

#: paper 002's columns (Tables 1-4): header -> suffix of the robustifier's evaluation name
GRID_COLUMNS = {
    "Clean": "",
    "Grey PGD": "_pgd",
    "Grey AA": "_autoattack",
    "White PGD": "_white_pgd",
    "White AA": "_white_autoattack",
    "Clean (8-bit)": "_8bit",
    "Grey PGD (8-bit)": "_8bit_pgd",
}
#: the white-box column of each grey-box one (paper 002, footnote 2: unrobustified images are
#: attacked as they are, so their white-box accuracy is the grey-box one)
WHITE_OF_GREY = {"White PGD": "Grey PGD", "White AA": "Grey AA"}


def _title(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """The section's title, with the placeholders of a ``text`` section filled."""
    title = spec_section.get("title")
    return [str(title).strip().format_map(context(evidence)), ""] if title else []


def preemptions(spec_section: dict[str, Any]) -> list[tuple[str, str]]:
    """The section's robustifiers as ``(evaluation name, label)``: its ``preemptions`` mapping, else
    :data:`safespot.report.PREEMPTIONS`."""
    chosen = spec_section.get("preemptions")
    return list(PREEMPTIONS) if chosen is None else [(str(k), str(v)) for k, v in chosen.items()]


def _notes(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    notes = [str(n).strip().format_map(context(evidence)) for n in spec_section.get("notes") or ()]
    return [*notes, ""] if notes else []


def flags(records: pd.DataFrame, name: str) -> np.ndarray | None:
    """The per-image ``<name>/correct`` flags of an evaluation's records, or ``None`` when absent."""
    column = f"{name}/correct"
    return records[column].to_numpy().astype(bool) if column in records else None


def grid_cell(records: pd.DataFrame, key: str, suffix: str) -> str:
    """The accuracy of robustifier ``key`` under the column's attack, with its Wilson interval."""
    correct = flags(records, f"{key}{suffix}")
    return MISSING if correct is None else accuracy(correct).percent()


def safe_spot_rate(evidence: Evidence, evaluation: str, key: str) -> str:
    """``<key>/safe_spot_rate`` of the evaluation's summary in percent (share of the correctly
    classified originals whose robustified image survives every grey-box attack)."""
    value = evidence.summary(evaluation).get(f"{key}/safe_spot_rate")
    return MISSING if value is None else f"{100 * float(value):.1f}"


@section("robustification_grid")
def robustification_grid(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """Paper 002's layout: ``models`` ({row label: evaluation}), a row per robustifier present in
    the evaluation's records, the ``columns`` named (headers of :data:`GRID_COLUMNS`, default the
    first five), the safe-spot rate unless ``rate: false``. With ``none_white_is_grey`` the None
    row's white-box cells are its grey-box ones. Rows and columns without a measurement are left
    out. The rows' robustifiers: :func:`preemptions`."""
    headers = list(spec_section.get("columns") or list(GRID_COLUMNS)[:5])
    unknown = [h for h in headers if h not in GRID_COLUMNS]
    if unknown:
        raise SpecError(f"{evidence.spec.name}: robustification_grid columns {unknown} are not {list(GRID_COLUMNS)}")
    rows = []
    for label, evaluation in spec_section["models"].items():
        records = evidence.records(evaluation)
        for key, name in preemptions(spec_section):
            if flags(records, key) is None:
                continue
            row = {"Model": label, "Preempt.": name}
            for header in headers:
                source = header
                if key == "preempt_none" and spec_section.get("none_white_is_grey") and header in WHITE_OF_GREY:
                    source = WHITE_OF_GREY[header]
                row[header] = grid_cell(records, key, GRID_COLUMNS[source])
            if spec_section.get("rate", True):
                row["Safe-spot rate"] = safe_spot_rate(evidence, evaluation, key)
            rows.append(row)
    table = pd.DataFrame(rows)
    measured = [c for c in table.columns if c in ("Model", "Preempt.") or (table[c] != MISSING).any()]
    table = table[measured]
    table = table[(table.drop(columns=["Model", "Preempt."]) != MISSING).any(axis=1)]
    rate = [RATE_NOTE, ""] if "Safe-spot rate" in table.columns else []
    return [*_title(evidence, spec_section), *_notes(evidence, spec_section), markdown_table(table), "", *rate]


#: what the grid's safe-spot rate counts (:func:`safespot.evaluation.records.summarize`)
RATE_NOTE = (
    "Safe-spot rate: of the images the model classifies correctly before robustification, the % whose "
    "robustified x_r is classified correctly and stays so under every grey-box attack run on it (PGD-20, and "
    "AutoAttack where the row has a Grey AA cell: rows with and without AutoAttack are not comparable)."
)


@section("safe_spot_grid")
def safe_spot_grid(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """Paper 000's layout (Table 1): a row per model of ``models``, per robustifier "clean / grey-box
    PGD" accuracy (%) of the robustified images (the intervals are in the grid's table); the
    columns' robustifiers: :func:`preemptions`."""
    rows = []
    for label, evaluation in spec_section["models"].items():
        records = evidence.records(evaluation)
        row = {"Model": label}
        for key, name in preemptions(spec_section):
            clean, grey = flags(records, key), flags(records, f"{key}_pgd")
            if clean is not None and grey is not None:
                row[name] = f"{100 * clean.mean():.1f} / {100 * grey.mean():.1f}"
        rows.append(row)
    table = markdown_table(pd.DataFrame(rows).fillna(MISSING))
    return [*_title(evidence, spec_section), *_notes(evidence, spec_section), table, ""]


#: where a chosen setting is stored in an evaluation's results.json meta
SETTING_SOURCES = ("evaluation_config", "model_config")


def stored_setting(evidence: Evidence, evaluation: str, path: str, source: str = "evaluation_config") -> Any:
    """A setting of the evaluation as its run stored it: ``path`` (dotted) in its evaluation config
    (``source: evaluation_config``) or in the config of the model it evaluated (``model_config``)."""
    if source not in SETTING_SOURCES:
        raise SpecError(f"{evidence.spec.name}: a setting's source is one of {list(SETTING_SOURCES)}, got {source!r}")
    value: Any = evidence.meta(evaluation).get(source, {})
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise SpecError(f"{evidence.spec.name}: evaluation {evaluation!r} stores no {path} in its {source}")
        value = value[part]
    return value


def split_of(evidence: Evidence, evaluation: str) -> str:
    """The images an evaluation ran on: ``test`` or ``val`` (``data.eval_split``)."""
    return str(evidence.meta(evaluation).get("split", "test"))


def choose(values: list[float], scores: list[float]) -> float:
    """The value of highest score; ties go to the smallest value (the rule is fixed before the data)."""
    best = max(scores)
    return min(v for v, s in zip(values, scores, strict=True) if s == best)


def candidate_scores(
    evidence: Evidence, candidates: list[str], path: str, score: str, source: str = "evaluation_config"
) -> list[tuple[float, np.ndarray]]:
    """Each validation candidate's setting and per-image ``score`` flags; a candidate that did not
    run on validation images, or left the setting to its default, is refused."""
    scored = []
    for candidate in candidates:
        if split_of(evidence, candidate) != "val":
            raise SpecError(f"{evidence.spec.name}: {candidate} must run on validation images (data.eval_split=val)")
        value = stored_setting(evidence, candidate, path, source)
        if value is None:
            raise SpecError(f"{evidence.spec.name}: {candidate} must set {path} explicitly")
        scored.append((float(value), evidence.field(f"{candidate}/{score}").to_numpy().astype(bool)))
    return scored


def check_test_setting(
    evidence: Evidence, test: str, path: str, chosen: float, label: str, name: str, source: str = "evaluation_config"
) -> None:
    """The test evaluation ran on the test images with the value the validation images chose."""
    used, split = stored_setting(evidence, test, path, source), split_of(evidence, test)
    if split != "test" or used is None or float(used) != chosen:
        raise SpecError(
            f"{evidence.spec.name}: the validation images choose {name} = {chosen:g} for {label}, but evaluation "
            f"{test!r} ran with {name} = {used} on its {split} images: set the spec's value to {chosen:g} and run "
            f"{test} again (into a new directory, or after removing eval/{test} and its line of log.jsonl)"
        )


@section("validation_choice")
def validation_choice(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """A robustifier setting chosen on validation images, per model of ``models`` ({label:
    {candidates: [evaluations], test: evaluation}}): each candidate's setting (``path`` in its
    stored evaluation config, named ``parameter``) and its validation accuracy on ``score`` (a
    per-image field), the chosen value (highest accuracy, ties to the smaller value), then the test
    evaluation's accuracies on the ``test_columns`` ({header: field}). The test evaluation must
    have run on the test images with the chosen value: a report is never rendered from a setting
    the validation images did not choose. The setting's ``source``: :func:`stored_setting`. With
    a ``missing_note``, a model whose candidates or test evaluation have no records yet is
    named as not measured, followed by the note."""
    name, path, score = str(spec_section["parameter"]), str(spec_section["path"]), str(spec_section["score"])
    source = str(spec_section.get("source", "evaluation_config"))
    note = spec_section.get("missing_note")
    models = dict(spec_section["models"])
    wanted = [e for entry in models.values() for e in (*entry["candidates"], entry["test"])]
    missing = unmeasured(evidence, wanted) if note else []
    measured = {k: v for k, v in models.items() if not set((*v["candidates"], v["test"])) & set(missing)}
    heading = [*_title(evidence, spec_section), *_notes(evidence, spec_section)]
    if not measured:
        return [*heading, *not_measured(missing, str(note).strip())]
    validation, test_rows, sizes = [], [], set()
    for label, entry in measured.items():
        scored = candidate_scores(evidence, list(entry["candidates"]), path, score, source)
        chosen = choose([v for v, _ in scored], [float(c.mean()) for _, c in scored])
        for value, correct in scored:
            row = {"Model": label, name: f"{value:g}", "Validation accuracy": accuracy(correct).percent()}
            validation.append({**row, "Chosen": "yes" if value == chosen else ""})
            sizes.add(len(correct))
        check_test_setting(evidence, entry["test"], path, chosen, label, name, source)
        test_row = {"Model": label, name: f"{chosen:g}"}
        for header, field in (spec_section.get("test_columns") or {"Accuracy": score}).items():
            test_row[header] = accuracy(evidence.field(f"{entry['test']}/{field}").to_numpy().astype(bool)).percent()
        test_rows.append(test_row)
    test_images = {evidence.n_images(entry["test"]) for entry in measured.values()}
    return [
        *heading,
        f"Validation accuracy: {score.removesuffix('/correct')} on {', '.join(map(str, sorted(sizes)))} held-out "
        "training images (`data.eval_split=val`: never trained on, disjoint from the test images), with its 95% "
        f"Wilson interval. The chosen {name} has the highest validation accuracy (ties: the smaller {name}).",
        "",
        markdown_table(pd.DataFrame(validation)),
        f"With the chosen {name}, on the {', '.join(map(str, sorted(test_images)))} test images:",
        "",
        markdown_table(pd.DataFrame(test_rows)),
        "",
        *not_measured(missing, str(note or "").strip()),
    ]


@section("claims_verdicts")
def claims_verdicts(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """The ``claims`` table, then one sentence naming which claims hold, which do not and which are
    inconclusive (each by its ``short`` name, else its text)."""
    results = [evaluate_claim(evidence, claim) for claim in spec_section["claims"]]
    named: dict[str, list[str]] = {}
    for claim, result in zip(spec_section["claims"], results, strict=True):
        named.setdefault(result.verdict, []).append(str(claim.get("short", claim["text"])))
    order = ("holds", "does not hold", "inconclusive at this scale")
    parts = [f"{verdict}: {', '.join(named[verdict])}" for verdict in order if verdict in named]
    parts += [f"{verdict}: {', '.join(names)}" for verdict, names in named.items() if verdict not in order]
    summary = f"{spec_section.get('verdict', 'Verdict')}: " + "; ".join(parts) + "."
    return [*claims_section(evidence, spec_section), summary, ""]
