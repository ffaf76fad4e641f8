"""The LightningModule of an OOD run: every detector taken through its stages (fit, tune,
score; :mod:`safespot.ood.detectors.base`) in one ``trainer.test`` over the loaders of
:class:`~safespot.ood.data.OODDataModule`, which come in stage order.

- **fit**: every fitting batch updates the detectors' statistics (torchmetrics states);
- **tune**: per-image tuning values of the tuning sets are kept with their positions;
- **score**: every test image's prediction, label, index and detector columns are kept.

A stage ends when a process reaches a batch of a later stage (or the end of the test epoch):
the statistics are reduced over the processes (:meth:`torchmetrics.Metric.compute`) and the
detectors derive their state from them; the tuning values of every process are gathered in set
order and the detectors choose their settings; at the end the scores are gathered in set order,
and rank 0 writes ``scores.csv``, the tables, ``results.json`` and the histograms before any
process returns. Every process takes part in every reduction in the same order, whether or
not it had batches of that stage.

Run it with ``Trainer(inference_mode=False)``: Mahalanobis' input preprocessing and the safe-spot
search take input gradients. Per-image seeds come from the run seed, the dataset index and the
set's name, so a score depends neither on the batching nor on the number of processes.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from torch import nn

from safespot.ood.data import FIT, SCORE, STAGES, TUNE, Loader
from safespot.ood.detectors.base import Detector, DetectorError
from safespot.ood.detectors.safe_spot import SafeSpotScore
from safespot.ood.report import IN_DISTRIBUTION, detector_metrics, plot_figure3, plot_histograms, write_tables
from safespot.utils.distributed import gather_objects
from safespot.utils.logging import get_logger
from safespot.utils.progress import note_progress
from safespot.utils.rng import image_seeds

log = get_logger("safespot.ood")
CONVENTION = "outliers positive; higher score = more anomalous; percentages"
NO_UPDATE_WARNING = r"The ``compute`` method of metric .* before the ``update``"

Rows = list[dict[Any, torch.Tensor]]  # per batch: columns of per-image values, with "_position"


def merge_rows(shares: Sequence[Rows], loader: Loader) -> dict[Any, torch.Tensor]:
    """The rows of every process's share of a set, in set order; every position exactly once."""
    chunks = [chunk for share in shares for chunk in share]
    if not chunks:
        return {}
    positions = torch.cat([c["_position"] for c in chunks])
    order = torch.argsort(positions)
    if not torch.equal(positions[order], torch.arange(loader.size)):
        raise RuntimeError(f"the processes' shares of the {loader.name} set do not cover it exactly once")
    return {k: torch.cat([c[k] for c in chunks])[order] for k in chunks[0] if k != "_position"}


def write_outputs(
    out: Path,
    scores: pd.DataFrame,
    results: dict[str, Any],
    detectors: Sequence[Detector],
    histograms: bool = True,
) -> None:
    """``scores.csv``, the tables and ``results.json`` (``results``: the metrics and the run's
    description) and, with ``histograms``, the score histograms and Figure 3 of every safe-spot
    score."""
    out.mkdir(parents=True, exist_ok=True)
    scores.to_csv(out / "scores.csv", index=False)
    write_tables(out, results["metrics"], {k: v for k, v in results.items() if k != "metrics"})
    if histograms:
        (out / "histograms").mkdir(exist_ok=True)
        safe_spot = [d.name for d in detectors if isinstance(d, SafeSpotScore)]
        for detector in detectors:
            plot_histograms(scores, detector.name, out / "histograms" / f"{detector.name}.png")
            if detector.name in safe_spot:
                figure = "figure3.png" if len(safe_spot) == 1 else f"figure3_{detector.name}.png"
                plot_figure3(scores, detector.name, out / figure)


