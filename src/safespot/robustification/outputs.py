"""The output directory of a robustification: checked before any work, prepared by rank 0 before
any process writes, and each batch's PNGs written so that a killed run loses nothing.

- :func:`check_output`: a directory (created if missing), never one the inputs come from.
- :func:`png_path`: an input's PNG, ``<output>/<stem>.png``, or with ``recursive`` inputs
  ``<output>/<sub/dir>/<stem>.png`` (the input's directory relative to its input directory).
- :func:`plan_records`: one record per input; which files to robustify, which PNG names are
  taken (``failed: exists``: on disk, or by an earlier input), and with ``skip_existing`` which
  files an earlier run finished (their journalled rows kept).
- :func:`prepare_output`: rank 0's step before the work: the directory created, temporary files
  of killed runs removed (:func:`safespot.utils.files.remove_stale_temporaries`), the records
  planned and this run's journals created (:mod:`safespot.robustification.journal`).
- :func:`publish_batch`: a batch's PNGs staged in temporary files (their directories created as
  needed, :func:`make_directories`), its rows journalled (flushed to disk), then each PNG linked
  to its name (never replacing a file) and read back."""

from __future__ import annotations

import errno
import os
import stat
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


def check_output(output: Any, spec: Any, inputs: list[Input], recursive: bool = False) -> Path:
    """The output directory: not an existing file, never a directory inputs come from (nor one
    of its subdirectories an output would go to), and with ``recursive`` not inside an input
    directory (the next run would read its outputs as inputs)."""
    if output is None or not str(output).strip():
        raise ConfigError("output must name a directory for the robustified images")
    out = Path(str(output)).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output={str(output)!r} exists and is not a directory")
    roots = [Path(str(e)).expanduser().resolve() for e in entries(spec) if Path(str(e)).expanduser().is_dir()]
    input_dirs = set(roots) | {item.path.resolve().parent for item in inputs}
    if out.resolve() in input_dirs:
        raise ConfigError(
            f"output={str(output)!r} is an input directory; choose another directory so that inputs are never touched"
        )
    subdirectories = {item.name.parent for item in inputs if item.reason is None}
    written = sorted({(out / sub).resolve() for sub in subdirectories} & input_dirs)
    if written:
        raise ConfigError(
            f"output={str(output)!r} would put PNGs into the input directory {str(written[0])!r}; choose another "
            "directory so that inputs are never touched"
        )
    inside = [root for root in roots if recursive and out.resolve().is_relative_to(root)]
    if inside:
        raise ConfigError(
            f"output={str(output)!r} is inside the input directory {str(inside[0])!r}, which recursive=true reads: "
            "choose a directory outside it"
        )
    return out


def png_path(out: Path, name: Path) -> Path:
    """Where the PNG of the input called ``name`` (relative to its input directory) goes:
    ``<out>/<name's directory>/<stem>.png``."""
    return out / name.parent / f"{name.stem}.png"


def output_name(out: Path, target: Path) -> str:
    """The path of ``target`` relative to ``out`` (``sub/dir/stem.png``), which names a file
    whatever the spelling of ``out``: the key of journal rows."""
    return target.relative_to(out).as_posix()


def directories(out: Path, target: Path) -> list[Path]:
    """The directories between ``out`` and ``target``, outermost first (none for ``<out>/x.png``)."""
    return [out / parent for parent in reversed(target.relative_to(out).parents[:-1])]


def _real_directory(path: Path) -> bool:
    """Whether ``path`` is a directory and not a link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def blocked(out: Path, target: Path) -> Path | None:
    """The first directory ``target`` needs that exists as something else: a file, or a link (never
    followed: a PNG goes nowhere outside ``out``); ``None`` when every one is a directory or missing."""
    for directory in directories(out, target):
        if not os.path.lexists(directory):
            return None
        if not _real_directory(directory):
            return directory
    return None


def make_directories(out: Path, target: Path) -> None:
    """Create the missing directories ``target`` needs (processes may race for them: one that
    exists is fine); one that exists as a file or a link raises :class:`NotADirectoryError`."""
    for directory in directories(out, target):
        try:
            os.mkdir(directory)
        except FileExistsError:
            if not _real_directory(directory):
                raise NotADirectoryError(
                    errno.ENOTDIR, "exists and is not a directory (a link is not followed)", str(directory)
                ) from None


class Claims:
    """The output names the inputs planned so far claim, in input order: each PNG and each
    directory the PNGs go into, with the first input that claimed it."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.files: dict[Path, Path] = {}
        self.directories: dict[Path, Path] = {}

    def clash(self, target: Path) -> str | None:
        """Why ``target`` cannot be written because of an earlier input (``failed: exists (...)``:
        the same output name, a directory of an earlier output, or a directory it needs that is an
        earlier input's PNG), else ``None``."""
        if target in self.files:
            return f"failed: exists (same output name as {self.files[target]})"
        if target in self.directories:
            return f"failed: exists ({target} is a directory of the output of {self.directories[target]})"
        for directory in directories(self.out, target):
            if directory in self.files:
                return f"failed: exists ({directory} is the output of {self.files[directory]})"
        return None

    def claim(self, target: Path, path: Path) -> None:
        """``target`` and its directories for the input ``path``, unless claimed already."""
        self.files.setdefault(target, path)
        for directory in directories(self.out, target):
            self.directories.setdefault(directory, path)


