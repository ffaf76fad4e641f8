"""``remeasured``: the "old -> new" rows of ``docs/reproduction.md`` for one reproduction.

"Old" is history: what an earlier published report printed, kept in the spec as text. "New" is
never typed: it is read from the table that one of the spec's own sections renders from the kept
records (the row whose leading cells a row of the spec names), so the list of changed verdicts
follows the records as every report does, and reads "pending" until they are kept.
"""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

from safespot.reproduce.evidence import Evidence
from safespot.reproduce.sections import claim_evaluations, evaluations_read, render_section, section
from safespot.reproduce.spec import SpecError
from safespot.utils.tables import markdown_table

#: the columns a claim table's new value is read from, when a row names none
CLAIM_COLUMNS = ("Difference [95% CI]", "AUROC difference, pp [95% t interval over seeds]", "Verdict", "Size vs paper")
#: what a difference cell says beyond its interval (the test's p value): left out of the list
P_VALUE = re.compile(r", McNemar p = [^,|]+")


def table_rows(lines: list[str]) -> list[dict[str, str]]:
    """The rows of the markdown tables in a section's ``lines`` as {header: cell}."""
    rows: list[dict[str, str]] = []
    header: list[str] | None = None
    for line in "\n".join(lines).splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not all(set(c) <= set("-: ") for c in cells):
            rows.append(dict(zip(header, cells, strict=False)))
    return rows


def section_of(evidence: Evidence, where: Any) -> dict[str, Any]:
    """The spec's section ``where`` names: an index into its sections, or ``[block, index]``."""
    spec = evidence.spec
    if isinstance(where, int):
        return spec.sections[where]
    block, index = where
    blocks = spec.settings.get("blocks") or {}
    if block not in blocks:
        raise SpecError(f"{spec.name}: remeasured names no block {block!r}")
    return blocks[block][int(index)]


def new_value(evidence: Evidence, row: dict[str, Any]) -> str:
    """The row's new value, read from its section's rendered table (the row whose leading cells
    are ``row``), or from the sentence that starts with ``line`` (what follows it)."""
    lines = render_section(evidence, section_of(evidence, row["section"]))
    if row.get("line"):
        said = [line for line in lines if line.startswith(str(row["line"]))]
        if len(said) != 1:
            raise SpecError(f"{evidence.spec.name}: remeasured line {row['line']!r} found {len(said)} times")
        return said[0][len(str(row["line"])) :].strip(" :.").replace("**", "")
    wanted = [str(c) for c in row["row"]]
    found = [r for r in table_rows(lines) if list(r.values())[: len(wanted)] == wanted]
    if len(found) != 1:
        raise SpecError(f"{evidence.spec.name}: remeasured row {wanted} found {len(found)} times in its section")
    cells = found[0]
    columns = row.get("columns") or {c: "" for c in CLAIM_COLUMNS if c in cells and cells[c] not in ("–", "")}
    parts = []
    for prefix, label in dict(columns).items():
        header = next((h for h in cells if h.startswith(prefix)), None)
        if header is None:
            raise SpecError(f"{evidence.spec.name}: remeasured row {wanted}: no column {prefix!r}")
        parts.append(f"{P_VALUE.sub('', cells[header])} {label}".strip())
    return ("; " if row.get("columns") else ", ").join(parts)


def read_by(evidence: Evidence, row: dict[str, Any]) -> set[str]:
    """The evaluations a row's new value reads: its claim's (the section's claim whose text is the
    row's first cell), else those its section reads."""
    part = section_of(evidence, row["section"])
    named = [c for c in part.get("claims", []) if row.get("row") and str(c.get("text")) == str(row["row"][0])]
    keys = set(claim_evaluations(named[0])) if named else evaluations_read(part)
    return keys & set(evidence.spec.evaluations) or set(evidence.spec.evaluations)  # unknown: every evaluation


@section("remeasured")
def remeasured(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """One row per ``rows`` entry: ``claim``, ``old`` (as published before), the new value
    (:func:`new_value`: ``section``, ``row`` or ``line``, optional ``columns`` {header prefix: label}) or
    "pending" while the evaluations it reads (:func:`read_by`) are not all kept, or while its
    section cannot render from records kept in part, and ``changed``."""
    complete = evidence.root.is_dir() and all(evidence.has(key) for key in evidence.spec.evaluations)
    table = []
    for row in spec_section["rows"]:
        new = "pending"
        if evidence.root.is_dir() and all(evidence.has(key) for key in read_by(evidence, row)):
            try:
                new = new_value(evidence, row)
            except SpecError:
                if complete:  # every record kept: an error of the spec, not a pending measurement
                    raise
        table.append(
            {
                "Claim": str(row["claim"]),
                "Old": str(row["old"]),
                "New": new,
                "What changed": str(row["changed"]).strip(),
            }
        )
    return [markdown_table(pd.DataFrame(table)), ""]
