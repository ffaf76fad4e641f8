"""The output directory of a robustification: checked before any work, prepared by rank 0 before
any process writes, and each batch's PNGs written so that a killed run loses nothing.

- :func:`check_output`: a directory (created if missing), never one the inputs come from.
- :func:`plan_records`: one record per input; which files to robustify, which PNG names are
  taken (``failed: exists``), and with ``skip_existing`` which files an earlier run finished
  (their journalled rows kept).
- :func:`prepare_output`: rank 0's step before the work: the directory created, temporary files
  of killed runs removed (:func:`safespot.utils.files.remove_stale_temporaries`), the records
  planned and this run's journals created (:mod:`safespot.robustification.journal`).
- :func:`publish_batch`: a batch's PNGs staged in temporary files, its rows journalled (flushed to
  disk), then each PNG linked to its name (never replacing a file) and read back."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safespot.data.image_files import Input, entries
from safespot.errors import ConfigError
from safespot.robustification.journal import create_journals, finished_rows, journal_header, journal_row, resumed_record
from safespot.robustification.records import new_record
from safespot.utils.files import JsonLines, discard, publish, read_regular, remove_stale_temporaries, stage
from safespot.utils.logging import get_logger

log = get_logger("safespot.robustification")


def check_output(output: Any, spec: Any, inputs: list[Input]) -> Path:
    """The output directory: not an existing file, and never a directory inputs come from."""
    if output is None or not str(output).strip():
        raise ConfigError("output must name a directory for the robustified images")
    out = Path(str(output)).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output={str(output)!r} exists and is not a directory")
    input_dirs = {Path(str(e)).expanduser().resolve() for e in entries(spec) if Path(str(e)).expanduser().is_dir()}
    input_dirs |= {p.resolve().parent for p, _ in inputs}
    if out.resolve() in input_dirs:
        raise ConfigError(
            f"output={str(output)!r} is an input directory; choose another directory so that inputs are never touched"
        )
    return out


def png_path(out: Path, path: Path) -> Path:
    """Where the PNG of the input ``path`` goes: ``<out>/<stem>.png``."""
    return out / f"{path.stem}.png"


def plan_records(
    inputs: list[Input], out: Path, finished: dict[str, dict[str, Any]] | None = None
) -> tuple[list[dict[str, Any]], list[int], int]:
    """One record per input, the positions of the files to robustify and how many files keep an
    earlier run's row. A file whose PNG exists already (a file or a link), or whose output name
    an earlier input takes (the same stem), is ``failed: exists`` before any work, so that which
    file is written never depends on the order in which processes finish. With ``finished``
    (``skip_existing=true``: :func:`~safespot.robustification.journal.finished_rows`), a file whose
    PNG exists and that an earlier run finished keeps that run's row
    (:func:`~safespot.robustification.journal.resumed_record`) and is not robustified again."""
    records: list[dict[str, Any]] = []
    todo: list[int] = []
    taken: set[Path] = set()
    resumed = 0
    for path, skip in inputs:
        target = png_path(out, path)
        record = new_record(path, target, skip)
        if skip is None and target in taken:
            record["status"] = "failed: exists"
        elif skip is None and os.path.lexists(target):
            earlier = None if finished is None else resumed_record(path, target, finished.get(target.name))
            if earlier is not None:
                record, resumed = earlier, resumed + 1
            else:
                unfinished = "" if finished is None else " (no earlier run with these settings finished it)"
                record["status"] = f"failed: exists{unfinished}"
        elif skip is None:
            todo.append(len(records))
        if skip is None:
            taken.add(target)
        records.append(record)
    return records, todo, resumed


@dataclass
class Prepared:
    """Rank 0's decisions before any process writes, the same in every process: one record per
    input, the positions of the files to robustify, how many rows an earlier run's journals gave,
    and this run's journal of each process."""

    records: list[dict[str, Any]]
    todo: list[int]
    resumed: int
    journals: list[Path]


def prepare_output(
    inputs: list[Input], out: Path, settings: dict[str, Any], skip_existing: bool, world_size: int, started: str
) -> Prepared:
    """Rank 0, before any process writes: the output directory (created), the temporary files of
    killed runs removed, :func:`plan_records` (from the journals with ``skip_existing``) and this
    run's journal files, headed by ``settings``."""
    out.mkdir(parents=True, exist_ok=True)
    for tmp in remove_stale_temporaries(out):
        log.info("removed %s, left behind by a killed run", tmp)
    finished = finished_rows(out, settings) if skip_existing else None
    records, todo, resumed = plan_records(inputs, out, finished)
    journals = create_journals(out, world_size, journal_header(settings, started))
    return Prepared(records, todo, resumed, journals)


def _unwritten(record: dict[str, Any], status: str) -> None:
    """A record whose PNG was not written: its status, and no check of an image that is not there."""
    record.update(status=status, pred_robustified=None, distance=None, pgd_survives_after=None)


def publish_batch(
    records: list[dict[str, Any]], pngs: list[bytes | None], digests: list[str | None], journal: JsonLines
) -> None:
    """Write a batch's PNGs and journal its rows, so that a killed run loses nothing: every PNG
    is first staged in a temporary file, then every record's row goes to the journal (flushed
    to disk; :func:`~safespot.robustification.journal.journal_row`), then each PNG is linked to
    its name (never replacing a file) and read back. A file that fails here (``failed: exists``,
    ``failed: write: ...``) gets a second row that supersedes the first; the temporary files are
    removed on every path out."""
    staged: dict[int, Path] = {}
    try:
        for i, (record, png) in enumerate(zip(records, pngs, strict=True)):
            if png is not None and record["status"] == "ok":
                try:
                    staged[i] = stage(Path(record["output"]), png)
                except OSError as err:
                    _unwritten(record, f"failed: write: {err.strerror or err}")
        journal.append(journal_row(r, png, d) for r, png, d in zip(records, pngs, digests, strict=True))
        failed = []
        for i, tmp in staged.items():
            record, out = records[i], Path(records[i]["output"])
            try:
                publish(tmp, out)
                if read_regular(out) != pngs[i]:
                    _unwritten(record, "failed: write: the PNG read back differs from the image written")
            except FileExistsError:
                _unwritten(record, "failed: exists")
            except OSError as err:
                _unwritten(record, f"failed: write: {err.strerror or err}")
            if record["status"] != "ok":
                failed.append(record)
        if failed:
            journal.append(journal_row(r, None, None) for r in failed)
    finally:
        for tmp in staged.values():
            discard(tmp)
