"""Training with auxiliary outliers: Outlier Exposure and its safe-spot-aware form.

:class:`OutlierExposure` is Hendrycks et al. (2019, "Deep Anomaly Detection with Outlier
Exposure", Section 3 and Appendix (classification)): minimise

    E_{(x, y) ~ D_in} CE(c(x), y) + lambda_OE * E_{x' ~ D_out^train} H(U; C(x')),

where ``H(U; C(x')) = -(1/K) sum_k log C(x')_k`` is the cross-entropy from the softmax
``C(x')`` to the uniform distribution ``U`` over the ``K`` classes (minimal, equal to
``log K``, exactly when ``C(x')`` is uniform); lambda_OE = 0.5.

:class:`SafeSpotOE` is paper 000, Section 3.6, Eq. 4:

    min_theta  E_{(x_o, y_o) ~ D_in} [ CE(x_a*, y_o) ]
             + E_{x_o ~ D_out^train} [ gamma * KL(U || C(x_o)) - lambda * CE(x~_a*, c(x_o)) ]

Our reading of the signs and definitions:

- ``x_a*`` is the in-distribution term of safe-spot-aware training (Section 3.5, with the
  training approximation: ``x_s*`` = the safe-spot step descending ``CE(c(x), y_o)`` inside
  ``B_delta(x_o)``, ``x_a*`` = PGD ascending ``CE(c(x), y_o)`` inside ``B_eps(x_s*)``); it is
  :class:`~safespot.methods.PreemptiveTraining`'s safe-spot step and attack step.
- For an outlier ``x_o`` the label is unknown, so the model's prediction ``c(x_o)`` (argmax,
  no gradient) is protected instead: ``x~_s*`` descends ``CE(c(x), c(x_o))`` in
  ``B_delta(x_o)`` and ``x~_a*`` ascends it in ``B_eps(x~_s*)``, the same two steps.
- ``KL(U || C(x_o)) = sum_k (1/K) log((1/K) / C(x_o)_k) = H(U; C(x_o)) - log K`` >= 0, zero
  exactly at the uniform prediction: the second term lowers the outliers' confidence (it has
  OE's gradient).
- The third term enters with a minus sign: minimising ``-lambda * CE(x~_a*, c(x_o))`` *raises*
  the loss of the outlier's attacked safe-spot candidate, i.e. removes safe spots around
  outliers ("minimize ... the probability of safe spot existence of the outlier samples").
  This term is unbounded below. ``outlier_ce_cap`` caps the cross-entropy, e.g. at ``log K``
  (``"log_k"``), so it stops pushing once the attacked candidate is no more confident in
  ``c(x_o)`` than a uniform prediction. The class default is no cap (the literal Eq. 4); the
  ``safe_spot_oe`` config sets ``log_k``, since uncapped training raised that cross-entropy
  without bound and lost OOD separation in our runs (docs/ood.md).

The three inputs of the parameter update (``x_a*``, ``x_o``, ``x~_a*``) go through the network in
one forward pass, as Hendrycks et al. concatenate in-distribution and outlier batches, so
batch norm normalises them together. The paper's main text gives no values for gamma and
lambda; the defaults (0.5 and 0.5) follow OE's weight.

Both methods declare ``needs_outliers`` and ask :class:`safespot.data.ood.OutlierDataMixin`
datamodules for paired batches ``{"in": (x, y, i), "out": (x_out, -1, i)}`` in ``setup``, keep
the clean (and robust) validation metrics on ``D_in`` and log ``val/auroc``: the AUROC of the
maximum softmax probability separating the held-out training outliers (positives) from the
in-distribution validation images (:mod:`safespot.ood.metrics` convention).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryAUROC

from safespot.attacks import attack_context
from safespot.data.ood import OutlierDataMixin
from safespot.errors import ConfigError
from safespot.methods.base import ClassifierModule, cross_entropy
from safespot.methods.preemptive import PreemptiveTraining

Batch = tuple[torch.Tensor, ...]


def uniform_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``H(U; softmax(logits)) = -(1/K) sum_k log softmax(logits)_k``
    (Hendrycks et al.'s OE loss); ``log K`` for a uniform prediction, larger otherwise."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=1) - logits.mean(dim=1)


def kl_from_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``KL(U || softmax(logits)) = H(U; softmax(logits)) - log K`` (paper 000,
    Eq. 4, second term); >= 0 and 0 exactly for a uniform prediction."""
    return uniform_cross_entropy(logits) - math.log(logits.shape[1])


