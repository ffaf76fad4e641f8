"""Callbacks of the default training and evaluation runs (what users of Lightning + Hydra
templates expect): a learning-rate monitor and the last step of every spawned DDP worker. The
progress bar is :mod:`safespot.utils.progress`."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor as _LearningRateMonitor
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher


class LearningRateMonitor(_LearningRateMonitor):
    """Lightning's learning-rate monitor, idle when the run has no logger (``logger=none``)
    instead of refusing to start."""

    def on_train_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._idle = not trainer.loggers
        if not self._idle:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if not getattr(self, "_idle", False):
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if not getattr(self, "_idle", False):
            super().on_train_epoch_start(trainer, *args, **kwargs)


class LeaveTogether(L.Callback):
    """The last hook of a ``fit`` / ``test`` in a spawned DDP worker (``ddp_spawn``, ``ddp_fork``):
    wait until every worker arrives, then leave the process group. Without it a worker that
    finished early (rank 1, while rank 0 still saves the weights it hands to the parent) leaves
    the group from its exit handler while its peers still hold connections to it, and gloo may
    abort it ("terminate called without an active exception", an intermittent SIGABRT). The
    Fabric commands do the same with :func:`safespot.runs.leave_together`. Processes launched
    as scripts (plain ``ddp``) go on to the next stage in the same group and are left alone."""

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            return
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        trainer.strategy.barrier(f"leave together after {getattr(stage, 'value', stage)}")
        torch.distributed.destroy_process_group()


def runtime_callbacks(trainer_cfg: Any = None) -> list[L.Callback]:
    """The callbacks every Trainer of the commands gets whatever ``callbacks`` says:
    :class:`LeaveTogether`. (Progress bar and model summary are entries of the ``callbacks`` group.)"""
    return [LeaveTogether()]