def plan_record(
    item: Input, out: Path, claims: Claims, finished: dict[str, dict[str, Any]] | None
) -> tuple[dict[str, Any], bool]:
    """``(record, resumed)`` of one input (see :func:`plan_records`): its status is ``None`` when
    it is to be robustified."""
    target = png_path(out, item.name)
    record = new_record(item.path, target, item.reason)
    if item.reason is not None:
        return record, False
    clash = claims.clash(target)
    in_the_way = blocked(out, target)
    claims.claim(target, item.path)
    if clash is not None:
        record["status"] = clash
    elif in_the_way is not None:
        what = "a symbolic link, not followed" if in_the_way.is_symlink() else "not a directory"
        record["status"] = f"failed: exists ({in_the_way} is {what})"
    elif os.path.lexists(target):
        row = None if finished is None else finished.get(output_name(out, target))
        earlier = resumed_record(item.path, target, row)
        if earlier is not None:
            return earlier, True
        unfinished = "" if finished is None else " (no earlier run with these settings finished it)"
        record["status"] = f"failed: exists{unfinished}"
    return record, False


def plan_records(
    inputs: list[Input], out: Path, finished: dict[str, dict[str, Any]] | None = None
) -> tuple[list[dict[str, Any]], list[int], int]:
    """One record per input, the positions of the files to robustify and how many files keep an
    earlier run's row. A file whose PNG exists already (a file or a link), whose output name an
    earlier input takes (the same stem in the same directory: ``failed: exists (same output name
    as <first>)``), or whose output directory is in the way (an earlier input's PNG, a file or a
    link) is ``failed: exists ...`` before any work, so that which file is written never depends on
    the order in which processes finish. With ``finished`` (``skip_existing=true``:
    :func:`~safespot.robustification.journal.finished_rows`), a file whose PNG exists and that an
    earlier run finished keeps that run's row
    (:func:`~safespot.robustification.journal.resumed_record`) and is not robustified again."""
    records: list[dict[str, Any]] = []
    todo: list[int] = []
    claims = Claims(out)
    resumed = 0
    for item in inputs:
        record, kept = plan_record(item, out, claims, finished)
        if record["status"] is None:
            todo.append(len(records))
        resumed += kept
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


def output_directories(inputs: list[Input], out: Path) -> list[Path]:
    """``out`` and the existing directories (not links) the inputs' PNGs go into."""
    found = {out}
    for item in inputs:
        if item.reason is None:
            found.update(d for d in directories(out, png_path(out, item.name)) if _real_directory(d))
    return sorted(found)


def prepare_output(
    inputs: list[Input], out: Path, settings: dict[str, Any], skip_existing: bool, world_size: int, started: str
) -> Prepared:
    """Rank 0, before any process writes: the output directory (created), the temporary files of
    killed runs removed (in every directory the PNGs go into), :func:`plan_records` (from the
    journals with ``skip_existing``) and this run's journal files, headed by ``settings``."""
    out.mkdir(parents=True, exist_ok=True)
    for directory in output_directories(inputs, out):
        for tmp in remove_stale_temporaries(directory):
            log.info("removed %s, left behind by a killed run", tmp)
    finished = finished_rows(out, settings) if skip_existing else None
    records, todo, resumed = plan_records(inputs, out, finished)
    journals = create_journals(out, world_size, journal_header(settings, started))
    return Prepared(records, todo, resumed, journals)


def _unwritten(record: dict[str, Any], status: str) -> None:
    """A record whose PNG was not written: its status, and no check of an image that is not there."""
    record.update(status=status, pred_robustified=None, distance=None, pgd_survives_after=None)


def publish_batch(
    records: list[dict[str, Any]], pngs: list[bytes | None], digests: list[str | None], journal: JsonLines, out: Path
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
                    make_directories(out, Path(record["output"]))
                    staged[i] = stage(Path(record["output"]), png)
                except OSError as err:
                    _unwritten(record, f"failed: write: {err.strerror or err}")
        journal.append(journal_row(r, png, d, out) for r, png, d in zip(records, pngs, digests, strict=True))
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
            journal.append(journal_row(r, None, None, out) for r in failed)
    finally:
        for tmp in staged.values():
            discard(tmp)
