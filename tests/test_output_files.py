"""Files written next to a user's files (safespot.utils.files): exclusive writes, names taken
atomically, temporary files of killed processes removed, journals read back without a torn
line, FIFOs never read."""

import os
import subprocess

import pytest

from safespot.utils import files
from safespot.utils.files import (
    JsonLines,
    NotRegularFile,
    read_json_lines,
    read_regular,
    remove_stale_temporaries,
    stage,
    write_exclusive,
    write_first_free,
)


def dead_pid() -> int:
    """The id of a process that has exited."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_write_first_free_skips_links_and_names_taken_by_a_concurrent_writer(tmp_path, monkeypatch):
    """A dangling link is a taken name (never followed, never replaced); a name another process
    takes between the check and the write moves the group to the next candidates, and the file
    already written for the abandoned group is removed."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / "r.csv").symlink_to(tmp_path / "nowhere.csv")  # dangling
    (tmp_path / "r-1.json").symlink_to(victim)
    (tmp_path / "r-2.json").write_text("another run's")
    monkeypatch.setattr(files.os.path, "lexists", lambda _: False)  # as if every name looked free
    names = [("r.csv", "r.json"), ("r-1.csv", "r-1.json"), ("r-2.csv", "r-2.json"), ("r-3.csv", "r-3.json")]
    written = write_first_free(tmp_path, names, [b"csv", b"json"])
    assert written == (tmp_path / "r-3.csv", tmp_path / "r-3.json")
    assert (tmp_path / "r-3.csv").read_bytes() == b"csv" and (tmp_path / "r-3.json").read_bytes() == b"json"
    assert victim.read_text() == "keep" and (tmp_path / "r-2.json").read_text() == "another run's"
    assert (tmp_path / "r.csv").is_symlink() and not (tmp_path / "r.csv").exists()
    assert not any(os.path.lexists(tmp_path / n) for n in ("r.json", "r-1.csv", "r-2.csv"))
    assert not list(tmp_path.glob(".*"))
    with pytest.raises(FileExistsError):
        write_first_free(tmp_path, names[:1], [b"csv", b"json"])


def test_write_exclusive_leaves_no_temporary_file_when_interrupted(tmp_path, monkeypatch):
    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "link", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_exclusive(tmp_path / "a.png", b"png")
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_dead_processes_are_removed_and_no_other_file(tmp_path):
    """A temporary file left by a killed process (its pid no longer runs) goes; one of a running
    process (a concurrent run), one of another host, a link and the user's hidden files stay."""
    mine = stage(tmp_path / "a.png", b"partial")
    pid = f".{os.getpid()}."
    stale = mine.rename(tmp_path / mine.name.replace(pid, f".{dead_pid()}."))
    running = stage(tmp_path / "b.png", b"being written")
    other_host = tmp_path / f".c.png.elsewhere.{dead_pid()}.abc123.tmp"
    other_host.write_bytes(b"x")
    link = tmp_path / stale.name.replace(".a.png.", ".d.png.")
    link.symlink_to(tmp_path / "elsewhere")
    hidden = tmp_path / ".notes.tmp"
    hidden.write_text("the user's")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (running, other_host, link, hidden))


def test_journal_rows_are_read_back_without_a_torn_last_line(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"header": 1}\n')
    with JsonLines(path) as journal:
        journal.append([{"a": 1}, {"a": 2}])
        journal.append([])
    with path.open("a") as f:
        f.write('{"a": 3, "b"')  # a process killed mid-append
    assert read_json_lines(path) == [{"header": 1}, {"a": 1}, {"a": 2}]
    link = tmp_path / "link.jsonl"
    link.symlink_to(path)
    assert read_json_lines(link) == []
    with pytest.raises(OSError):
        JsonLines(link)  # never appends through a link


def test_read_regular_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(NotRegularFile, match=r"not a regular file \(fifo\)"):
        read_regular(fifo)
    with pytest.raises(NotRegularFile, match="directory"):
        read_regular(tmp_path)
    (tmp_path / "a.png").write_bytes(b"abc")
    assert read_regular(tmp_path / "a.png") == b"abc"
