"""Preemptively robust (safe-spot-aware) training.

Paper 002, Section 3.5 and Algorithm 2 (paper 000, Section 3.5): per batch,

1. the safe-spot step: ``x_r`` starts uniformly in ``B_delta(x_o)`` and takes ``L`` projected
   steps of size ``beta`` that *descend* ``CE(c(x_r), y)`` inside ``B_delta(x_o) ∩ [0, 1]``
   (the first-order approximation of the outer minimisation of Eq. 2);
2. the attack step: ``x_a`` starts uniformly in ``B_eps(x_r)`` and takes ``K`` projected steps
   that *ascend* ``CE(c(x_a), y)`` inside ``B_eps(x_r) ∩ [0, 1]``;
3. the network minimises ``CE(c(x_a), y)``.

Standard adversarial training is the case ``delta = 0``. Paper 000's variants are settings
of the safe-spot step: S-FGSM+ADV (``L = 1``, targeted FGSM of size ``delta`` from ``x_o``)
and S-PGD+ADV (``L = 10``, step ``delta / 4``); S-FGSM+Fast replaces the K-step attack by
FGSM-RS (:class:`PreemptiveFastTraining`).

The safe-spot step (:class:`safespot.attacks.SafeSpotStep`) runs on clean images. By default
it runs in train mode (like the attack, Rice et al.) but leaves batch-norm running statistics
untouched (``safe_spot.updates_bn``), so clean batches never silently move the statistics; only
the batch the network is trained on (``x_a``) does, as in adversarial training.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from safespot.attacks import PGD, SafeSpotStep, attack_context
from safespot.attacks.base import Attack
from safespot.attacks.safe_spot import SAFE_SPOT_KEYS
from safespot.methods.adversarial import AdversarialTraining, FastAdversarialTraining
from safespot.methods.base import accuracy_metric
from safespot.threat import LpBall, ThreatConfigError

#: What ``safe_spot`` accepts: a factory (the ``_partial_: true`` config of
#: ``conf/method/preemptive.yaml``), a step, a mapping of its settings, or ``None`` (defaults).
SafeSpotSpec = SafeSpotStep | Callable[..., SafeSpotStep] | Mapping[str, Any] | None

__all__ = [
    "SAFE_SPOT_KEYS",
    "PreemptiveFastTraining",
    "PreemptiveTraining",
    "SafeSpotSpec",
    "build_safe_spot_step",
    "safe_spot_settings",
]


def build_safe_spot_step(spec: SafeSpotSpec, norm: str, eps: float | str) -> SafeSpotStep:
    """The safe-spot step of a method with threat model ``(norm, eps)``: a factory is called
    (its config names the threat model, ``${threat.norm}`` and ``${threat.eps}``), a step used
    as it is, a mapping of settings (or ``None``) completed with ``norm`` and ``eps``
    (:meth:`SafeSpotStep.from_settings`). The step must use the threat model's norm."""
    if spec is None or isinstance(spec, Mapping):
        return SafeSpotStep.from_settings(norm, eps, dict(spec or {}))
    step = spec() if isinstance(spec, functools.partial) else spec
    if not isinstance(step, SafeSpotStep):
        raise ThreatConfigError(f"safe_spot must configure a safespot.attacks.SafeSpotStep, got {step!r}")
    if step.norm != LpBall(norm, eps).norm:
        raise ThreatConfigError(f"safe_spot.norm={step.norm!r} differs from the threat model's norm {norm!r}")
    return step


def safe_spot_settings(settings: Mapping[str, Any] | None, eps: float) -> dict[str, Any]:
    """Validated safe-spot step settings with defaults (:class:`SafeSpotStep`, whose settings
    do not depend on the norm): ``delta = eps``, ``L = 1``, ``beta = step_fraction * delta``
    (``step_fraction`` 1) unless ``step_size`` is given, random start, train mode, batch-norm
    statistics untouched."""
    return SafeSpotStep.from_settings("linf", eps, dict(settings or {})).settings()


