"""Loggers that work with every strategy, without noise a user cannot act on.

Lightning's CSV logger keeps the columns of ``metrics.csv`` in its writer object. Under
``ddp_spawn`` every stage (fit, then test) runs in freshly spawned workers that receive a copy of
the parent's writer, which has never seen the columns the fit workers wrote: the test stage's
writer then rewrites the file with its own columns only and fails ("dict contains fields not in
fieldnames"); a writer made in a worker also deletes the ``metrics.csv`` it finds. The writer here
reads the columns back from the file before it adds its own, and never deletes a file: run
directories are never reused (:mod:`safespot.utils.run_dirs`), so a file there is this run's.
"""

from __future__ import annotations

import csv
from typing import Any

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter as _ExperimentWriterWithHparams


class ExperimentWriter(_ExperimentWriterWithHparams):
    """Lightning's CSV writer, continuing the ``metrics.csv`` of the run in whichever process it
    writes."""

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes an existing metrics.csv
        return

    def _record_new_keys(self) -> set[str]:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = next(csv.reader(file), [])
            self.metrics_keys.extend(key for key in header if key not in self.metrics_keys)
        return super()._record_new_keys()


class CSVLogger(_CSVLogger):
    """Lightning's CSV logger with :class:`ExperimentWriter` (same arguments and files)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ExperimentWriter(log_dir=self.log_dir)
        return self._experiment


class WandbLogger(_WandbLogger):
    """Lightning's wandb logger (same arguments), without passing wandb the ``anonymous`` setting it
    no longer has: wandb warns "The anonymous setting has no effect" at every run otherwise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