class OODModule(L.LightningModule):
    """Args:
    nets: the classifiers, ``{detector checkpoint (None: the run's ckpt_path): network}``; the
        run's own (``None``) gives the ``pred`` column.
    detectors: ``(detector, its checkpoint)`` in config order, prepared with a probe.
    loaders: the run's loaders (:meth:`~safespot.ood.data.OODDataModule.select`), in stage order.
    seed: the run seed (per-image seeds).
    fit_batch_size: the fitting loader's batch size (batch numbers of the fitting statistics).
    output_dir: where rank 0 writes (``None``: nowhere).
    meta: the run's description in ``results.json`` (models, checkpoints, threat, seed).
    sizes: the sizes of the fitting and tuning sets (``n_fit``, ``n_tune``), after the image counts.
    detector_config: the detectors' settings, after the tuned settings.
    histograms: whether to plot the score histograms and Figure 3.
    """

    def __init__(
        self,
        nets: Mapping[str | None, nn.Module],
        detectors: Sequence[tuple[Detector, str | None]],
        loaders: Sequence[Loader],
        seed: int = 0,
        fit_batch_size: int = 128,
        output_dir: str | Path | None = None,
        meta: dict[str, Any] | None = None,
        sizes: dict[str, Any] | None = None,
        detector_config: Any = None,
        histograms: bool = True,
    ) -> None:
        super().__init__()
        keys = {path: f"net{i}" for i, path in enumerate(nets)}
        self.nets = nn.ModuleDict({keys[path]: net.eval() for path, net in nets.items()})
        self.detectors = [(detector, keys[path]) for detector, path in detectors]
        # the statistics are submodules, so they move to the run's device with the networks
        self.statistics = nn.ModuleDict(
            {f"detector{i}": d.statistics for i, (d, _) in enumerate(detectors) if d.statistics is not None}
        )
        self.main = keys[None]
        self.loaders = list(loaders)
        self.seed, self.fit_batch_size = int(seed), int(fit_batch_size)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.meta, self.sizes, self.detector_config = dict(meta or {}), dict(sizes or {}), detector_config
        self.histograms = bool(histograms)
        # with N processes a process may have no fitting batch (more processes than slices)
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.tuned: dict[str, Any] = {}
        self.results: dict[str, Any] = {}
        self._stage = 0  # stages before this one are finished
        self._rows: dict[int, Rows] = {}

    # --- the loop ------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self.nets.eval()
        for statistics in self.statistics.values():
            statistics.reset()
        self._stage, self._rows, self.tuned = 0, {}, {}

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        loader = self.loaders[dataloader_idx]
        self._reach(STAGES.index(loader.stage))
        x, y, index, position = batch
        if loader.stage == FIT:
            self._fit_batch(x, y, int(position[0]) // self.fit_batch_size)
            return
        seeds = image_seeds(self.seed, index, zlib.crc32(loader.name.encode()))
        columns = self._tune_batch(loader, x, seeds) if loader.stage == TUNE else self._score_batch(x, y, index, seeds)
        self._rows.setdefault(dataloader_idx, []).append({"_position": position.cpu(), **columns})

    def on_test_epoch_end(self) -> None:
        self._reach(len(STAGES))

    def _reach(self, stage: int) -> None:
        """Finish every stage before ``stage`` not finished yet, in order."""
        finish = (self._finish_fit, self._finish_tune, self._finish_score)
        while self._stage < stage:
            finish[self._stage]()
            self._stage += 1

    # --- fit -----------------------------------------------------------------------------
    def _fit_batch(self, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
        for detector, key in self.detectors:
            if detector.fits_statistics:
                self._checked(detector, detector.accumulate, self.nets[key], x, y, batch)

    def _finish_fit(self) -> None:
        """The statistics reduced over the processes, the detectors derived from them. A process
        that had no fitting batch (more processes than slices or batches) adds its initial states;
        torchmetrics' warning about a compute before any update does not apply to it."""
        for detector, key in self.detectors:
            if detector.fits_statistics:
                if self.global_rank == 0:
                    log.info("fitting %s", detector.name)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=NO_UPDATE_WARNING)
                    self._checked(detector, detector.finish_fit, self.nets[key])

    # --- tune ----------------------------------------------------------------------------
    def _tune_batch(self, loader: Loader, x: torch.Tensor, seeds: torch.Tensor) -> dict[Any, torch.Tensor]:
        columns: dict[Any, torch.Tensor] = {}
        for detector, key in self.detectors:
            if loader.name in detector.tuning_sets:
                values = self._checked(detector, detector.tune_values, self.nets[key], x, seeds)
                columns.update({(detector.name, k): v.detach().cpu() for k, v in values.items()})
        return columns

    def _finish_tune(self) -> None:
        """Every process's tuning values in set order; each detector chooses its settings (the
        same in every process; processes that chose otherwise than rank 0 are reported)."""
        merged = self._gathered(TUNE)
        for detector, _ in self.detectors:
            values = {
                s: {k: v for (name, k), v in merged.get(s, {}).items() if name == detector.name}
                for s in detector.tuning_sets
            }
            self.tuned[detector.name] = self._checked(detector, detector.tune, values)
        differ = [rank for rank, other in enumerate(gather_objects(repr(self.tuned))) if other != repr(self.tuned)]
        if differ and self.global_rank == 0:
            log.warning("processes %s tuned their detectors otherwise than rank 0 (non-deterministic kernels?)", differ)

    # --- score ---------------------------------------------------------------------------
    def _score_batch(
        self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, seeds: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            columns = {"pred": self.nets[self.main](x).argmax(1).cpu(), "index": index.cpu(), "label": y.cpu()}
        for k, (detector, key) in enumerate(self.detectors):
            for part, value in detector.parts(self.nets[key], x, seeds).items():
                column = detector.name if part == "score" else f"{detector.name}/{part}"
                columns[column] = value.detach().float().cpu()
            note_progress(self._trainer, (k + 1) / len(self.detectors))
        return columns

    def _finish_score(self) -> None:
        """Gather the scores -> metrics -> files (rank 0) -> every process leaves together."""
        merged = self._gathered(SCORE)
        tables = []
        for loader in self.loaders:
            if loader.stage == SCORE:
                frame = pd.DataFrame({k: v.numpy() for k, v in merged.get(loader.name, {}).items()})
                frame.insert(0, "outlier", loader.name != IN_DISTRIBUTION)
                frame.insert(0, "set", loader.name)
                tables.append(frame)
        scores = pd.concat(tables, ignore_index=True)
        self.results = {
            "metrics": detector_metrics(scores, [d.name for d, _ in self.detectors]),
            **self.meta,
            "n_images": {str(k): int(v) for k, v in scores["set"].value_counts(sort=False).items()},
            **self.sizes,
            "tuned": self.tuned,
            "detector_config": self.detector_config,
            "runtime": self.runtime(),
            "convention": CONVENTION,
        }
        if self.global_rank == 0 and self.output_dir is not None:
            detectors = [d for d, _ in self.detectors]
            write_outputs(self.output_dir, scores, self.results, detectors, self.histograms)
        if self._trainer is not None:
            self._trainer.strategy.barrier("ood: outputs written")  # the files exist on every rank's return

    # --- helpers -------------------------------------------------------------------------
    def _gathered(self, stage: str) -> dict[str, dict[Any, torch.Tensor]]:
        """``{set name: rows in set order}`` of the loaders of ``stage``, from every process."""
        mine = {i: rows for i, rows in self._rows.items() if self.loaders[i].stage == stage}
        shares = gather_objects(mine)
        return {
            loader.name: merge_rows([share.get(i, []) for share in shares], loader)
            for i, loader in enumerate(self.loaders)
            if loader.stage == stage
        }

    @staticmethod
    def _checked(detector: Detector, step: Any, *args: Any) -> Any:
        """``step(*args)``, a :class:`DetectorError` named after the detector."""
        try:
            return step(*args)
        except DetectorError as err:
            raise DetectorError(f"detector {detector.name}: {err}") from None

    def runtime(self) -> dict[str, Any]:
        """What ``results.json`` records about the run's processes: this process's device, the
        number of processes, the strategy and the precision."""
        trainer = self._trainer
        return {
            "device": str(self.device),
            "world_size": trainer.world_size if trainer is not None else 1,
            "strategy": type(trainer.strategy).__name__ if trainer is not None else None,
            "precision": str(trainer.precision) if trainer is not None else "32-true",
        }
