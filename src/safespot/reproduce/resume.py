"""Trainings that outlast a sitting. An interrupted training run of a reproduction resumes from its
last checkpoint, written at an epoch's end (a run resumed from there ends with the weights of an
uninterrupted one: tests/test_preemption.py), instead of starting again: within one reproduction's
directory, where the interrupted run was set aside, and across sittings, from the unfinished
training that ``keep --partial`` keeps under ``<records>/unfinished/train/<run>/``.

A resumed run writes into a directory of its own (run directories are never reused,
:mod:`safespot.utils.run_dirs`), so a training is a chain of segments, each naming the checkpoint
it resumed from in its ``.hydra/overrides.yaml`` (``ckpt_path``). :func:`history` joins the chain:
each earlier segment's ``metrics.csv`` rows up to the epoch the next one resumed after, and its
minutes up to its last checkpoint. The finished run gets the joined ``metrics.csv`` beside its own
``csv/``, and its log line the minutes of every segment.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf

from safespot.paths import PROJECT_ROOT
from safespot.reproduce.evidence import stored_overrides
from safespot.utils.checkpoint import keep_weights, read_checkpoint

#: where kept records hold unfinished trainings: ``<records>/unfinished/train/<run>/``
UNFINISHED = "unfinished"
#: in a kept unfinished training: the epochs it has finished, of how many, and its minutes so far
PROGRESS = "progress.json"

Rows = list[dict[str, str]]


def set_aside(run_dir: Path) -> Path | None:
    """Rename the directory of an interrupted run to ``<name>.interrupted`` (``-1``, ``-2``, ... when
    taken): never overwritten, never reused. Returns the new path (``None``: nothing there)."""
    if not run_dir.exists():
        return None
    aside = run_dir.with_name(f"{run_dir.name}.interrupted")
    n = 1
    while aside.exists():
        aside = run_dir.with_name(f"{run_dir.name}.interrupted-{n}")
        n += 1
    return run_dir.rename(aside)


def interrupted_runs(run_dir: Path) -> list[Path]:
    """The interrupted runs of ``run_dir`` set aside by :func:`set_aside`."""
    return sorted(p for p in run_dir.parent.glob(f"{run_dir.name}.interrupted*") if p.is_dir())


def last_position(folder: Path) -> tuple[int, int] | None:
    """``(epoch, global_step)`` of ``folder``'s ``checkpoints/last.ckpt`` (the epoch, 0-based, whose
    end it holds), or ``None``."""
    last = folder / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    state = read_checkpoint(last, "the checkpoint of an interrupted training")
    if not (isinstance(state, dict) and "epoch" in state):
        return None
    return int(state["epoch"]), int(state.get("global_step", 0))


def last_epoch(folder: Path) -> int | None:
    """The epoch (0-based) whose end ``folder``'s ``checkpoints/last.ckpt`` holds, or ``None``."""
    position = last_position(folder)
    return None if position is None else position[0]


def resume_point(candidates: list[Path], same_settings: Callable[[Path], bool]) -> Path | None:
    """Of the training run folders ``candidates``, the one whose last checkpoint is the latest epoch,
    among those trained with the settings wanted (``same_settings``); ``None`` when none is."""
    found = [(epoch, folder) for folder in candidates if (epoch := last_epoch(folder)) is not None]
    found = [(epoch, folder) for epoch, folder in found if same_settings(folder)]
    return max(found, key=lambda pair: pair[0])[1] if found else None


def _resumed_from(folder: Path) -> Path | None:
    """The run folder the segment ``folder`` resumed from (its ``ckpt_path``'s), if any."""
    given = [o.split("=", 1)[1] for o in stored_overrides(folder) or [] if o.startswith("ckpt_path=")]
    if not given:
        return None
    ckpt = Path(given[-1])
    ckpt = ckpt if ckpt.is_absolute() else PROJECT_ROOT / ckpt
    return ckpt.parent.parent


def _read(path: Path) -> Rows:
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def _number(row: dict[str, str], column: str) -> float | None:
    try:
        return float(row.get(column) or "")
    except ValueError:
        return None


