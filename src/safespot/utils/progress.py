"""Progress that a log file can show.

Lightning's Rich and TQDM bars redraw one line of a terminal; where stdout is a file (SLURM logs,
``nohup``, CI) the Rich bar shows only its final state, so a six-minute run prints nothing until
"Epoch 7/7". :class:`PlainProgressBar` prints plain lines instead, at most one per ``interval``
seconds and at the end of every epoch and stage: the stage, epoch, batches and images done, the
rate in images per second, the time left and, at an epoch's end, its metrics. :func:`progress_bar`
(the ``callbacks.progress_bar`` entry of the configs) gives the Rich bar in a terminal and the plain
one elsewhere; a user swaps it like any callback (``callbacks.progress_bar._target_=...``).

Evaluations that spend minutes on one batch (attacks, the safe-spot search) report the share of a
batch they have done with :func:`note_progress`, so a plain line can say how far a long batch is.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, list | tuple) and batch else batch
    shape = getattr(first, "shape", None)
    return int(shape[0]) if shape else 1


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class PlainProgressBar(ProgressBar):
    """Progress as plain lines, one per ``interval`` seconds at most (rank 0)."""

    def __init__(self, interval: float = 30.0) -> None:
        super().__init__()
        self.interval = float(interval)
        self._enabled = True
        self._stage = ""
        self._start = self._last = 0.0
        self._batches = self._images = 0
        self._partial = 0.0
        self._batch_images = 0
        self._total: float = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    # --- bookkeeping ------------------------------------------------------------------------
    def _begin(self, stage: str, total: float) -> None:
        self._stage, self._total = stage, total
        self._start = self._last = time.monotonic()
        self._batches = self._images = 0
        self._partial = 0.0

    def _start_batch(self, batch: Any) -> None:
        """The images of the batch now running: what a partial report (:meth:`partial`) counts."""
        self._batch_images = _batch_size(batch)
        self._partial = 0.0

    def _advance(self, batch: Any, trainer: L.Trainer, force: bool = False) -> None:
        self._batches += 1
        self._batch_images = _batch_size(batch)
        self._images += self._batch_images
        self._partial = 0.0
        self._maybe_print(trainer, force)

    def partial(self, fraction: float, trainer: L.Trainer) -> None:
        """The current batch is ``fraction`` done (:func:`note_progress`)."""
        self._partial = min(max(fraction, 0.0), 1.0)
        self._maybe_print(trainer)

    def _maybe_print(self, trainer: L.Trainer, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        self.print_line(trainer, self.status(now))

    def status(self, now: float) -> str:
        elapsed = max(now - self._start, 1e-9)
        done = self._batches + self._partial
        images = self._images + self._partial * self._batch_images
        total = self._total if self._total and self._total != float("inf") else None
        parts = [self._stage]
        if self._stage == "train":
            parts.append(f"epoch {self.trainer.current_epoch + 1}/{self.trainer.max_epochs}")
        parts.append(f"batch {done:.1f}/{int(total)}" if total else f"batch {done:.1f}")
        parts.append(f"{images:,.0f} images, {images / elapsed:.1f} images/s")
        if total and done > 0:
            parts.append(f"elapsed {_duration(elapsed)}, left {_duration(elapsed * (total - done) / done)}")
        return " | ".join(parts)

    def print_line(self, trainer: L.Trainer, text: str) -> None:
        if self._enabled and trainer.is_global_zero and text != getattr(self, "_printed", None):
            self._printed = text
            print(f"[progress] {text}", flush=True)

    def _metrics(self, trainer: L.Trainer, prefix: str) -> str:
        values = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
        return ", ".join(f"{k} {float(v):.4f}" for k, v in sorted(values.items()))

    # --- Lightning hooks --------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._begin("train", self.total_train_batches)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        self._advance(batch, trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = 0.0
        self._maybe_print(trainer, force=True)
        metrics = self._metrics(trainer, "train/") + "; " + self._metrics(trainer, "val/")
        self.print_line(trainer, f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} done: {metrics.strip('; ')}")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._saved = (self._stage, self._total, self._start, self._batches, self._images)
            self._begin("validate", self.total_val_batches)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        if not trainer.sanity_checking:
            self._advance(batch, trainer)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and hasattr(self, "_saved"):
            self._stage, self._total, self._start, self._batches, self._images = self._saved

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._begin("test", sum(trainer.num_test_batches))

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:  # fmt: skip
        self._start_batch(batch)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._advance(batch, trainer)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = 0.0
        self._maybe_print(trainer, force=True)

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._begin("predict", sum(trainer.num_predict_batches))

    def on_predict_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                               batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._start_batch(batch)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._advance(batch, trainer)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = 0.0
        self._maybe_print(trainer, force=True)


def note_progress(trainer: L.Trainer | None, fraction: float) -> None:
    """Tell the run's progress bar that the current batch is ``fraction`` done (a plain bar prints
    it when its interval has passed; other bars ignore it)."""
    bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
    if isinstance(bar, PlainProgressBar):
        bar.partial(fraction, trainer)


def progress_bar(interval: float = 30.0, terminal: bool | None = None) -> ProgressBar:
    """Lightning's Rich bar where stdout is a terminal, :class:`PlainProgressBar` (a line per
    ``interval`` seconds) where it is a file or pipe."""
    if terminal is None:
        terminal = sys.stdout.isatty()
    return RichProgressBar() if terminal else PlainProgressBar(interval)
