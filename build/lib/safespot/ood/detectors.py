"""OOD detectors: per-image anomaly scores (higher = more anomalous, see
:mod:`safespot.ood.metrics`) from a trained classifier.

- :class:`MSP`: the negated maximum softmax probability (Hendrycks & Gimpel, 2017). On a model
  trained with Outlier Exposure it is the "OE" detector of paper 000, Table 4 (Hendrycks et
  al., 2019).
- :class:`Energy`: the free energy ``-T logsumexp(logits / T)`` (Liu et al., 2020).
- :class:`Mahalanobis`: Lee et al. (2018, "A Simple Unified Framework for Detecting
  Out-of-Distribution Samples and Adversarial Attacks", Eqs. 1-3 and Algorithm 1).
- :class:`GramDetector`: Sastry & Oore (2020, "Detecting Out-of-Distribution Examples with
  Gram Matrices"), in the simple form documented on the class.
- :class:`SafeSpotScore`: paper 000, Section 3.6: ``D(x) = mu * MSP(x) + (1 - mu) * MSP(x_a*)``.

A detector is prepared on a model (:meth:`Detector.prepare`, which checks its settings
against the network), fitted (:meth:`Detector.fit`) on in-distribution training images and
tuned on the in-distribution validation images and ``D_out^train`` (paper 000 tunes every
detector on ``D_out^train``, never on ``D_out^test``), and scores batches with
:meth:`Detector.parts`, which returns ``{"score": anomaly score, ...extra columns}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from safespot.attacks import attack_context
from safespot.errors import ConfigError
from safespot.ood.metrics import ood_metrics
from safespot.threat import LpBall
from safespot.utils.rng import derive

if TYPE_CHECKING:
    from safespot.attacks.base import Attack
    from safespot.defenses.robustifier import Robustifier

# A source of tuning or fitting batches: a callable returning an iterator of
# (images on the model's device, labels, per-image seeds).
Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class _Failed:
    """What a process shares in place of its result when computing it raised."""

    message: str


def share(gather_objects: Callable[[Any], list[Any]], compute: Callable[[], Any]) -> list[Any]:
    """``compute()`` of every process in rank order (through ``gather_objects``). If it raises in
    one process, every process raises (the failing one its own error, the others a
    ``RuntimeError`` naming it) instead of the others waiting for it in the next collective."""
    try:
        value = compute()
    except Exception as error:
        gather_objects(_Failed(f"{type(error).__name__}: {error}"))
        raise
    results = gather_objects(value)
    failed = [(rank, r.message) for rank, r in enumerate(results) if isinstance(r, _Failed)]
    if failed:
        raise RuntimeError(f"process {failed[0][0]} failed: {failed[0][1]}")
    return results


@dataclass(frozen=True)
class ShardedBatches:
    """A :data:`Batches` source over a whole set that also knows this process's share of it, so
    work in a detector's fitting and tuning runs once per image over all processes (calling it
    iterates over the whole set, as a plain :data:`Batches` does; ``gather_objects``: every
    process's object in rank order).

    - Per image: ``local`` iterates over the positions ``positions`` of the set (this process's
      share, in order) and :meth:`gather` puts per-image fields computed on them back in set
      order, in every process (tuning).
    - Per batch: ``batch_share`` iterates over this process's whole batches of ``every`` and
      :meth:`per_batch` yields every batch's result in batch order, in every process (fitting
      statistics)."""

    every: Batches
    local: Batches
    positions: Sequence[int]
    gather_objects: Callable[[Any], list[Any]]
    #: this process's whole batches of ``every``: batches ``rank, rank + N, ...``, as batched there
    batch_share: Batches | None = None
    #: ``ceil(batches of every / N)``: rounds of :meth:`per_batch`, the same in every process
    rounds: int = 0

    def __call__(self) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return self.every()

    def per_batch(self, fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]) -> Iterator[Any]:
        """``fn(x, y, seeds)`` of every batch of the whole set, in batch order, in every process;
        batch ``b`` is computed by process ``b mod N`` only (round ``t`` computes batches ``tN``
        to ``tN + N - 1`` and shares their results, moved to the CPU). A batch's result is that
        of one process, so a fold over them in this order is too. An error in one process is
        raised in every process (:func:`share`)."""
        if self.batch_share is None:
            yield from (fn(*batch) for batch in self.every())
            return
        mine = iter(self.batch_share())
        for _ in range(self.rounds):

            def compute(mine: Iterator[Any] = mine) -> Any:
                batch = next(mine, None)
                return None if batch is None else _to_cpu(fn(*batch))

            yield from (r for r in share(self.gather_objects, compute) if r is not None)
        if next(mine, None) is not None:
            raise RuntimeError(f"this process has more than rounds={self.rounds} batches of the set")

    def gather(
        self, fields: dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Every process's ``fields`` (per-image rows of its share, or a callable computing them,
        whose error is then raised in every process: :func:`share`), merged in set order."""
        compute = fields if callable(fields) else lambda: fields
        shards = share(self.gather_objects, lambda: (list(self.positions), compute()))
        keys = next((list(f) for _, f in shards if f), [])
        positions = torch.tensor([p for pos, _ in shards for p in pos], dtype=torch.long)
        order = torch.argsort(positions)
        if not torch.equal(positions[order], torch.arange(len(positions))):
            raise RuntimeError("the processes' shares do not cover the set exactly once")
        return {k: torch.cat([f[k] for _, f in shards if f])[order] for k in keys}


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


