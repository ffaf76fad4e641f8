"""The Mahalanobis detector: Lee et al. (2018, "A Simple Unified Framework for Detecting
Out-of-Distribution Samples and Adversarial Attacks", Eqs. 1-3 and Algorithm 1)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from safespot.attacks import attack_context
from safespot.ood.detectors.base import (
    FIT_SLICES,
    TUNE_IN,
    TUNE_OUT,
    Detector,
    DetectorError,
    add_slices,
    best_by_fpr95,
)
from safespot.ood.detectors.layers import CONV, STAGES, Layer, capture, pooled, resolve_layers
from safespot.threat import LpBall

LEE_NOISE = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-4) -> tuple[torch.Tensor, float]:
    """Logistic regression ``P(label = 1) = sigmoid(features @ w + b)`` by L-BFGS on standardised
    features with a small L2 penalty; returns ``(w, b)`` in the original feature units."""
    x, y = features.double(), labels.double()
    center, scale = x.mean(0), x.std(0).clamp_min(1e-12)
    z = (x - center) / scale
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    weights = (w.detach() / scale).float()
    return weights, float(b.detach() - (center / scale * w.detach()).sum())


class ClassMoments(Metric):
    """Lee et al.'s Eq. 1 ingredients over the fitting images, per layer (float64): the class
    counts, the per-class feature sums and ``f^T f``.

    Summed over the processes. The counts are integers (exact in any order); the float sums of
    fitting batch ``b`` are added to slice ``b mod slices``, whose batches one process adds in
    batch order (:data:`~safespot.ood.detectors.base.FIT_SLICES`), so the reduction adds each
    slice's sums to zeros and :meth:`compute` adds the slices up in order: one process's
    statistics, bit for bit, whatever the number of processes."""

    full_state_update = False

    def __init__(self, num_classes: int, dims: Sequence[int], slices: int = FIT_SLICES) -> None:
        super().__init__()
        self.slices, self.layers = int(slices), len(dims)
        self.add_state("counts", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        for i, d in enumerate(dims):
            self.add_state(f"sums{i}", torch.zeros(slices, num_classes, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"outer{i}", torch.zeros(slices, d, d, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, features: Sequence[torch.Tensor], labels: torch.Tensor, batch: int) -> None:
        """Add fitting batch number ``batch``: ``features`` (one ``(B, d)`` tensor per layer) of
        images of classes ``labels``."""
        counts = self.counts
        k = len(counts)
        labels = labels.to(counts.device, torch.long)
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < k:
            raise DetectorError(f"fitting labels must lie in 0..{k - 1} (the model's classes)")
        counts += torch.bincount(labels, minlength=k).double()
        s = batch % self.slices
        for i, f in enumerate(features):
            f = f.to(counts.device, torch.float64)
            sums, outer = getattr(self, f"sums{i}"), getattr(self, f"outer{i}")
            sums[s] += torch.zeros_like(sums[s]).index_add_(0, labels, f)
            outer[s] += f.T @ f

    def compute(self) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``(counts, [per-class sums], [f^T f])``, one entry per layer."""
        sums = [add_slices(getattr(self, f"sums{i}")) for i in range(self.layers)]
        return self.counts, sums, [add_slices(getattr(self, f"outer{i}")) for i in range(self.layers)]


