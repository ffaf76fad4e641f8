"""The rows of a robustification and its report.

One record per input (:data:`FIELDS`): where its PNG goes, its status (``ok``, ``failed: <reason>``
or ``skipped: <reason>``), the model's prediction before and after, the grey-box check's verdicts
and the search's loss and iterations. :func:`write_report` writes them as ``report.csv`` and
``report.json`` under the first free pair of names (:func:`report_names`), each name taken
atomically (:func:`safespot.utils.files.write_first_free`)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safespot.utils.files import write_first_free

FIELDS = (
    "input",
    "output",
    "status",
    "original_size",
    "resized",
    "pred",
    "pred_name",
    "protected",
    "protected_name",
    "pred_robustified",
    "distance",
    "pgd_survives_before",
    "pgd_survives_after",
    "worst_loss",
    "iterations",
)


def new_record(path: Path, output: Path, status: str | None) -> dict[str, Any]:
    """A file's record; ``output`` is where its PNG goes (none for skipped files)."""
    record: dict[str, Any] = dict.fromkeys(FIELDS)
    record.update(input=str(path), output=None if status else str(output), status=status)
    return record


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of the records: files, ``ok``, ``failed``, ``skipped``, and how many ``ok`` files
    survive the grey-box check before and after."""
    ok = [r for r in records if r["status"] == "ok"]
    return {
        "n_files": len(records),
        "ok": len(ok),
        "failed": sum(r["status"].startswith("failed") for r in records),
        "skipped": sum(r["status"].startswith("skipped") for r in records),
        "pgd_survives_before": sum(bool(r["pgd_survives_before"]) for r in ok),
        "pgd_survives_after": sum(bool(r["pgd_survives_after"]) for r in ok),
    }


def any_failed(records: list[dict[str, Any]]) -> bool:
    return any(r["status"].startswith("failed") for r in records)


def report_names() -> Iterator[tuple[str, str]]:
    """``report.csv``/``report.json``, then ``report-1.*``, ``report-2.*``, ..."""
    yield "report.csv", "report.json"
    for k in range(1, 100_000):
        yield f"report-{k}.csv", f"report-{k}.json"


def write_report(out: Path, records: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[Path, Path]:
    """The report under the first free pair of :func:`report_names`, each name taken atomically
    (:func:`safespot.utils.files.write_first_free`): an existing file, a link (dangling or not) or
    a concurrent run's report is never overwritten and never makes the report fail."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in FIELDS} for r in records)
    payload = {"meta": meta, "summary": summarize(records), "files": records}
    contents = [buffer.getvalue().encode(), (json.dumps(payload, indent=2) + "\n").encode()]
    csv_path, json_path = write_first_free(out, report_names(), contents)
    return csv_path, json_path


def sheet_words(sheet: list[Path] | str) -> str:
    """The contact sheet's pages as the summary names them, or why there is none."""
    if isinstance(sheet, str):
        return f"contact sheet: {sheet}"
    if len(sheet) == 1:
        return f"contact sheet: {sheet[0]}"
    return f"contact sheet: {sheet[0]} ... {sheet[-1].name} ({len(sheet)} pages)"


def summary_line(
    report: dict[str, Any], csv_path: Path, check_steps: int, sheet: list[Path] | str | None = None
) -> str:
    """The line a run ends with, from its report (``report*.json``'s contents): files ok (kept from
    an earlier run), failed and skipped, time and rate, the grey-box check's verdicts, and the
    contact sheet's pages (or why there is none; ``None``: switched off)."""
    s, meta = report["summary"], report["meta"]
    survival = f"{s['pgd_survives_before']}/{s['ok']} before, {s['pgd_survives_after']}/{s['ok']} after"
    kept = f" ({meta['resumed']} kept from an earlier run)" if meta.get("resumed") else ""
    seconds = meta.get("seconds", 0)
    rate = (s["ok"] - meta.get("resumed", 0)) / seconds if seconds else float("nan")
    return (
        f"[safespot] {s['ok']} ok{kept}, {s['failed']} failed, {s['skipped']} skipped in {seconds:.1f} s "
        f"({rate:.2f} images/s); safe-spot check (PGD-{check_steps} survives): {survival}; "
        f"report: {csv_path}" + ("" if sheet is None else f"; {sheet_words(sheet)}")
    )
