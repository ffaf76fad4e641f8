"""Callbacks of the default training and evaluation runs (what users of Lightning + Hydra
templates expect): Rich progress bar and model summary, a learning-rate monitor."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor as _LearningRateMonitor
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar


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


def display_callbacks(trainer_cfg: Any) -> list[L.Callback]:
    """Rich progress bar and model summary, as far as the trainer config switches them on
    (``trainer.enable_progress_bar`` / ``enable_model_summary``: Lightning refuses the
    callbacks when the switch is off)."""
    callbacks: list[L.Callback] = []
    if trainer_cfg.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar())
    if trainer_cfg.get("enable_model_summary", True):
        callbacks.append(RichModelSummary(max_depth=2))
    return callbacks