class Mahalanobis(Detector):
    """Lee et al. (2018): class-conditional Gaussians with a tied covariance on layer features.

    For each layer ``l`` (``layers``: ``stages``, the output of each stage of the network as in
    Lee et al.'s ensemble, see :func:`~safespot.ood.detectors.layers.stage_modules`;
    ``penultimate``; ``conv``; module names) the channel means
    ``f_l(x)`` of the activations are fitted on the in-distribution training images by class
    means ``mu_{l,c}`` and one covariance ``Sigma_l = (1/N) sum_c sum_{i in c} (f - mu_c)(f - mu_c)^T``
    (Eq. 1). The confidence of layer ``l`` is ``M_l(x) = max_c -(f_l(x) - mu_{l,c})^T
    Sigma_l^+ (f_l(x) - mu_{l,c})`` (Eq. 2), computed after input preprocessing
    ``x^ = clip(x - noise * sign(grad_x (f_l(x) - mu_{l,c^})^T Sigma_l^+ (f_l(x) - mu_{l,c^})), 0, 1)``
    with ``c^`` the closest class (Eq. 3; ``noise`` in [0, 1] pixel units, as Lee et al.'s
    magnitudes once their normalisation is undone). Several layers are combined by a
    logistic-regression ensemble ``sum_l alpha_l M_l`` (Algorithm 1).

    Following paper 000 (Section 4.4), the noise magnitude (from ``noise``, Lee et al.'s grid by
    default) and the ensemble weights are tuned on the in-distribution validation images
    against ``D_out^train`` (lowest FPR95, then highest AUROC), never on ``D_out^test``.
    The anomaly score is ``-sum_l alpha_l M_l(x^)``. The statistics are a
    :class:`ClassMoments` metric.
    """

    fits_statistics = True

    def __init__(
        self, name: str = "mahalanobis", layers: Sequence[str] = (STAGES,), noise: Sequence[float] = LEE_NOISE
    ) -> None:
        super().__init__(name)
        self.layers = [str(v) for v in ([layers] if isinstance(layers, str) else layers)]
        self.noise_grid = [float(v) for v in ([noise] if isinstance(noise, int | float) else noise)]
        if not self.layers or not self.noise_grid or any(v < 0 for v in self.noise_grid):
            raise DetectorError(f"{name}: layers must be non-empty and noise a non-empty list of values >= 0")
        self.noise, self.weights, self.bias = self.noise_grid[0], None, 0.0
        self.means: list[torch.Tensor] = []
        self.precisions: list[torch.Tensor] = []
        self._layers: list[Layer] | None = None

    @property
    def requires_tuning(self) -> bool:  # type: ignore[override]
        """A noise grid, or several layers (``conv`` and ``stages`` count as several until
        resolved; ``stages`` is resolved with a probe)."""
        if len(self.noise_grid) > 1:
            return True
        if self._layers is not None:
            return len(self._layers) > 1
        return len(self.layers) > 1 or any(v in (CONV, STAGES) for v in self.layers)

    def prepare(self, model: nn.Module, probe: torch.Tensor | None = None) -> None:
        """Resolve the layers (``stages`` needs ``probe``: without it only the other layers are
        checked) and, with ``probe``, build the statistics for the features' sizes."""
        if probe is None and STAGES in self.layers:
            if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
                raise DetectorError("layer 'stages' needs a model with nn.Conv2d layers")
            resolve_layers(model, [v for v in self.layers if v != STAGES])
            self._layers = None
            return
        self._layers = resolve_layers(model, self.layers, probe=probe)
        if probe is not None:
            with attack_context(model, "eval", update_bn=False), torch.no_grad():
                logits = model(probe)
                dims = [f.shape[1] for f in self._features(model, probe)]
            self.statistics = ClassMoments(logits.shape[1], dims)

    @property
    def layer_names(self) -> list[str]:
        """The resolved layers' names."""
        return [n for n, _, _ in self._layers or []]

    def _features(self, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        if self._layers is None:
            raise DetectorError(f"{self.name}: fit the detector first (its layers are not resolved)")
        with capture(self._layers) as store:
            model(x)
        return [pooled(store[name]).double() for name, _, _ in self._layers]

    def _distances(self, f: torch.Tensor, layer: int) -> torch.Tensor:
        """``(B, K)`` squared Mahalanobis distances of features ``f`` to every class mean."""
        centered = f[:, None, :] - self.means[layer][None]
        return torch.einsum("bkd,de,bke->bk", centered, self.precisions[layer], centered)

    def accumulate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
        with attack_context(model, "eval", update_bn=False), torch.no_grad():
            self.statistics.update(self._features(model, x), y, batch)

    def finish_fit(self, model: nn.Module) -> None:
        """Class means and the tied covariance of each layer (float64) from the statistics."""
        counts, sums, outer = self.statistics.compute()
        if (counts == 0).any():
            missing = torch.nonzero(counts == 0).flatten().tolist()
            raise DetectorError(f"{self.name}: no fitting images for classes {missing}")
        device = next((p.device for p in model.parameters()), counts.device)
        counts = counts.to(device)
        n = counts.sum()
        self.means, self.precisions = [], []
        for s, o in zip(sums, outer, strict=True):
            means = s.to(device) / counts[:, None]
            cov = (o.to(device) - (means.T * counts) @ means) / n
            self.means.append(means)
            self.precisions.append(torch.linalg.pinv(cov, hermitian=True))

    def layer_confidences(self, model: nn.Module, x: torch.Tensor, noise: float) -> torch.Tensor:
        """``(B, L)``: ``M_l`` of each layer after that layer's input preprocessing."""
        columns = []
        with attack_context(model, "eval", update_bn=False):
            for layer in range(len(self.means)):
                x_hat = x
                if noise > 0:
                    x_in = x.detach().clone().requires_grad_(True)
                    d = self._distances(self._features(model, x_in)[layer], layer)
                    (grad,) = torch.autograd.grad(d.min(1).values.sum(), x_in)
                    x_hat = LpBall("linf", noise).step(x, -grad, noise, x)  # Lee et al.'s FGSM-style step
                with torch.no_grad():
                    columns.append(-self._distances(self._features(model, x_hat)[layer], layer).min(1).values)
        return torch.stack(columns, 1)

    def _combine(self, confidences: torch.Tensor, weights: torch.Tensor | None, bias: float) -> torch.Tensor:
        if weights is None:
            return confidences.sum(1)
        return confidences @ weights.to(confidences) + bias

    def tune_values(self, model: nn.Module, x: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """The layer confidences at every noise level of the grid (``noise<k>``: level ``k``)."""
        return {f"noise{k}": self.layer_confidences(model, x, noise) for k, noise in enumerate(self.noise_grid)}

    def tune(self, values: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        """The noise level and, for several layers, the ensemble weights with the lowest FPR95 of
        ``D_out^train`` against the in-distribution validation images."""
        if not self.requires_tuning:
            return {"noise": self.noise, "layers": self.layers, "resolved_layers": self.layer_names}
        candidates, in_scores, out_scores = [], [], []
        for k, noise in enumerate(self.noise_grid):
            a, b = values[TUNE_IN][f"noise{k}"], values[TUNE_OUT][f"noise{k}"]
            weights, bias = None, 0.0
            if a.shape[1] > 1:
                labels = torch.cat([torch.ones(len(a)), torch.zeros(len(b))])
                weights, bias = fit_logistic(torch.cat([a, b]), labels)
            candidates.append((noise, weights, bias))
            in_scores.append(-self._combine(a, weights, bias))
            out_scores.append(-self._combine(b, weights, bias))
        (self.noise, self.weights, self.bias), metrics = best_by_fpr95(candidates, in_scores, out_scores)
        weights = None if self.weights is None else [float(w) for w in self.weights]
        return {
            "noise": self.noise,
            "layers": self.layers,
            "resolved_layers": self.layer_names,
            "weights": weights,
            "bias": self.bias,
            "tune": metrics,
        }

    def parts(self, model: nn.Module, x: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        confidences = self.layer_confidences(model, x, self.noise)
        return {"score": -self._combine(confidences, self.weights, self.bias).float()}
