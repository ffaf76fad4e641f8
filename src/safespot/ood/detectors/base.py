"""The detector base class and the stages an OOD run takes every detector through (paper 000,
Section 4.4: detectors are fitted on the in-distribution training images and tuned on the
in-distribution validation images against ``D_out^train``, never on ``D_out^test``).

An OOD run (:class:`safespot.ood.module.OODModule`) makes three passes, each over image sets
split over the run's processes:

1. **fitting** (detectors with ``fits_statistics``): every batch of the in-distribution training
   images updates the detector's :attr:`Detector.statistics`, a :class:`torchmetrics.Metric`
   (:meth:`Detector.accumulate`); its states are reduced over the processes (sum, min, max) and
   :meth:`Detector.finish_fit` derives the detector from them;
2. **tuning**: per-image values (:meth:`Detector.tune_values`) of the sets the detector names in
   :attr:`Detector.tuning_sets` (:data:`TUNE_IN`, the in-distribution validation images;
   :data:`TUNE_OUT`, ``D_out^train``), gathered in set order; :meth:`Detector.tune` chooses the
   settings and returns what ``results.json`` records;
3. **scoring**: :meth:`Detector.parts`, ``{"score": anomaly score, ...extra columns}`` per image.

:meth:`Detector.fit` runs the first two stages in one process over batch iterables (a notebook,
a test). A new detector is one file under ``safespot/ood/detectors/`` with a subclass that
overrides :meth:`Detector.parts` and the stages it uses, and one config under ``conf/detector/``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric

from safespot.errors import ConfigError
from safespot.ood.metrics import ood_metrics

# A source of fitting or tuning batches: a callable returning an iterator of
# (images on the model's device, labels, per-image seeds).
Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]

TUNE_IN, TUNE_OUT = "tune_in", "tune_out"
#: Float sums of the fitting statistics are kept in this many slices: the sums of fitting batch ``b``
#: go to slice ``b mod FIT_SLICES``, every slice is filled by one process in batch order
#: (:class:`safespot.data.samplers.WholeBatchSampler`) and the slices are added up in order, so the
#: statistics are bit for bit those of one process whatever the number of processes (up to
#: ``FIT_SLICES`` processes share the fitting pass).
FIT_SLICES = 8


class DetectorError(ConfigError):
    """A detector setting that cannot work with the given model or data."""


def add_slices(t: torch.Tensor) -> torch.Tensor:
    """``t[0] + t[1] + ...`` added in slice order (a fixed order, whatever the threads)."""
    total = t[0].clone()
    for part in t[1:]:
        total += part
    return total


def best_by_fpr95(candidates: Sequence[Any], in_scores: Sequence[torch.Tensor], out_scores: Sequence[torch.Tensor]):
    """The candidate whose anomaly scores separate ``D_in`` from ``D_out^train`` best: lowest
    FPR95, ties broken by higher AUROC, then by the earlier candidate. Returns
    ``(candidate, its metrics)``."""
    best, best_key, best_metrics = None, None, {}
    for candidate, a, b in zip(candidates, in_scores, out_scores, strict=True):
        metrics = ood_metrics(a, b)
        key = (metrics["fpr95"], -metrics["auroc"])
        if best_key is None or key < best_key:
            best, best_key, best_metrics = candidate, key, metrics
    return best, best_metrics


def concat_values(batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-image fields of several batches, each concatenated on the CPU."""
    chunks: dict[str, list[torch.Tensor]] = {}
    for fields in batches:
        for key, value in fields.items():
            chunks.setdefault(key, []).append(value.detach().cpu())
    return {k: torch.cat(v) for k, v in chunks.items()}


class Detector:
    """An OOD detector (module docstring): per-image anomaly scores from a classifier.

    ``requires_tuning``: whether tuning needs ``D_out^train`` (:data:`TUNE_OUT`). A detector that
    fits statistics sets ``fits_statistics`` and builds :attr:`statistics` in :meth:`prepare`
    when given a probe (its state shapes come from one forward pass)."""

    requires_tuning = False
    fits_statistics = False

    def __init__(self, name: str) -> None:
        if not name or "/" in name:
            raise DetectorError(f"detector name must be a non-empty string without '/', got {name!r}")
        self.name = name
        self.statistics: Metric | None = None

    def prepare(self, model: nn.Module, probe: torch.Tensor | None = None) -> None:
        """Check the settings against ``model`` (layer names ...), before any work; with ``probe``
        (fitting images of the model's input size) also build :attr:`statistics`."""

    # --- 1. fitting ------------------------------------------------------------------------
    def accumulate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
        """Add fitting batch number ``batch`` (images ``x``, labels ``y``) to :attr:`statistics`."""

    def finish_fit(self, model: nn.Module) -> None:
        """Derive the detector from :attr:`statistics` (reduced over the processes)."""

    # --- 2. tuning -------------------------------------------------------------------------
    @property
    def tuning_sets(self) -> tuple[str, ...]:
        """The sets :meth:`tune` needs per-image values of (:data:`TUNE_IN`, :data:`TUNE_OUT`)."""
        return (TUNE_IN, TUNE_OUT) if self.requires_tuning else ()

    def tune_values(self, model: nn.Module, x: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image values (first dimension: the batch) of a tuning batch."""
        return {}

    def tune(self, values: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        """Choose the settings from ``{set: {key: per-image values in set order}}`` of every set
        in :attr:`tuning_sets`; returns the settings (written to results.json)."""
        return {}

    # --- 3. scoring ------------------------------------------------------------------------
    def parts(self, model: nn.Module, x: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"score": anomaly score (higher = more anomalous), ...extra columns}`` per image."""
        raise NotImplementedError

    def score(self, model: nn.Module, x: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
        seeds = torch.arange(len(x), device=x.device) if seeds is None else seeds.to(x.device)
        return self.parts(model, x, seeds)["score"]

    # --- all of it in one process ----------------------------------------------------------
    def fit(self, model: nn.Module, fit: Batches, tune_in: Batches, tune_out: Batches | None) -> dict[str, Any]:
        """Fit on ``fit`` and tune on ``tune_in`` / ``tune_out`` in this process (the stages an OOD
        run splits over its processes); returns the settings. Without a probe given to
        :meth:`prepare`, the first fitting batch is the probe."""
        if self.fits_statistics:
            for batch, (x, y, _) in enumerate(fit()):
                if self.statistics is None:
                    self.prepare(model, probe=x[:1])
                self.accumulate(model, x, y, batch)
            if self.statistics is None:
                raise DetectorError(f"{self.name}: no fitting images")
            self.finish_fit(model)
        sources = {TUNE_IN: tune_in, TUNE_OUT: tune_out}
        if any(sources[s] is None for s in self.tuning_sets):
            raise DetectorError(f"{self.name}: tuning needs D_out^train")
        values = {
            s: concat_values(self.tune_values(model, x, seeds) for x, _, seeds in sources[s]())
            for s in self.tuning_sets
        }
        return self.tune(values)
