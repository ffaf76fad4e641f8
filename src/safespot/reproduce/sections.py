"""The parts of a report, each rendered from the evidence alone (never from a typed number).

A spec's ``sections`` list names a ``kind`` per part; :data:`SECTIONS` maps each kind to its
renderer ``(evidence, section) -> lines``. The general kinds:

- ``text``: a paragraph; ``{n.<evaluation>}`` is the number of images of an evaluation,
  ``{measured}`` the dates its commands ran, ``{settings.<key>}`` a setting of the spec.
- ``table``: rows of cells: a plain string is a label, ``acc:<eval>/<field>`` an accuracy with its
  Wilson interval, ``mean:<eval>/<field>`` a per-image mean, ``value:<eval>/<summary key>`` and
  ``pct:<eval>/<summary key>`` a summary value (``pct``: times 100), each with an optional
  ``|<format>``; ``null`` an empty cell (–).
- ``published``: a table as the paper prints it (its numbers are the paper's, quoted).
- ``claims``: claims (:mod:`safespot.reproduce.claims`) with intervals and verdicts, after an
  optional ``text``.
- ``commands``: every command that made the evidence, with its wall time.

Reproductions with tables of their own kind (OOD detection, rejection, votes, reconstruction)
add renderers with :func:`section`.

Evaluations a spec names before they have run: a ``table`` or ``claims`` section with a
``missing_note`` renders the cells and claims of evaluations without records as not measured,
followed by the evaluations missing and the note (e.g. where the commands that add them are:
:func:`not_measured`); without one, a missing record is an error. ``not_measured`` lists every
evaluation of the spec without records and the ``command`` that adds them (nothing once all have
run).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from safespot.reproduce.claims import evaluate_claim
from safespot.reproduce.evidence import Evidence
from safespot.reproduce.spec import SpecError
from safespot.stats import accuracy
from safespot.utils.tables import markdown_table

Renderer = Callable[[Evidence, dict[str, Any]], list[str]]
SECTIONS: dict[str, Renderer] = {}
MISSING = "–"
NOT_MEASURED = "not measured"


def section(kind: str) -> Callable[[Renderer], Renderer]:
    """Register a renderer for sections of ``kind``."""

    def register(renderer: Renderer) -> Renderer:
        SECTIONS[kind] = renderer
        return renderer

    return register


def render_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    kind = spec_section["kind"]
    if kind not in SECTIONS:
        raise SpecError(f"{evidence.spec.name}: no section kind {kind!r} (kinds: {sorted(SECTIONS)})")
    return SECTIONS[kind](evidence, spec_section)


def measured_dates(evidence: Evidence) -> str:
    """The dates the evidence's commands ran, e.g. ``2026-12-03 and 2026-12-04``."""
    dates = sorted({entry["date"] for entry in evidence.log if entry.get("date")})
    if not dates:
        return "on an earlier date"
    return dates[0] if len(dates) == 1 else ", ".join(dates[:-1]) + f" and {dates[-1]}"


def context(evidence: Evidence) -> dict[str, Any]:
    evaluated = [k for k, e in evidence.spec.evaluations.items() if e.command == "evaluate" and evidence.has(k)]
    counts = {key: evidence.n_images(key) for key in evaluated}  # an ood.py run keeps no records.csv
    return {
        "n": SimpleNamespace(**counts),
        "measured": measured_dates(evidence),
        "settings": SimpleNamespace(**evidence.spec.settings),
        "name": evidence.spec.name,
    }


@section("text")
def text_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    return [str(spec_section["text"]).strip().format_map(context(evidence)), ""]


def unmeasured(evidence: Evidence, keys: Any) -> list[str]:
    """The evaluations among ``keys`` (names of the spec's evaluations) without records yet, in the
    spec's order."""
    wanted = set(keys)
    unknown = sorted(wanted - set(evidence.spec.evaluations))
    if unknown:
        raise SpecError(
            f"{evidence.spec.name}: no evaluation {unknown[0]!r} (evaluations: {sorted(evidence.spec.evaluations)})"
        )
    return [key for key in evidence.spec.evaluations if key in wanted and not evidence.has(key)]


