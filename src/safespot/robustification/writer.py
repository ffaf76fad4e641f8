"""The writer of a robustification: a Lightning prediction writer that puts each batch's PNGs and
journal rows into the output directory as the batch finishes (every process its own), then
gathers every record and lets rank 0 write the report.

- :meth:`RobustificationWriter.setup` (before any process writes): rank 0 prepares the output
  directory (:func:`safespot.robustification.outputs.prepare_output`: which files exist already or
  are resumed, this run's journals) and sends its decisions to every process; the datamodule then
  reads only the files to robustify.
- :meth:`~RobustificationWriter.write_on_batch_end`: the rows of files that did not load go to this
  process's journal, the PNGs of the others are written with their rows
  (:func:`safespot.robustification.outputs.publish_batch`).
- :meth:`~RobustificationWriter.on_predict_epoch_end`: every process's records gathered
  (:func:`safespot.utils.distributed.gather_objects`), each file exactly once, in input order;
  rank 0 writes ``report.csv``/``report.json`` (:func:`safespot.robustification.records.write_report`);
  every process waits until the report exists, and holds every record.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from safespot.robustification.journal import journal_row
from safespot.robustification.module import FileResult
from safespot.robustification.outputs import Prepared, prepare_output, publish_batch
from safespot.robustification.records import report_names, write_report
from safespot.utils.distributed import gather_objects
from safespot.utils.files import JsonLines
from safespot.utils.logging import get_logger

log = get_logger("safespot.robustification")

#: the ``trainer.callback_metrics`` entry in which rank 0 names its report (``k`` of
#: :func:`~safespot.robustification.records.report_names`): the one result that spawned workers
#: (``ddp_spawn``) hand back to the process that launched them
REPORT_INDEX = "robustify/report_index"


def describe_trainer(trainer: L.Trainer) -> dict[str, Any]:
    """What a report records about the processes: device (of rank 0), processes, strategy and
    precision."""
    return {
        "device": str(trainer.strategy.root_device),
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "precision": str(trainer.precision),
    }


def report_index(json_path: Path) -> int:
    """``k`` of the pair of :func:`~safespot.robustification.records.report_names` ``json_path`` has."""
    return next(k for k, (_, name) in enumerate(report_names()) if name == json_path.name)


def report_json(out: Path, index: int) -> Path:
    """The ``report*.json`` of pair ``index`` of :func:`~safespot.robustification.records.report_names`."""
    return out / next(name for k, (_, name) in enumerate(report_names()) if k == index)


def place(records: list[dict[str, Any]], todo: list[int], gathered: list[list[tuple[int, dict]]]) -> None:
    """Put the gathered ``(position, record)`` pairs of every process into ``records``; every
    position of ``todo`` must come exactly once."""
    seen: set[int] = set()
    wanted = set(todo)
    for part in gathered:
        for position, record in part:
            if position in seen or position not in wanted:
                raise RuntimeError(f"input {position} was robustified by two processes or was not to be robustified")
            seen.add(position)
            records[position] = record
    missing = sorted(wanted - seen)
    if missing:
        raise RuntimeError(f"inputs {missing[:10]} were robustified by no process")


class RobustificationWriter(BasePredictionWriter):
    """Args:
    out: the output directory (checked: :func:`safespot.robustification.outputs.check_output`).
    settings: the settings the PNGs depend on: the journals' header, the report's meta.
    skip_existing: keep the rows of files an earlier run into ``out`` finished.

    After ``trainer.predict`` :attr:`records` holds one record per input in every process that ran
    the loop, and :attr:`report` the ``report*.json`` on rank 0 (the process that launched spawned
    workers holds neither: :data:`REPORT_INDEX` of ``trainer.callback_metrics`` names the report).
    """

    def __init__(self, out: str | Path, settings: dict[str, Any], skip_existing: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.out, self.settings, self.skip_existing = Path(out), dict(settings), skip_existing
        self.records: list[dict[str, Any]] | None = None
        self.report: Path | None = None
        self._prepared: Prepared | None = None
        self._journal: JsonLines | None = None
        self._done: list[tuple[int, dict[str, Any]]] = []
        self._started, self._clock = "", 0.0

    # --- before the work ----------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._started, self._clock = datetime.now().isoformat(timespec="seconds"), time.perf_counter()
        datamodule = trainer.datamodule
        prepared = None
        if trainer.is_global_zero:  # rank 0 decides, before any process writes
            prepared = prepare_output(
                datamodule.inputs, self.out, self.settings, self.skip_existing, trainer.world_size, self._started
            )
        self._prepared = trainer.strategy.broadcast(prepared, src=0)
        datamodule.select(self._prepared.todo)
        self._journal = JsonLines(self._prepared.journals[trainer.global_rank])
        self._done, self.records, self.report = [], None, None

    # --- each batch ---------------------------------------------------------------------------
    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: list[FileResult],
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:  # fmt: skip
        assert self._prepared is not None and self._journal is not None
        records = [{**self._prepared.records[r.position], **r.fields} for r in prediction]
        unread = [record for record, r in zip(records, prediction, strict=True) if r.input_sha256 is None]
        self._journal.append(journal_row(record, None, None, self.out) for record in unread)
        read = [(record, r) for record, r in zip(records, prediction, strict=True) if r.input_sha256 is not None]
        if read:
            batch_records = [record for record, _ in read]
            pngs, digests = [r.png for _, r in read], [r.input_sha256 for _, r in read]
            publish_batch(batch_records, pngs, digests, self._journal, self.out)
        self._done += [(r.position, record) for record, r in zip(records, prediction, strict=True)]

    # --- after the work -----------------------------------------------------------------------
    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self._prepared is not None
        records = list(self._prepared.records)
        place(records, self._prepared.todo, gather_objects(self._done))
        if trainer.is_global_zero:
            self._write_report(trainer, records)
        trainer.strategy.barrier("robustify: report written")  # the report exists on every rank's return
        self.records, self._done = records, []
        self._close()

    def _write_report(self, trainer: L.Trainer, records: list[dict[str, Any]]) -> None:
        """``report.csv``/``report.json`` (rank 0), named in :attr:`report` and in
        ``trainer.callback_metrics`` (:data:`REPORT_INDEX`). Should the report fail (a full disk),
        the error names the journals, which hold every finished file's row."""
        assert self._prepared is not None
        meta = {**self.settings, **describe_trainer(trainer), "started": self._started}
        meta["finished"] = datetime.now().isoformat(timespec="seconds")
        meta["seconds"] = round(time.perf_counter() - self._clock, 3)
        meta.update(resumed=self._prepared.resumed, journal=[p.name for p in self._prepared.journals])
        try:
            csv_path, json_path = write_report(self.out, records, meta)
        except OSError:
            log.error("the report could not be written; every finished file's row is in %s", ", ".join(meta["journal"]))
            raise
        trainer.callback_metrics[REPORT_INDEX] = torch.tensor(report_index(json_path))
        self.report = json_path
        log.info("report: %s, %s", csv_path, json_path)

    def _close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()  # every row is on disk already (each append is flushed)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close()
