"""The Gram-matrix detector: Sastry & Oore (2020, "Detecting Out-of-Distribution Examples with
Gram Matrices"), in the simple form documented on :class:`GramDetector`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from safespot.attacks import attack_context
from safespot.ood.detectors.base import TUNE_IN, Detector, DetectorError
from safespot.ood.detectors.layers import Layer, capture, resolve_layers

_GRAM_EPS = 1e-6  # keeps the relative deviation finite at a zero bound


class ClassRanges(Metric):
    """Per layer, the elementwise minimum and maximum of the features of the fitting images by
    predicted class, and how many images each class was predicted for. Minima and maxima are
    exact in any order, so the reduction over the processes (min, max, sum) gives one process's
    ranges."""

    full_state_update = False

    def __init__(self, num_classes: int, shapes: Sequence[tuple[int, ...]]) -> None:
        super().__init__()
        self.layers = len(shapes)
        self.add_state("counts", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        for i, shape in enumerate(shapes):
            lows = torch.full((num_classes, *shape), torch.inf, dtype=torch.float64)
            self.add_state(f"mins{i}", lows, dist_reduce_fx="min")
            self.add_state(f"maxs{i}", -lows, dist_reduce_fx="max")

    def update(self, features: Sequence[torch.Tensor], predicted: torch.Tensor) -> None:
        """Add images with ``features`` (one ``(B, ...)`` tensor per layer) predicted as ``predicted``."""
        counts = self.counts
        predicted = predicted.to(counts.device)
        counts += torch.bincount(predicted, minlength=len(counts)).double()
        for i, f in enumerate(features):
            f = f.to(counts.device, torch.float64)
            rows = predicted.view(-1, *[1] * (f.dim() - 1)).expand_as(f)
            getattr(self, f"mins{i}").scatter_reduce_(0, rows, f, reduce="amin")
            getattr(self, f"maxs{i}").scatter_reduce_(0, rows, f, reduce="amax")

    def compute(self) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``(counts, [minima], [maxima])``, one entry per layer."""
        layers = range(self.layers)
        return self.counts, [getattr(self, f"mins{i}") for i in layers], [getattr(self, f"maxs{i}") for i in layers]


class GramDetector(Detector):
    """Sastry & Oore (2020), a simple form.

    For each layer ``l`` (``layers``; default every ``nn.Conv2d`` output) with activations
    ``F`` of shape ``(C, HW)`` and each order ``p = 1..powers``, the feature is the row sum of
    the ``p``-th order Gram matrix, ``g_{l,p} = sign(G) |G|^{1/p} 1`` with ``G = F^p (F^p)^T``
    (``F^p`` elementwise): ``C`` values per (layer, order). On the in-distribution training
    images, grouped by the model's *predicted* class ``c``, the elementwise minimum and
    maximum of every ``g_{l,p}`` are recorded (a :class:`ClassRanges` metric). A test image
    predicted as ``c`` deviates from
    them by ``delta(v) = (min - v) / |min|`` below the minimum, ``(v - max) / |max|`` above the
    maximum, 0 in between (``1e-6`` is added to ``|min|`` and ``|max|``), summed over orders and
    entries into ``delta_l(x)``. The anomaly
    score is ``sum_l delta_l(x) / E[delta_l]``, each layer normalised by its mean deviation
    on the in-distribution validation images. No outliers are used.
    """

    fits_statistics = True

    def __init__(self, name: str = "gram", layers: Sequence[str] = ("conv",), powers: int = 10) -> None:
        super().__init__(name)
        self.layers = [str(v) for v in ([layers] if isinstance(layers, str) else layers)]
        if isinstance(powers, bool) or not isinstance(powers, int) or powers < 1:
            raise DetectorError(f"{name}.powers must be an integer >= 1, got {powers!r}")
        self.powers = powers
        self.mins: list[torch.Tensor] = []
        self.maxs: list[torch.Tensor] = []
        self.expected: torch.Tensor | None = None
        self._layers: list[Layer] = []

    def prepare(self, model: nn.Module, probe: torch.Tensor | None = None) -> None:
        """Resolve the layers and, with ``probe``, build the statistics for the features' shapes."""
        self._layers = resolve_layers(model, self.layers)
        if probe is not None:
            with attack_context(model, "eval", update_bn=False):
                feats, logits = self.gram_features(model, probe)
            self.statistics = ClassRanges(logits.shape[1], [tuple(f.shape[1:]) for f in feats])

    def gram_features(self, model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``([(B, powers, C) per layer], logits)``."""
        with torch.no_grad(), capture(self._layers) as store:
            logits = model(x)
        feats = []
        for name, _, _ in self._layers:
            t = store[name].double()
            f = t.flatten(2) if t.dim() > 2 else t[..., None]
            rows = []
            for p in range(1, self.powers + 1):
                fp = f.pow(p)
                g = torch.bmm(fp, fp.sum(1, keepdim=True).transpose(1, 2)).squeeze(2)
                rows.append(torch.copysign(g.abs().pow(1.0 / p), g))  # signed p-th root
            feats.append(torch.stack(rows, 1))
        return feats, logits

    def deviations(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` per-layer deviations ``delta_l`` from the predicted class's ranges."""
        feats, logits = self.gram_features(model, x)
        pred = logits.argmax(1)
        columns = []
        for v, mins, maxs in zip(feats, self.mins, self.maxs, strict=True):
            lo, hi = mins[pred], maxs[pred]
            below = F.relu(lo - v) / (lo.abs() + _GRAM_EPS)
            above = F.relu(v - hi) / (hi.abs() + _GRAM_EPS)
            columns.append((below + above).flatten(1).sum(1))
        return torch.stack(columns, 1)

    def accumulate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
        with attack_context(model, "eval", update_bn=False):
            feats, logits = self.gram_features(model, x)
        self.statistics.update(feats, logits.argmax(1))

    def finish_fit(self, model: nn.Module) -> None:
        """The ranges of every class; a class never predicted gets the ranges of all classes."""
        counts, mins, maxs = self.statistics.compute()
        seen = counts > 0
        if not seen.any():
            raise DetectorError(f"{self.name}: no fitting images")
        device = next((p.device for p in model.parameters()), counts.device)
        seen = seen.to(device)
        self.mins = [t.to(device, copy=True) for t in mins]
        self.maxs = [t.to(device, copy=True) for t in maxs]
        for lows, highs in zip(self.mins, self.maxs, strict=True):
            lows[~seen] = lows[seen].amin(0)
            highs[~seen] = highs[seen].amax(0)

    @property
    def tuning_sets(self) -> tuple[str, ...]:
        return (TUNE_IN,)

    def tune_values(self, model: nn.Module, x: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        with attack_context(model, "eval", update_bn=False):
            return {"d": self.deviations(model, x)}

    def tune(self, values: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        """Each layer's mean deviation on the in-distribution validation images."""
        self.expected = values[TUNE_IN]["d"].mean(0).clamp_min(1e-12)
        return {"layers": [n for n, _, _ in self._layers], "powers": self.powers}

    def parts(self, model: nn.Module, x: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        with attack_context(model, "eval", update_bn=False):
            deviations = self.deviations(model, x)
        return {"score": (deviations / self.expected.to(deviations)).sum(1).float()}