def _named(keys: list[str]) -> str:
    return ", ".join(f"`{key}`" for key in keys)


def not_measured(keys: list[str], note: str) -> list[str]:
    """The line under a section some of whose evaluations have no records yet: which, and the
    section's ``missing_note``."""
    if not keys:
        return []
    return [f"Not measured yet (no records of {_named(keys)}). {note}".strip(), ""]


@section("not_measured")
def not_measured_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """Every evaluation of the spec without records yet and the ``command`` that adds them;
    nothing once every evaluation has run."""
    missing = [key for key in evidence.spec.evaluations if not evidence.has(key)]
    if not missing:
        return []
    lines = [str(spec_section["title"]).strip(), ""] if spec_section.get("title") else []
    lines += [f"The spec's evaluations without records yet: {_named(missing)}. The commands that add them:", ""]
    return [*lines, "```bash", str(spec_section["command"]).strip(), "```", ""]


def cell_evaluation(spec_cell: Any) -> str | None:
    """The evaluation a table cell reads (``acc:<evaluation>/...`` and the like), or ``None``."""
    kind, sep, rest = str(spec_cell).partition(":")
    if spec_cell is None or not sep or kind not in ("acc", "mean", "value", "pct"):
        return None
    return rest.partition("/")[0]


def cell(evidence: Evidence, spec_cell: Any) -> str:
    """One table cell (see the module docstring)."""
    if spec_cell is None:
        return MISSING
    text = str(spec_cell)
    kind, sep, rest = text.partition(":")
    if not sep or kind not in ("acc", "mean", "value", "pct"):
        return text
    ref, _, fmt = rest.partition("|")
    if kind == "acc":
        return accuracy(evidence.field(ref).to_numpy().astype(bool)).percent()
    if kind == "mean":
        return format(float(np.mean(evidence.field(ref).to_numpy(dtype=float))), fmt or ".4f")
    key, _, name = ref.partition("/")
    summary = evidence.summary(key)
    if name not in summary:
        raise SpecError(f"{evidence.spec.name}: evaluation {key!r} has no summary value {name!r}")
    value = float(summary[name]) * (100 if kind == "pct" else 1)
    return format(value, fmt or ".4f")


@section("table")
def table_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    columns = list(spec_section["columns"])
    note = spec_section.get("missing_note")
    referenced = [e for row in spec_section["rows"] for c in row if (e := cell_evaluation(c)) is not None]
    missing = unmeasured(evidence, referenced) if note else []
    rows = []
    for row in spec_section["rows"]:
        if len(row) != len(columns):
            raise SpecError(f"{evidence.spec.name}: a table row has {len(row)} cells for {len(columns)} columns")
        rows.append([NOT_MEASURED if cell_evaluation(c) in missing else cell(evidence, c) for c in row])
    lines = [str(spec_section["title"]).strip(), ""] if spec_section.get("title") else []
    lines += [str(n).strip().format_map(context(evidence)) for n in spec_section.get("notes") or ()]
    if spec_section.get("notes"):
        lines.append("")
    table = [markdown_table(pd.DataFrame(rows, columns=columns)), ""]
    return [*lines, *table, *not_measured(missing, str(note or "").strip())]


@section("published")
def published_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    return [str(spec_section["source"]).strip(), "", str(spec_section["table"]).strip(), ""]


def claim_evaluations(claim: dict[str, Any]) -> list[str]:
    """The evaluations a claim reads (its ``a``, ``b`` and ``restrict`` fields, each
    ``<evaluation>/<field>`` or a list of them)."""
    refs: list[str] = []
    for key in ("a", "b", "restrict"):
        value = claim.get(key) or []
        refs += [value] if isinstance(value, str) else [str(v) for v in value]
    return [ref.partition("/")[0] for ref in refs]