def msp_anomaly(logits: torch.Tensor) -> torch.Tensor:
    """``1 - MSP``: higher = more anomalous, in [0, 1] (so torchmetrics takes it as a
    probability and applies no sigmoid)."""
    return 1 - F.softmax(logits.float(), dim=1).amax(dim=1)


def _positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def split_batch(batch: Any, method: str) -> tuple[Batch, Batch]:
    """``(in-distribution batch, outlier batch)`` of a paired batch, with a clear error for
    a datamodule without outliers."""
    if isinstance(batch, dict) and batch.get("in") is not None and batch.get("out") is not None:
        return batch["in"], batch["out"]
    raise ConfigError(
        f"{method} trains on outliers: use a datamodule with training outliers (data=cifar10_split_ood, "
        "data=synthetic_ood, data=cifar10_ood with data.train_outliers set)"
    )


class OutlierMixin:
    """Paired training and validation steps shared by the outlier methods (first base)."""

    #: the method, not the data, decides: ``setup`` asks the datamodule for paired batches
    needs_outliers = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.val_auroc = BinaryAUROC()
        self._auroc_seen = [False, False]

    def setup(self, stage: str) -> None:
        """Ask the attached datamodule for batches paired with outliers
        (:meth:`safespot.data.ood.OutlierDataMixin.with_outliers`); a datamodule without that
        switch has no outliers, which :func:`split_batch` reports at the first step."""
        super().setup(stage)
        datamodule = self._datamodule()
        if datamodule is not None:
            datamodule.with_outliers(self.needs_outliers)

    def _datamodule(self) -> OutlierDataMixin | None:
        """The attached datamodule when it has outliers (:class:`OutlierDataMixin`), else ``None``."""
        datamodule = self.trainer.datamodule
        return datamodule if isinstance(datamodule, OutlierDataMixin) else None

    def outlier_training_loss(
        self, x: torch.Tensor, y: torch.Tensor, x_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, in-distribution logits, named loss terms)``."""
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x, y, *_), (x_out, *_) = split_batch(batch, type(self).__name__)
        loss, logits, terms = self.outlier_training_loss(x, y, x_out)
        self.train_acc(logits.detach().argmax(1), y)
        n = len(x)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=n)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        return loss

    def _update_auroc(self, x: torch.Tensor, outlier: bool) -> None:
        with torch.no_grad():
            scores = msp_anomaly(self.net(x))
        self.val_auroc.update(scores, torch.full_like(scores, int(outlier), dtype=torch.long))
        self._auroc_seen[int(outlier)] = True

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inliers, outliers = (batch.get("in"), batch.get("out")) if isinstance(batch, dict) else (batch, None)
        if inliers is not None:
            super().validation_step(inliers, batch_idx)
            self._update_auroc(inliers[0], outlier=False)
        if outliers is not None:
            self._update_auroc(outliers[0], outlier=True)

    def _validates_on_outliers(self) -> bool:
        """Whether the attached datamodule holds out training outliers for validation (the
        same answer on every process, so the AUROC's synchronisation never waits on one)."""
        datamodule = self._datamodule()
        return datamodule is not None and datamodule.outlier_split("val") is not None

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.monitor == "val/auroc" and not self._validates_on_outliers():
            raise ConfigError(
                "method.monitor=val/auroc needs training outliers held out for validation "
                "(data.val_outlier_size > 0 on an outlier datamodule); or set method.monitor=val/acc"
            )

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self._validates_on_outliers() or all(self._auroc_seen):
            self.log("val/auroc", self.val_auroc.compute(), prog_bar=True)
        self.val_auroc.reset()
        self._auroc_seen = [False, False]


class OutlierExposure(OutlierMixin, ClassifierModule):
    """Outlier Exposure (Hendrycks et al., 2019): ``CE(c(x), y) + oe_weight * H(U; C(x_out))``
    on clean images, both batches in one forward pass (see the module docstring).

    Args:
        oe_weight: lambda_OE (0.5, Hendrycks et al.'s vision setting).
        All other arguments as :class:`~safespot.methods.ClassifierModule`.
    """

    def __init__(self, *args: Any, oe_weight: float = 0.5, **kwargs: Any) -> None:
        if oe_weight < 0:
            raise ValueError(f"oe_weight must be >= 0, got {oe_weight}")
        self.oe_weight = float(oe_weight)
        super().__init__(*args, **kwargs)

    def extra_hparams(self) -> dict[str, Any]:
        return {"oe_weight": self.oe_weight}

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The in-distribution term alone (cross-entropy on clean images)."""
        logits = self.net(x)
        return cross_entropy(logits, y), logits

    def outlier_training_loss(
        self, x: torch.Tensor, y: torch.Tensor, x_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.net(torch.cat([x, x_out]))
        logits_in, logits_out = logits[: len(x)], logits[len(x) :]
        ce = cross_entropy(logits_in, y)
        oe = uniform_cross_entropy(logits_out).mean()
        return ce + self.oe_weight * oe, logits_in, {"in_loss": ce, "oe_loss": oe}


class SafeSpotOE(OutlierMixin, PreemptiveTraining):
    """Safe-spot-aware outlier training, paper 000 Eq. 4 (see the module docstring).

    Args:
        gamma: weight of ``KL(U || C(x_o))`` on the outliers.
        lam: lambda, weight of ``-CE(x~_a*, c(x_o))`` on the outliers' attacked safe spots.
        outlier_ce_cap: optional cap on that cross-entropy: a number, ``"log_k"`` (the
            cross-entropy of a uniform prediction over the K classes) or ``None`` (uncapped, as
            Eq. 4).
        safe_spot, threat, attack_mode, ...: as :class:`~safespot.methods.PreemptiveTraining`;
            outliers use the same safe-spot step and attack as in-distribution images.
    """

    def __init__(
        self,
        *args: Any,
        gamma: float = 0.5,
        lam: float = 0.5,
        outlier_ce_cap: float | str | None = None,
        **kwargs: Any,
    ) -> None:
        for name, value in (("gamma", gamma), ("lam", lam)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if outlier_ce_cap is not None and outlier_ce_cap != "log_k" and not _positive_number(outlier_ce_cap):
            raise ValueError(f"outlier_ce_cap must be a number > 0, 'log_k' or null, got {outlier_ce_cap!r}")
        self.gamma, self.lam, self._cap_setting = float(gamma), float(lam), outlier_ce_cap
        super().__init__(*args, **kwargs)
        self.outlier_ce_cap: float | None = (
            None
            if outlier_ce_cap is None
            else math.log(self.num_classes)
            if outlier_ce_cap == "log_k"
            else float(outlier_ce_cap)
        )

    def extra_hparams(self) -> dict[str, Any]:
        return {**super().extra_hparams(), "gamma": self.gamma, "lam": self.lam, "outlier_ce_cap": self._cap_setting}

    def predicted_labels(self, x: torch.Tensor) -> torch.Tensor:
        """``c(x_o)``: the prediction, in the safe-spot step's network mode, no gradient and
        batch-norm statistics untouched."""
        with attack_context(self.net, mode=self.safe_spot["mode"], update_bn=False), torch.no_grad():
            return self.net(x).argmax(1)

    def attacked_safe_spots(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``x_a*``: the safe-spot step towards ``labels`` in ``B_delta(x)``, then the attack
        step in ``B_eps(x_s*)`` (:class:`~safespot.methods.PreemptiveTraining`)."""
        return self.adversarial_examples(self.safe_spots(x, labels), labels)

    def outlier_training_loss(
        self, x: torch.Tensor, y: torch.Tensor, x_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        x_a = self.attacked_safe_spots(x, y)
        c_out = self.predicted_labels(x_out)
        x_a_out = self.attacked_safe_spots(x_out, c_out)
        n, m = len(x), len(x_out)
        logits = self.net(torch.cat([x_a, x_out, x_a_out]))
        logits_in, logits_out, logits_adv_out = logits[:n], logits[n : n + m], logits[n + m :]
        in_loss = cross_entropy(logits_in, y)
        kl = kl_from_uniform(logits_out).mean()
        adv_ce = F.cross_entropy(logits_adv_out.float(), c_out, reduction="none")
        if self.outlier_ce_cap is not None:
            adv_ce = adv_ce.clamp(max=self.outlier_ce_cap)
        adv_ce = adv_ce.mean()
        loss = in_loss + self.gamma * kl - self.lam * adv_ce
        return loss, logits_in, {"in_loss": in_loss, "kl_uniform": kl, "outlier_safe_spot_ce": adv_ce}
