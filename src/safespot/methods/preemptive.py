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

The safe-spot step runs on clean images. By default it runs in train mode (like the attack,
Rice et al.) but leaves batch-norm running statistics untouched (``safe_spot.updates_bn``),
so clean batches never silently move the statistics; only the batch the network is trained
on (``x_a``) does, as in adversarial training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from safespot.attacks import PGD, attack_context
from safespot.attacks.context import check_attack_mode
from safespot.methods.adversarial import AdversarialTraining, FastAdversarialTraining
from safespot.methods.base import accuracy_metric
from safespot.threat import parse_budget

SAFE_SPOT_KEYS = ("delta", "steps", "step_size", "step_fraction", "random_start", "mode", "updates_bn")


def safe_spot_settings(settings: Mapping[str, Any] | None, eps: float) -> dict[str, Any]:
    """Validated safe-spot step settings with defaults: ``delta = eps``, ``L = 1``,
    ``beta = step_fraction * delta`` (``step_fraction`` 1) unless ``step_size`` is given,
    random start, train mode, batch-norm statistics untouched."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(SAFE_SPOT_KEYS))
    if unknown:
        raise ValueError(f"unknown safe_spot settings {unknown}; expected some of {list(SAFE_SPOT_KEYS)}")
    delta = parse_budget(settings.get("delta") if settings.get("delta") is not None else eps, "safe_spot.delta")
    step = settings.get("step_size")
    return {
        "delta": delta,
        "steps": int(settings.get("steps", 1)),
        "step_size": (
            parse_budget(settings.get("step_fraction", 1.0), "safe_spot.step_fraction") * delta
            if step is None
            else parse_budget(step, "safe_spot.step_size")
        ),
        "random_start": bool(settings.get("random_start", True)),
        "mode": check_attack_mode(settings.get("mode", "train")),
        "updates_bn": bool(settings.get("updates_bn", False)),
    }


class PreemptiveTraining(AdversarialTraining):
    """Safe-spot-aware adversarial training (paper 002, Algorithm 2).

    Args:
        safe_spot: ``{delta, steps (L), step_size (beta) or step_fraction (beta / delta),
            random_start, mode, updates_bn}``;
            see :func:`safe_spot_settings` for the defaults.
        All other arguments as :class:`AdversarialTraining`; ``threat.steps`` and
        ``threat.step_size`` set the K-step attack.

    Besides the base metrics, validation and test log ``{stage}/safe_robust_acc``: PGD
    accuracy on images first moved by the same safe-spot step towards the model's own
    prediction (labels are unknown when an image is robustified), a cheap proxy for the
    preemptive robustness the method trains for.
    """

    def __init__(self, *args: Any, safe_spot: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self._safe_spot_raw = dict(safe_spot or {})
        super().__init__(*args, **kwargs)
        self.val_safe_robust_acc = accuracy_metric(self.num_classes)
        self.test_safe_robust_acc = accuracy_metric(self.num_classes)

    def build_train_attack(self) -> PGD:
        self.safe_spot = safe_spot_settings(self._safe_spot_raw, self.threat["eps"])
        s = self.safe_spot
        self.safe_spot_step = PGD(
            self.threat["norm"],
            s["delta"],
            steps=s["steps"],
            step_size=s["step_size"],
            random_start=s["random_start"],
            targeted=True,
            mode=s["mode"],
        )
        self.eval_safe_spot_step = dataclasses.replace(self.safe_spot_step, mode="eval")
        return super().build_train_attack()

    def extra_hparams(self) -> dict[str, Any]:
        return {**super().extra_hparams(), "safe_spot": safe_spot_settings(self._safe_spot_raw, self.ball.eps)}

    def safe_spots(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``x_r``: ``L`` descent steps on ``CE(c(x_r), labels)`` inside ``B_delta(x)``."""
        with attack_context(self.net, update_bn=self.safe_spot["updates_bn"]):
            return self.safe_spot_step(self.net, x, labels, target=labels)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_r = self.safe_spots(x, y)
        return super().training_loss(x_r, y)  # the K-step attack in B_eps(x_r), then CE

    def _evaluate(self, batch: tuple[torch.Tensor, ...], stage: str, attack: PGD | None) -> None:
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