def per_batch(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any], batches: Batches) -> Iterator[Any]:
    """``fn(x, y, seeds)`` of every batch, in batch order; over a :class:`ShardedBatches`, each
    batch is computed by one process and the results are shared (:meth:`ShardedBatches.per_batch`)."""
    if isinstance(batches, ShardedBatches):
        yield from batches.per_batch(fn)
    else:
        yield from (fn(*batch) for batch in batches())


def _pad_rows(t: torch.Tensor, rows: int, value: float) -> torch.Tensor:
    """``t`` with rows of ``value`` appended up to ``rows`` (per-class statistics of a batch whose
    labels did not reach the last class)."""
    if len(t) >= rows:
        return t
    return torch.cat([t, t.new_full((rows - len(t), *t.shape[1:]), value)])


MU_GRID = tuple(round(0.1 * i, 1) for i in range(11))
LEE_NOISE = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)
_GRAM_EPS = 1e-6  # keeps the relative deviation finite at a zero bound


class DetectorError(ConfigError):
    """A detector setting that cannot work with the given model or data."""


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


# --- features ---------------------------------------------------------------------------
PENULTIMATE, CONV, STAGES = "penultimate", "conv", "stages"


def resolve_layers(
    model: nn.Module, layers: Sequence[str], probe: torch.Tensor | None = None
) -> list[tuple[str, nn.Module, bool]]:
    """``(name, module, capture its input)`` for each requested layer: ``penultimate`` (the
    input of the last ``nn.Linear``), ``conv`` (every ``nn.Conv2d`` output), ``stages`` (the
    output of each stage of the network, :func:`stage_modules`; found by a forward pass of
    ``probe``, images of the model's input size) or a module name from ``model.named_modules()``."""
    modules = dict(model.named_modules())
    resolved: list[tuple[str, nn.Module, bool]] = []
    for layer in layers:
        if layer == PENULTIMATE:
            linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
            if not linears:
                raise DetectorError("layer 'penultimate' needs a model with an nn.Linear head")
            resolved.append((PENULTIMATE, linears[-1][1], True))
        elif layer == CONV:
            convs = [(n, m, False) for n, m in modules.items() if isinstance(m, nn.Conv2d)]
            if not convs:
                raise DetectorError("layer 'conv' needs a model with nn.Conv2d layers")
            resolved.extend(convs)
        elif layer == STAGES:
            if probe is None:
                raise DetectorError(
                    "layer 'stages' is found by a forward pass of the fitting images, which only the "
                    "Mahalanobis detector makes; name the layers instead"
                )
            resolved.extend((n, modules[n], False) for n in stage_modules(model, probe))
        elif layer in modules and layer:
            resolved.append((layer, modules[layer], False))
        else:
            names = [n for n in modules if n][:12]
            raise DetectorError(
                f"unknown layer {layer!r}; use 'penultimate', 'conv', 'stages' or a module name such as {names}"
            )
    names = [n for n, _, _ in resolved]
    if len(set(names)) != len(names):
        raise DetectorError(f"layers {list(layers)} name a layer twice: {names}")
    return resolved


