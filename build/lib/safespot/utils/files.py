"""Files a command writes into a user's directory, safely next to whatever is there already.

- :func:`write_exclusive`: a file written whole or not at all, never replacing anything (a
  temporary file in the same directory, then hard-linked into place: ``link`` fails on any
  existing name, a dangling symbolic link included, and never follows one);
  :func:`stage` / :func:`publish` / :func:`discard` are its steps, for callers that record
  something between writing the bytes and giving them their name.
- Temporary files are named ``.<name>.<host>.<pid>.<random>.tmp``, so that
  :func:`remove_stale_temporaries` can tell those of a process that died (killed mid-write) from
  those of a process still running (a concurrent run), and removes only the former.
- :func:`write_first_free`: a group of files under the first candidate names that are all free
  (``report.csv``/``report.json``, then ``report-1.*``, ...), each name taken atomically, so
  that a concurrent run or a dangling link never makes the write fail.
- :class:`JsonLines` / :func:`read_json_lines`: an append-only JSON-lines journal, flushed to
  disk after every append, read back without a torn last line.
- :func:`read_regular`: a file's bytes, refusing FIFOs and devices without blocking on them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
_TEMPORARY = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[a-z0-9_]+\.tmp$")


class NotRegularFile(OSError):
    """A path that names a FIFO, a device, a socket or a directory instead of a regular file."""


def file_kind(mode: int) -> str:
    """What a ``st_mode`` names, in words: ``regular file``, ``directory``, ``fifo``, ..."""
    kinds = (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "symbolic link"),
    )
    return next((name for test, name in kinds if test(mode)), "special file")


def read_regular(path: Path) -> bytes:
    """The bytes of the regular file ``path`` (links followed). Opened non-blocking and checked
    before reading, so a FIFO or device put in its place raises :class:`NotRegularFile` instead
    of blocking or reading without end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFile(f"not a regular file ({file_kind(mode)})")
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _file_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def stage(path: Path, data: bytes) -> Path:
    """``data`` in a new temporary file next to ``path`` (flushed to disk; the permissions a new
    file gets), named after this host and process for :func:`remove_stale_temporaries`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
    except BaseException:
        discard(Path(tmp))
        raise
    return Path(tmp)


def publish(tmp: Path, path: Path) -> None:
    """Give the staged file ``tmp`` the name ``path`` unless that name exists (a file, a
    directory or a link, dangling or not): a hard link, which never replaces and never follows a
    link. Where hard links are unsupported, ``path`` is created exclusively (``O_EXCL``) and
    ``tmp`` renamed over it. Raises :class:`FileExistsError` when ``path`` exists."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            os.replace(tmp, path)
        except BaseException:
            discard(path)  # the empty file that held the name
            raise


def discard(tmp: Path) -> None:
    """Remove a staged temporary file if it is still there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


def write_exclusive(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically without ever replacing an existing file
    (:func:`stage`, :func:`publish`); the temporary file is removed on every path out, an
    interruption included. Raises :class:`FileExistsError` when ``path`` exists."""
    tmp = stage(path, data)
    try:
        publish(tmp, path)
    finally:
        discard(tmp)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process / not a pid: leave it be
        return True
    return True


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Remove the temporary files (:func:`stage`) that processes of this host left behind in
    ``directory`` when they were killed (their process no longer runs); those of running
    processes, of other hosts, links and every other file are left alone. Returns the removed."""
    removed = []
    for entry in os.scandir(directory):
        match = _TEMPORARY.match(entry.name)
        if not match or match["host"] != _HOST or not entry.is_file(follow_symlinks=False):
            continue
        if not _process_alive(int(match["pid"])):
            discard(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


def write_first_free(
    directory: Path, candidates: Iterable[Sequence[str]], contents: Sequence[bytes]
) -> tuple[Path, ...]:
    """Write ``contents`` under the first group of ``candidates`` names whose every name is free,
    each with :func:`write_exclusive`; when another process takes one of them first, the files
    this call wrote for that group are removed and the next group is tried. Raises
    :class:`FileExistsError` when no group is free."""
    for names in candidates:
        paths = [directory / name for name in names]
        if any(os.path.lexists(p) for p in paths):
            continue
        written: list[Path] = []
        try:
            for path, data in zip(paths, contents, strict=True):
                write_exclusive(path, data)
                written.append(path)
        except FileExistsError:
            for path in written:
                discard(path)
            continue
        return tuple(paths)
    raise FileExistsError(f"no free name in {directory}")


def json_line(row: dict[str, Any]) -> bytes:
    """One JSON-lines line (non-JSON values as strings)."""
    return (json.dumps(row, default=str) + "\n").encode()


class JsonLines:
    """An existing journal file opened for appending (``O_APPEND``; a link is refused), each
    :meth:`append` written whole and flushed to disk before it returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        data = b"".join(json_line(row) for row in rows)
        if not data:
            return
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> JsonLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file; a line that does not parse as an object (the torn last
    line of a process killed mid-append) is left out. Links are not followed: ``[]``."""
    if not path.is_file() or path.is_symlink():
        return []
    rows = []
    for line in path.read_bytes().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