def evaluations_read(part: dict) -> set[str]:
    """The evaluations a block's section reads records of: its claims' (:func:`claim_evaluations`),
    its table cells' (:func:`cell_evaluation`) and its models' (a ``training_runs`` section reads
    the training runs alone)."""
    if part.get("kind") == "training_runs":
        return set()
    keys = {key for claim in part.get("claims", []) for key in claim_evaluations(claim)}
    keys |= {cell_evaluation(c) for row in part.get("rows", []) for c in row} - {None}
    return keys | {str(v) for v in dict(part.get("models", {})).values()}


def measured_claims(evidence: Evidence, spec_section: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The section's claims whose evaluations all have records, and (with a ``missing_note``)
    the evaluations the others still need; without one, every claim is measured or an error."""
    claims = list(spec_section["claims"])
    if not spec_section.get("missing_note"):
        return claims, []
    missing = unmeasured(evidence, [e for claim in claims for e in claim_evaluations(claim)])
    return [c for c in claims if not set(claim_evaluations(c)) & set(missing)], missing


def unmeasured_claims(spec_section: dict[str, Any], missing: list[str]) -> list[str]:
    """The claims that wait for ``missing`` evaluations, listed, and the section's ``missing_note``."""
    waiting = [str(c["text"]) for c in spec_section["claims"] if set(claim_evaluations(c)) & set(missing)]
    if not waiting:
        return []
    lines = ["Claims not measured yet:", "", *(f"- {text}" for text in waiting), ""]
    return [*lines, *not_measured(missing, str(spec_section["missing_note"]).strip())]


def readings(claims: list[dict[str, Any]], results: list[Any]) -> list[str]:
    """What each claim's outcome means, as its spec words it: a claim's ``readings`` maps a size
    verdict ("larger than the paper's", ...) or a verdict ("holds", ...) to a sentence; the
    sentence of the outcome measured (its size first) follows the table."""
    sentences = []
    for claim, result in zip(claims, results, strict=True):
        words = dict(claim.get("readings") or {})
        chosen = words.get(result.size, words.get(result.verdict))
        if chosen:
            sentences.append(str(chosen).strip())
    return [" ".join(sentences), ""] if sentences else []


@section("claims")
def claims_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    claims, missing = measured_claims(evidence, spec_section)
    results = [evaluate_claim(evidence, claim) for claim in claims]
    lines = [str(spec_section["title"]).strip(), ""] if spec_section.get("title") else []
    if spec_section.get("text"):
        lines += [str(spec_section["text"]).strip(), ""]
    if results:
        table = pd.DataFrame([r.row() for r in results])
        if all(r.paper is None for r in results):
            table = table.drop(columns=["Paper", "Size vs paper"])
        lines += [markdown_table(table), ""]
    return [*lines, *readings(claims, results), *unmeasured_claims(spec_section, missing)]


def command_line(entry: dict[str, Any]) -> str:
    minutes = entry.get("minutes")
    when = f"{minutes:.1f} min" if isinstance(minutes, int | float) else "time not recorded"
    if entry.get("adopted"):
        when = f"an earlier run, adopted (`safespot-reproduce adopt`); {when}"
    return f"{entry['command']}    # {when}"


@section("commands")
def commands_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """Every command that made the evidence (``log.jsonl``), in the order they ran; a run kept
    without a log entry appears as its stored overrides."""
    lines = [command_line(entry) for entry in evidence.log]
    logged = {tuple(entry["key"].split("/")[:2]) for entry in evidence.log}
    for kind, keys in (("train", evidence.spec.runs), ("eval", evidence.spec.evaluations)):
        for key in keys:
            if (kind, key) in logged or not (evidence.root / kind / key).exists():
                continue
            overrides = evidence.overrides(kind, key)
            script = "train.py" if kind == "train" else f"{evidence.spec.evaluations[key].command}.py"
            if overrides is not None:
                lines.append(command_line({"command": " ".join(["python", script, *overrides])}))
    title = spec_section.get("title", "## Commands")
    return [title, "", "```bash", *lines, "```", ""]