def stage_modules(model: nn.Module, probe: torch.Tensor) -> list[str]:
    """Names of the modules whose outputs end the *stages* of a convolutional network: the
    feature maps of Lee et al.'s (2018) multi-layer ensemble (the stem and each residual stage of
    a ResNet), found from one forward pass of ``probe`` without knowing the architecture.

    Every module's 4-D output is recorded in the order the modules finish. The *trunk* is the
    shallowest module depth (``a.b.c`` has depth 3) whose modules produce at least two different
    feature-map shapes ``(C, H, W)``, leaving out the input's own shape (e.g. ``Normalize``) and
    ``1 x 1`` maps (global pooling: those are the penultimate features). Consecutive trunk
    modules with the same output shape form one stage, which ends at the last of them.

    With the models of ``conf/model``: SmallCNN ``backbone.features.0`` ... ``.2`` (its three
    conv blocks); PreActResNet-18 ``backbone.features.2``, ``.4``, ``.6`` and ``.10`` (the stem
    conv has the first stage's shape and joins it; the last stage ends after the final
    batch norm + ReLU); WRN-34-10 / WRN-28-10 the stem ``backbone.features.0`` and the ends of
    its three stages, the last after the final batch norm + ReLU; torchvision's ResNet-50 the
    stem (after ReLU and after max pooling), ``layer1`` ... ``layer4``; the FLSS models the same
    modules of their encoder (``encoder.features.*``). The channel means of the last stage are
    the penultimate features of these networks (global average pooling, then the linear head).
    """
    records: list[tuple[str, int, tuple[int, ...]]] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(m: nn.Module, args: Any, out: Any, n: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                records.append((n, n.count(".") + 1, tuple(out.shape[1:])))

        handles.append(module.register_forward_hook(hook))
    try:
        with attack_context(model, "eval", update_bn=False), torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    image = tuple(probe.shape[1:])
    for depth in sorted({d for _, d, _ in records}):
        runs: list[list[Any]] = []  # [last module name, shape] of consecutive equal shapes
        for name, d, shape in records:
            if d != depth:
                continue
            if runs and runs[-1][1] == shape:
                runs[-1][0] = name
            else:
                runs.append([name, shape])
        stages = [(n, shape) for n, shape in runs if shape != image and shape[1] * shape[2] > 1]
        if len({shape for _, shape in stages}) >= 2:
            names = [n for n, _ in stages]
            if len(set(names)) != len(names):
                raise DetectorError(
                    f"layer 'stages': module(s) {sorted({n for n in names if names.count(n) > 1})} end several "
                    "stages (a module called more than once); name the layers instead"
                )
            return names
    raise DetectorError("layer 'stages' needs a convolutional network whose feature maps change shape; name the layers")


@contextmanager
def capture(layers: Sequence[tuple[str, nn.Module, bool]]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output (or input) of each layer during forward passes inside the block."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name, module, use_input in layers:
        if use_input:
            handles.append(module.register_forward_pre_hook(lambda m, args, n=name: store.__setitem__(n, args[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, n=name: store.__setitem__(n, out)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def pooled(t: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` channel means of a ``(B, C, ...)`` activation (Lee et al.'s feature)."""
    return t.flatten(2).mean(2) if t.dim() > 2 else t


# --- detectors --------------------------------------------------------------------------
class Detector:
    """Base class. ``requires_tuning``: whether :meth:`fit` needs ``D_out^train``."""

    requires_tuning = False

    def __init__(self, name: str) -> None:
        if not name or "/" in name:
            raise DetectorError(f"detector name must be a non-empty string without '/', got {name!r}")
        self.name = name

    def prepare(self, model: nn.Module) -> None:
        """Check the settings against ``model`` (layer names ...), before any work."""

    def fit(self, model: nn.Module, fit: Batches, tune_in: Batches, tune_out: Batches | None) -> dict[str, Any]:
        """Fit and tune; returns the chosen settings (written to results.json)."""
        return {}

    def parts(self, model: nn.Module, x: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def score(self, model: nn.Module, x: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
        seeds = torch.arange(len(x), device=x.device) if seeds is None else seeds.to(x.device)
        return self.parts(model, x, seeds)["score"]


class MSP(Detector):
    """``-max_y softmax(c(x))_y`` (Hendrycks & Gimpel, 2017; "OE" on an OE-trained model)."""

    def __init__(self, name: str = "msp") -> None:
        super().__init__(name)

    @torch.no_grad()
    def parts(self, model: nn.Module, x: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"score": -F.softmax(model(x).float(), dim=1).amax(1)}


class Energy(Detector):
    """Free energy ``E(x) = -T logsumexp(logits / T)`` (Liu et al., 2020, Eq. 7); higher
    energy = more anomalous."""

    def __init__(self, name: str = "energy", temperature: float = 1.0) -> None:
        super().__init__(name)
        if temperature <= 0:
            raise DetectorError(f"{name}.temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    @torch.no_grad()
    def parts(self, model: nn.Module, x: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.temperature
        return {"score": -t * torch.logsumexp(model(x).float() / t, dim=1)}


class Mahalanobis(Detector):
    """Lee et al. (2018): class-conditional Gaussians with a tied covariance on layer features.

    For each layer ``l`` (``layers``: ``stages``, the output of each stage of the network as in
    Lee et al.'s ensemble, see :func:`stage_modules`; ``penultimate``; ``conv``; module names) the
    channel means
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
    The anomaly score is ``-sum_l alpha_l M_l(x^)``.
    """

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
        self._layers: list[tuple[str, nn.Module, bool]] | None = None

    @property
    def requires_tuning(self) -> bool:  # type: ignore[override]
        """A noise grid, or several layers (``conv`` and ``stages`` count as several until
        resolved; ``stages`` is resolved by :meth:`fit`)."""
        if len(self.noise_grid) > 1:
            return True
        if self._layers is not None:
            return len(self._layers) > 1
        return len(self.layers) > 1 or any(v in (CONV, STAGES) for v in self.layers)

    def prepare(self, model: nn.Module) -> None:
        """Resolve the layers; ``stages`` needs images and is resolved by :meth:`fit` (the other
        layers are checked here)."""
        if STAGES in self.layers:
            if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
                raise DetectorError("layer 'stages' needs a model with nn.Conv2d layers")
            resolve_layers(model, [v for v in self.layers if v != STAGES])
            self._layers = None
        else:
            self._layers = resolve_layers(model, self.layers)

    @property
    def layer_names(self) -> list[str]:
        """The resolved layers' names (after :meth:`fit`)."""
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

    def fit_gaussians(self, model: nn.Module, fit: Batches) -> None:
        """Class means and the tied covariance of each layer (float64): per batch, the class
        counts, the per-class feature sums and ``f^T f``; added up in batch order
        (:func:`per_batch`: each batch is computed by one process, the sums are the same in every
        process and equal one process's)."""
        k_model = int(getattr(model, "num_classes", 0) or 0)

        def statistics(x: torch.Tensor, y: torch.Tensor, _: torch.Tensor) -> dict[str, Any]:
            feats = self._features(model, x)
            y = y.to(feats[0].device)
            k = k_model or int(y.max()) + 1
            counts = torch.bincount(y, minlength=k).double()
            sums = [
                torch.zeros(len(counts), f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, y, f) for f in feats
            ]
            return {"counts": counts, "sums": sums, "outer": [f.T @ f for f in feats]}

        total: dict[str, Any] | None = None
        with attack_context(model, "eval", update_bn=False), torch.no_grad():
            for part in per_batch(statistics, fit):
                if total is None:
                    total = dict(part)  # a new dict: a gathered part may be shared
                    continue
                k = max(len(total["counts"]), len(part["counts"]))
                total["counts"] = _pad_rows(total["counts"], k, 0) + _pad_rows(part["counts"], k, 0).to(total["counts"])
                total["sums"] = [
                    _pad_rows(s, k, 0) + _pad_rows(p, k, 0).to(s)
                    for s, p in zip(total["sums"], part["sums"], strict=True)
                ]
                total["outer"] = [o + p.to(o) for o, p in zip(total["outer"], part["outer"], strict=True)]
        counts = None if total is None else total["counts"]
        if counts is None or (counts == 0).any():
            missing = [] if counts is None else torch.nonzero(counts == 0).flatten().tolist()
            raise DetectorError(f"{self.name}: no fitting images for classes {missing or 'any'}")
        device = next((p.device for p in model.parameters()), counts.device)
        counts = counts.to(device)
        n = counts.sum()
        self.means, self.precisions = [], []
        for s, o in zip(total["sums"], total["outer"], strict=True):
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

    def fit(self, model: nn.Module, fit: Batches, tune_in: Batches, tune_out: Batches | None) -> dict[str, Any]:
        if self._layers is None:  # `stages` (or prepare was skipped): resolve on a fitting image
            first = next(iter(fit()), None)
            if first is None:
                raise DetectorError(f"{self.name}: no fitting images")
            self._layers = resolve_layers(model, self.layers, probe=first[0][:1])
        self.fit_gaussians(model, fit)
        if not self.requires_tuning:
            return {"noise": self.noise, "layers": self.layers, "resolved_layers": self.layer_names}
        if tune_out is None:
            raise DetectorError(f"{self.name}: tuning the noise or layer weights needs D_out^train")
        candidates, in_scores, out_scores = [], [], []
        for noise in self.noise_grid:

            def confidences(model: nn.Module, x: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
                return {"c": self.layer_confidences(model, x, noise)}  # noqa: B023 (called at once)

            a, b = _gather(confidences, model, tune_in)["c"], _gather(confidences, model, tune_out)["c"]
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


class GramDetector(Detector):
    """Sastry & Oore (2020), a simple form.

    For each layer ``l`` (``layers``; default every ``nn.Conv2d`` output) with activations
    ``F`` of shape ``(C, HW)`` and each order ``p = 1..powers``, the feature is the row sum of
    the ``p``-th order Gram matrix, ``g_{l,p} = sign(G) |G|^{1/p} 1`` with ``G = F^p (F^p)^T``
    (``F^p`` elementwise): ``C`` values per (layer, order). On the in-distribution training
    images, grouped by the model's *predicted* class ``c``, the elementwise minimum and
    maximum of every ``g_{l,p}`` are recorded. A test image predicted as ``c`` deviates from
    them by ``delta(v) = (min - v) / |min|`` below the minimum, ``(v - max) / |max|`` above the
    maximum, 0 in between (``1e-6`` is added to ``|min|`` and ``|max|``), summed over orders and
    entries into ``delta_l(x)``. The anomaly
    score is ``sum_l delta_l(x) / E[delta_l]``, each layer normalised by its mean deviation
    on the in-distribution validation images. No outliers are used.
    """

    def __init__(self, name: str = "gram", layers: Sequence[str] = ("conv",), powers: int = 10) -> None:
        super().__init__(name)
        self.layers = [str(v) for v in ([layers] if isinstance(layers, str) else layers)]
        if isinstance(powers, bool) or not isinstance(powers, int) or powers < 1:
            raise DetectorError(f"{name}.powers must be an integer >= 1, got {powers!r}")
        self.powers = powers
        self.mins: list[torch.Tensor] = []
        self.maxs: list[torch.Tensor] = []
        self.expected: torch.Tensor | None = None

    def prepare(self, model: nn.Module) -> None:
        self._layers = resolve_layers(model, self.layers)

    def gram_features(self, model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``([(B, powers, C) per layer], predicted classes)``."""
        with torch.no_grad(), capture(self._layers) as store:
            pred = model(x).argmax(1)
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
        return feats, pred

    def deviations(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` per-layer deviations ``delta_l`` from the predicted class's ranges."""
        feats, pred = self.gram_features(model, x)
        columns = []
        for v, mins, maxs in zip(feats, self.mins, self.maxs, strict=True):
            lo, hi = mins[pred], maxs[pred]
            below = F.relu(lo - v) / (lo.abs() + _GRAM_EPS)
            above = F.relu(v - hi) / (hi.abs() + _GRAM_EPS)
            columns.append((below + above).flatten(1).sum(1))
        return torch.stack(columns, 1)

    def fit(self, model: nn.Module, fit: Batches, tune_in: Batches, tune_out: Batches | None) -> dict[str, Any]:
        k_model = int(getattr(model, "num_classes", 0) or 0)

        def ranges(x: torch.Tensor, _y: torch.Tensor, _s: torch.Tensor) -> dict[str, Any]:
            """The batch's predicted classes and, per class (rows in that order), the elementwise
            minimum and maximum of each layer's features."""
            feats, pred = self.gram_features(model, x)
            classes = pred.unique()
            rows = [pred == c for c in classes]
            return {
                "classes": classes,
                "mins": [torch.stack([f[r].amin(0) for r in rows]) for f in feats],
                "maxs": [torch.stack([f[r].amax(0) for r in rows]) for f in feats],
            }

        with attack_context(model, "eval", update_bn=False):
            total: dict[str, Any] | None = None
            for part in per_batch(ranges, fit):  # min and max: the same whatever the batch order
                k = max(k_model, int(part["classes"].max()) + 1, 0 if total is None else len(total["seen"]))
                if total is None:
                    total = {
                        "seen": torch.zeros(k, dtype=torch.bool),
                        "mins": [torch.full((k, *m.shape[1:]), torch.inf, dtype=m.dtype) for m in part["mins"]],
                        "maxs": [torch.full((k, *m.shape[1:]), -torch.inf, dtype=m.dtype) for m in part["maxs"]],
                    }
                total["seen"] = _pad_rows(total["seen"], k, False)
                classes = part["classes"].cpu()
                total["seen"][classes] = True
                for key, pick, fill in (("mins", torch.minimum, torch.inf), ("maxs", torch.maximum, -torch.inf)):
                    for i, (t, q) in enumerate(zip(total[key], part[key], strict=True)):
                        t = total[key][i] = _pad_rows(t, k, fill)
                        t[classes] = pick(t[classes], q.cpu())
            if total is None:
                raise DetectorError(f"{self.name}: no fitting images")
            device = next((p.device for p in model.parameters()), total["seen"].device)
            seen = total["seen"].to(device)
            self.mins = [t.to(device, copy=True) for t in total["mins"]]
            self.maxs = [t.to(device, copy=True) for t in total["maxs"]]
            for mins, maxs in zip(self.mins, self.maxs, strict=True):  # classes never predicted: pooled ranges
                mins[~seen] = mins[seen].amin(0)
                maxs[~seen] = maxs[seen].amax(0)
            deviations = _gather(lambda m, x, _: {"d": self.deviations(m, x)}, model, tune_in)["d"]
        self.expected = deviations.mean(0).clamp_min(1e-12)
        return {"layers": [n for n, _, _ in self._layers], "powers": self.powers}

    def parts(self, model: nn.Module, x: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        with attack_context(model, "eval", update_bn=False):
            deviations = self.deviations(model, x)
        return {"score": (deviations / self.expected.to(deviations)).sum(1).float()}


class SafeSpotScore(Detector):
    """The safe-spot OOD score of paper 000, Section 3.6:

        D(x_o) = mu * max_y C(x_o)_y + (1 - mu) * max_y C(x_a*)_y,

    where ``x_s*`` in ``B_delta(x_o)`` is the safe spot the ``robustifier`` finds for the model's
    own prediction ``c(x_o)`` (Algorithm 1, :class:`~safespot.defenses.SafeSpotSearch`) and
    ``x_a*`` in ``B_eps(x_s*)`` is the ``attack``'s adversarial example of ``x_s*`` (untargeted PGD
    ascending ``CE(c(x), c(x_o))``). Inputs with low ``D`` are flagged, so the anomaly score is
    ``-D(x)``.

    ``mu`` weighs the two maximum softmax probabilities. With ``mu: null`` it is chosen from
    ``mu_grid`` (0, 0.1, ..., 1 by default) on the in-distribution validation images against
    ``D_out^train`` (lowest FPR95, then highest AUROC), the tuning protocol paper 000 applies
    to every detector; ``D_out^test`` is never used. Extra columns: ``msp`` and ``msp_adv``
    (the two terms), ``loss`` = ``CE(x_o, c(x_o))`` and ``loss_adv`` = ``CE(x_a*, c(x_o))``
    (the two quantities of Figure 3) and ``dist`` = ``||x_s* - x_o||_p``.
    """

    def __init__(
        self,
        robustifier: Robustifier,
        attack: Attack,
        name: str = "safe_spot",
        mu: float | None = None,
        mu_grid: Sequence[float] = MU_GRID,
    ) -> None:
        super().__init__(name)
        if robustifier.protect != "prediction":
            raise DetectorError(f"{name}.robustifier.protect must be 'prediction' (outliers have no labels)")
        if attack.targeted:
            raise DetectorError(f"{name}.attack must be untargeted (it attacks the safe spot's protected class)")
        self.mu_grid = [float(m) for m in mu_grid]
        if (mu is not None and not 0 <= mu <= 1) or any(not 0 <= m <= 1 for m in self.mu_grid) or not self.mu_grid:
            raise DetectorError(f"{name}: mu and mu_grid values must lie in [0, 1]")
        self.robustifier, self.attack = robustifier, attack
        self.mu = None if mu is None else float(mu)

    @property
    def requires_tuning(self) -> bool:  # type: ignore[override]
        return self.mu is None

    @staticmethod
    def combine(msp: torch.Tensor, msp_adv: torch.Tensor, mu: float) -> torch.Tensor:
        """The anomaly score ``-(mu * msp + (1 - mu) * msp_adv)``."""
        return -(mu * msp + (1 - mu) * msp_adv)

    def terms(self, model: nn.Module, x: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            logits = model(x)
        result = self.robustifier(model, x, seeds=seeds)
        labels = result.protected
        x_a = self.attack(model, result.x_r, labels, seeds=derive(seeds, "ood_attack"))
        with torch.no_grad():
            logits_a = model(x_a)
        return {
            "msp": F.softmax(logits.float(), 1).amax(1),
            "msp_adv": F.softmax(logits_a.float(), 1).amax(1),
            "loss": F.cross_entropy(logits.float(), labels, reduction="none"),
            "loss_adv": F.cross_entropy(logits_a.float(), labels, reduction="none"),
            "dist": result.distance,
        }

    def fit(self, model: nn.Module, fit: Batches, tune_in: Batches, tune_out: Batches | None) -> dict[str, Any]:
        if self.mu is not None:
            return {"mu": self.mu, "tuned": False}
        if tune_out is None:
            raise DetectorError(f"{self.name}: choosing mu needs D_out^train (or set {self.name}.mu)")
        a, b = _gather(self.terms, model, tune_in), _gather(self.terms, model, tune_out)
        in_scores = [self.combine(a["msp"], a["msp_adv"], m) for m in self.mu_grid]
        out_scores = [self.combine(b["msp"], b["msp_adv"], m) for m in self.mu_grid]
        self.mu, metrics = best_by_fpr95(self.mu_grid, in_scores, out_scores)
        return {"mu": self.mu, "tuned": True, "mu_grid": self.mu_grid, "tune": metrics}

    def parts(self, model: nn.Module, x: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.mu is None:
            raise DetectorError(f"{self.name}: mu is not set; call fit() first")
        terms = self.terms(model, x, seeds)
        return {"score": self.combine(terms["msp"], terms["msp_adv"], self.mu), **terms}


def _gather(
    fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]], model: nn.Module, batches: Batches
) -> dict[str, torch.Tensor]:
    """``fn(model, x, seeds)`` over every batch, each field concatenated on the CPU; for
    :class:`ShardedBatches` only over this process's share, then gathered in set order."""
    if isinstance(batches, ShardedBatches):
        return batches.gather(lambda: _gather(fn, model, batches.local))
    chunks: dict[str, list[torch.Tensor]] = {}
    for x, _, seeds in batches():
        for key, value in fn(model, x, seeds).items():
            chunks.setdefault(key, []).append(value.detach().cpu())
    return {k: torch.cat(v) for k, v in chunks.items()}
