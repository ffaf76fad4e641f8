"""The journals of a robustification: every process appends each file's row as it finishes,
so a killed run loses nothing, and ``skip_existing=true`` resumes from them.

A journal is ``<output>/journal-<run>-rank<r>.jsonl`` (:func:`create_journals`: ``<run>`` the
first number free for every rank, each name taken atomically): a header line with the settings
the PNGs depend on (:func:`journal_header`), then one JSON line per file with the report's fields,
the PNG's path relative to the output directory and the SHA-256 of the input's bytes and of the
PNG (:func:`journal_row`). :func:`finished_rows` reads every journal of an output directory (torn
last lines left out) and :func:`resumed_record` keeps an earlier row only when the files still
hold the bytes it names."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from safespot.robustification.records import FIELDS
from safespot.utils.files import json_line, read_json_lines, read_regular, write_first_free

JOURNAL = re.compile(r"^journal-(?P<run>\d+)-rank(?P<rank>\d+)\.jsonl$")


def journal_row(record: dict[str, Any], png: bytes | None, input_sha256: str | None, out: Path) -> dict[str, Any]:
    """A record as a journal row: its report fields, the PNG's path relative to the output
    directory ``out`` (``output_name``: ``sub/dir/stem.png``, whatever the spelling of ``out``) and
    the SHA-256 of the input's bytes and of the PNG, which :func:`resumed_record` checks before a
    file is skipped as done."""
    output_sha256 = hashlib.sha256(png).hexdigest() if png is not None and record["status"] == "ok" else None
    name = Path(record["output"]).relative_to(out).as_posix() if record.get("output") else None
    return {
        **{k: record[k] for k in FIELDS},
        "output_name": name,
        "input_sha256": input_sha256,
        "output_sha256": output_sha256,
    }


def journal_header(settings: dict[str, Any], started: str) -> dict[str, Any]:
    """The first line of a journal: the settings its rows were made with."""
    return {"journal": "safespot.robustify_files", "started": started, "settings": settings}


def create_journals(out: Path, world_size: int, header: dict[str, Any]) -> list[Path]:
    """This run's journal files, one per process (``journal-<run>-rank<r>.jsonl``, ``<run>`` the
    first number free for every rank, each name taken atomically), each starting with ``header``
    and its rank."""

    def names(run: int) -> list[str]:
        return [f"journal-{run}-rank{r}.jsonl" for r in range(world_size)]

    heads = [json_line({**header, "rank": r, "world_size": world_size}) for r in range(world_size)]
    return list(write_first_free(out, (names(run) for run in range(1, 100_000)), heads))


def journal_files(out: Path) -> list[Path]:
    """The journal files in ``out``, oldest run first."""
    found = [(m, p) for p in out.iterdir() if (m := JOURNAL.match(p.name))]
    return [p for m, p in sorted(found, key=lambda item: (int(item[0]["run"]), int(item[0]["rank"])))]


def finished_rows(out: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{output name: row}`` of every file an earlier run in ``out`` finished (its last row in its
    journal says ``ok``) with these ``settings`` (the journal's header); of several, the latest
    run's. The output name is the PNG's path relative to ``out`` (``output_name``; journals
    written before it was recorded: the file name). Torn lines of a killed run are left out."""
    wanted = json.loads(json.dumps(settings, default=str))
    done: dict[str, dict[str, Any]] = {}
    for path in journal_files(out):
        rows = read_json_lines(path)
        if not rows or rows[0].get("settings") != wanted:
            continue
        last = {row.get("input"): row for row in rows[1:] if "status" in row}
        for row in last.values():
            if row["status"] == "ok" and row.get("output") and row.get("output_sha256"):
                done[row.get("output_name") or Path(row["output"]).name] = row
    return done


def _sha256_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(read_regular(path)).hexdigest()
    except OSError:
        return None


def resumed_record(path: Path, target: Path, row: dict[str, Any] | None) -> dict[str, Any] | None:
    """The earlier ``row`` as this input's record when it still holds: ``target`` is a regular
    file (not a link) with the PNG bytes the row names and ``path`` has the input bytes it names;
    else ``None``. The row's values are kept; its paths become this run's."""
    if row is None or target.is_symlink() or _sha256_of(target) != row["output_sha256"]:
        return None
    if _sha256_of(path) != row.get("input_sha256"):
        return None
    return {**{k: row.get(k) for k in FIELDS}, "input": str(path), "output": str(target)}