class PreemptiveTraining(AdversarialTraining):
    """Safe-spot-aware adversarial training (paper 002, Algorithm 2).

    Args:
        safe_spot: the safe-spot step: a :class:`~safespot.attacks.SafeSpotStep` factory (the
            ``_partial_: true`` config ``method.safe_spot``: ``{delta, steps (L), step_size
            (beta) or step_fraction (beta / delta), random_start, mode, updates_bn}``), a step,
            or a mapping of those settings; see :class:`~safespot.attacks.SafeSpotStep` for the
            defaults. Its resolved settings are recorded with the hyperparameters.
        All other arguments as :class:`AdversarialTraining`; ``threat.steps`` and
        ``threat.step_size`` set the K-step attack.

    Besides the base metrics, validation and test log ``{stage}/safe_robust_acc``: PGD
    accuracy on images first moved by the same safe-spot step towards the model's own
    prediction (labels are unknown when an image is robustified), a cheap proxy for the
    preemptive robustness the method trains for.
    """

    def __init__(self, *args: Any, safe_spot: SafeSpotSpec = None, **kwargs: Any) -> None:
        self._safe_spot_spec = safe_spot
        self._safe_spot_step: SafeSpotStep | None = None
        super().__init__(*args, **kwargs)
        self.val_safe_robust_acc = accuracy_metric(self.num_classes)
        self.test_safe_robust_acc = accuracy_metric(self.num_classes)

    def _build_safe_spot_step(self) -> SafeSpotStep:
        """The training step, built once (the hyperparameters record its settings before the
        attacks are built)."""
        if self._safe_spot_step is None:
            self._safe_spot_step = build_safe_spot_step(self._safe_spot_spec, self.threat["norm"], self.threat["eps"])
        return self._safe_spot_step

    def build_train_attack(self) -> PGD:
        step = self.safe_spot_step = self._build_safe_spot_step()
        self.safe_spot = step.settings()
        # validation and test run the step in eval mode (see _evaluate)
        self.eval_safe_spot_step = step.evaluation_step()
        return super().build_train_attack()

    def extra_hparams(self) -> dict[str, Any]:
        return {**super().extra_hparams(), "safe_spot": self._build_safe_spot_step().settings()}

    def safe_spots(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``x_r``: ``L`` descent steps on ``CE(c(x_r), labels)`` inside ``B_delta(x)``
        (batch-norm statistics updated only with ``safe_spot.updates_bn``)."""
        return self.safe_spot_step(self.net, x, labels)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_r = self.safe_spots(x, y)
        return super().training_loss(x_r, y)  # the K-step attack in B_eps(x_r), then CE

    def _evaluate(self, batch: tuple[torch.Tensor, ...], stage: str, attack: Attack | None) -> None:
        super()._evaluate(batch, stage, attack)
        if attack is None:
            return
        x, y = batch[0], batch[1]
        with torch.no_grad():
            predicted = self.net(x).argmax(1)
        # the safe-spot step of validation and test runs in eval mode (its training mode would
        # make x_r, and the checkpoint monitor val/safe_robust_acc, depend on the batch)
        with attack_context(self.net, mode="eval", update_bn=False):
            x_r = self.eval_safe_spot_step(self.net, x, predicted, target=predicted)
        x_adv = attack(self.net, x_r, y)
        metric = getattr(self, f"{stage}_safe_robust_acc")
        with torch.no_grad():
            metric(self.net(x_adv).argmax(1), y)
        self.log(f"{stage}/safe_robust_acc", metric, on_step=False, on_epoch=True, prog_bar=True)


class PreemptiveFastTraining(PreemptiveTraining, FastAdversarialTraining):
    """S-FGSM+Fast (paper 000, Section 4.2): the safe-spot step followed by FGSM-RS (one
    step of ``step_factor * eps`` from a random start in ``B_eps(x_r)``, Wong et al., 2020)
    instead of the K-step attack."""