def up_to(rows: Rows, position: tuple[int, int]) -> Rows:
    """The rows logged up to the end of epoch ``position = (epoch, global_step)``: those of epochs
    ``<= epoch`` and, of those without an epoch (the learning rate, logged as an epoch starts),
    those of steps before ``global_step``. The rows of the epoch cut short by the interruption go."""
    epoch, step = position

    def before(row: dict[str, str]) -> bool:
        e, s = _number(row, "epoch"), _number(row, "step")
        return e <= epoch if e is not None else s is not None and s < step

    return [row for row in rows if before(row)]


def _minutes(folder: Path) -> float:
    """The minutes segment ``folder`` trained up to its last checkpoint (from the start Hydra
    recorded to the checkpoint's time)."""
    start, last = folder / ".hydra" / "config.yaml", folder / "checkpoints" / "last.ckpt"
    if not (start.is_file() and last.is_file()):
        return 0.0
    return max(0.0, (last.stat().st_mtime - start.stat().st_mtime) / 60)


def history(folder: Path) -> tuple[Rows, float]:
    """``(rows, minutes)``: the ``metrics.csv`` rows and the training minutes of the training run
    ``folder`` joined with those of the segments it resumed from (a kept unfinished training holds
    them joined already, with its :data:`PROGRESS`)."""
    progress = folder / PROGRESS
    if progress.is_file():
        return _read(folder / "metrics.csv"), float(json.loads(progress.read_text()).get("minutes") or 0.0)
    own = _read(folder / "csv" / "metrics.csv") or _read(folder / "metrics.csv")
    source = _resumed_from(folder)
    if source is None:
        return own, _minutes(folder)
    earlier, minutes = history(source)
    position = last_position(source)
    return [*(up_to(earlier, position) if position is not None else []), *own], minutes + _minutes(folder)


def write_rows(rows: Rows, path: Path) -> None:
    """``rows`` as a CSV file with the union of their columns (in the order they first appear)."""
    columns = list(dict.fromkeys(name for row in rows for name in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        writer.writerows(rows)


def keep_unfinished(folder: Path, target: Path) -> None:
    """Keep the interrupted training ``folder`` as ``target`` (a folder under
    ``<records>/unfinished/train/``): its last checkpoint whole (the optimizer's state included: it
    is resumed from), its best checkpoints without it (:func:`keep_weights`), its overrides and
    config, its joined metrics up to the last checkpoint's epoch and its :data:`PROGRESS`."""
    position = last_position(folder)
    assert position is not None, f"{folder} holds no last checkpoint"
    epoch = position[0]
    rows, minutes = history(folder)
    (target / "checkpoints").mkdir(parents=True)
    shutil.copy2(folder / "checkpoints" / "last.ckpt", target / "checkpoints" / "last.ckpt")
    for ckpt in sorted((folder / "checkpoints").glob("best-*.ckpt")):  # evaluated, never resumed from
        keep_weights(ckpt, target / "checkpoints" / ckpt.name)
    (target / ".hydra").mkdir()
    for name in ("overrides.yaml", "config.yaml"):  # the config: the settings it ran with, compared on resuming
        if (folder / ".hydra" / name).is_file():
            shutil.copy2(folder / ".hydra" / name, target / ".hydra" / name)
    write_rows(up_to(rows, position), target / "metrics.csv")
    config = folder / ".hydra" / "config.yaml"
    epochs = OmegaConf.load(config).trainer.get("max_epochs") if config.is_file() else None
    if epochs is None and (folder / PROGRESS).is_file():
        epochs = json.loads((folder / PROGRESS).read_text()).get("max_epochs")
    progress = {"epochs": epoch + 1, "max_epochs": epochs, "minutes": round(minutes, 1)}
    (target / PROGRESS).write_text(json.dumps(progress) + "\n")


def unfinished(records: Path | None) -> dict[str, dict]:
    """The unfinished trainings kept in ``records``: run -> its :data:`PROGRESS`."""
    folder = records / UNFINISHED / "train" if records is not None else None
    if folder is None or not folder.is_dir():
        return {}
    kept = [p for p in sorted(folder.iterdir()) if (p / PROGRESS).is_file()]
    return {p.name: json.loads((p / PROGRESS).read_text()) for p in kept}
