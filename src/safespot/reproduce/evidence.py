"""Reading what a reproduction's runs left: per-image records, summaries, training logs, the log
of the commands that ran.

A root (the engine's output directory, or the spec's kept ``records``) holds::

    train/<run>/             .hydra/overrides.yaml, metrics.csv (or csv/metrics.csv), checkpoints/
    eval/<evaluation>/       records.csv, results.json, .hydra/overrides.yaml (+ an ood run's scores.csv)
    eval/<evaluation>/part<k>_of_<K>/   the same, for each piece of an evaluation run in pieces
    log.jsonl                one line per command that ran: key, command, minutes, date

Pieces are joined as one run (:func:`safespot.evaluation.records.join_pieces`): the records in
index order, every whole-set choice re-made over all images, the summary recomputed.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from safespot.evaluation.records import groups_of, join_pieces
from safespot.reproduce.spec import EvaluationRun, Spec, SpecError

LOG = "log.jsonl"
PIECE = re.compile(r"part(\d+)_of_(\d+)")


def piece_dirs(folder: Path) -> list[Path]:
    """The run directories of one evaluation: ``folder`` itself, or its ``part<k>_of_<K>``
    pieces in piece order."""
    parts = [p for p in folder.glob("part*_of_*") if PIECE.fullmatch(p.name)]
    return sorted(parts, key=lambda p: int(PIECE.fullmatch(p.name)[1])) or [folder]


def finished_file(evaluation: EvaluationRun) -> str:
    """The file a finished run of ``evaluation`` leaves: ``records.csv`` of an ``evaluate.py``
    run, ``results.json`` of another command's."""
    return "records.csv" if evaluation.command == "evaluate" else "results.json"


def find_checkpoint(run_dir: Path, which: str, missing_ok: bool = False) -> Path:
    """The ``last`` checkpoint of a training run, or its newest ``best-*`` one."""
    folder = run_dir / "checkpoints"
    found = [folder / "last.ckpt"] if which == "last" else sorted(folder.glob("best-*.ckpt"))
    if not found or not found[-1].is_file():
        if missing_ok:
            return None  # type: ignore[return-value]
        raise SpecError(f"no {which} checkpoint in {folder}")
    return found[-1]


def stored_overrides(run_dir: Path) -> list[str] | None:
    """The overrides of a Hydra run as its ``.hydra/overrides.yaml`` stores them, or ``None``."""
    stored = Path(run_dir) / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(stored)] if stored.is_file() else None


def effective_overrides(run_dir: Path) -> list[str] | None:
    """:func:`stored_overrides` one per key (a repeated key keeps its last value, as Hydra does)."""
    overrides = stored_overrides(run_dir)
    if overrides is None:
        return None
    last: dict[str, str] = {}
    for override in overrides:
        key = override.split("=", 1)[0]
        last.pop(key, None)
        last[key] = override
    return list(last.values())


def read_log(root: Path) -> list[dict[str, Any]]:
    """The entries of ``root/log.jsonl`` (a torn last line is left out)."""
    path = root / LOG
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


class Evidence:
    """The records of one spec's runs under ``root``, read lazily and cached."""

    def __init__(self, spec: Spec, root: Path) -> None:
        self.spec, self.root = spec, Path(root)
        self._joined: dict[str, tuple[pd.DataFrame, dict[str, float]]] = {}

    def eval_dir(self, key: str) -> Path:
        return self.root / "eval" / key

    def train_dir(self, key: str) -> Path:
        """Training run ``key`` here, else in the spec's kept records (a reproduction evaluates a
        run the records keep with its checkpoint from there, without training it again)."""
        here = self.root / "train" / key
        kept = self.spec.records / "train" / key if self.spec.records is not None else None
        return kept if not here.is_dir() and kept is not None and kept.is_dir() else here

    def has(self, key: str) -> bool:
        """Whether evaluation ``key`` left records (every piece of it)."""
        evaluation = self.spec.evaluations[key]
        folder = self.eval_dir(key)
        wanted = finished_file(evaluation)
        dirs = piece_dirs(folder) if evaluation.pieces > 1 else [folder]
        return len(dirs) == evaluation.pieces and all((d / wanted).is_file() for d in dirs)

    def _evaluation(self, key: str) -> EvaluationRun:
        if key not in self.spec.evaluations:
            raise SpecError(f"{self.spec.name}: no evaluation {key!r} (evaluations: {sorted(self.spec.evaluations)})")
        return self.spec.evaluations[key]

    def meta(self, key: str) -> dict[str, Any]:
        self._evaluation(key)
        first = piece_dirs(self.eval_dir(key))[0]
        return json.loads((first / "results.json").read_text()).get("meta", {})

    def _join(self, key: str) -> tuple[pd.DataFrame, dict[str, float]]:
        if key not in self._joined:
            self._evaluation(key)
            dirs = piece_dirs(self.eval_dir(key))
            missing = [d for d in dirs if not (d / "records.csv").is_file()]
            if missing:
                raise SpecError(f"{self.spec.name}: evaluation {key!r} has no records in {missing[0]}")
            meta = self.meta(key)
            pieces = [pd.read_csv(d / "records.csv") for d in dirs]
            self._joined[key] = join_pieces(pieces, meta["evaluations"], groups_of(meta))
        return self._joined[key]

    def records(self, key: str) -> pd.DataFrame:
        """Evaluation ``key``'s per-image records (pieces joined), indexed by image."""
        return self._join(key)[0].set_index("index")

    def summary(self, key: str) -> dict[str, float]:
        """Evaluation ``key``'s summary, as one run over all its images computes it."""
        return self._join(key)[1]

    def results(self, key: str) -> dict[str, Any]:
        """The ``results.json`` of an evaluation run in one piece (e.g. an OOD run)."""
        return json.loads((self.eval_dir(key) / "results.json").read_text())

    def table(self, key: str, name: str) -> pd.DataFrame:
        """Another per-image file of an evaluation (``scores.csv`` of an OOD run), pieces joined."""
        frames = [pd.read_csv(d / name) for d in piece_dirs(self.eval_dir(key))]
        return pd.concat(frames, ignore_index=True)

    def field(self, ref: str) -> pd.Series:
        """``<evaluation>/<field>``: one per-image field, e.g. ``table5/preempt_sfull_pgd/correct``."""
        key, _, column = ref.partition("/")
        records = self.records(key)
        if column not in records:
            raise SpecError(f"{self.spec.name}: evaluation {key!r} has no field {column!r}")
        return records[column]

    def training_metrics(self, key: str) -> pd.DataFrame:
        folder = self.train_dir(key)
        for path in (folder / "metrics.csv", folder / "csv" / "metrics.csv"):
            if path.is_file():
                return pd.read_csv(path)
        raise SpecError(f"{self.spec.name}: training run {key!r} kept no metrics.csv in {folder}")

    def overrides(self, kind: str, key: str) -> list[str] | None:
        if kind == "train":
            return stored_overrides(self.train_dir(key))
        return stored_overrides(piece_dirs(self.root / kind / key)[0])

    @cached_property
    def log(self) -> list[dict[str, Any]]:
        return read_log(self.root)

    def n_images(self, key: str) -> int:
        return len(self.records(key))
