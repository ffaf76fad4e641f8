"""PGD adversarial training (Madry et al., 2018, Eq. 2.1: min_theta E max_{x' in B_eps(x)}
CE(c(x'), y)) and fast FGSM-RS adversarial training (Wong et al., 2020).

Whether the inner attack sees the network in train or eval mode (``attack_mode``) and
whether its forward passes may update batch-norm statistics (``attack_updates_bn``) are
explicit options. The defaults follow Rice et al. (2020), whose attack runs in train mode
with running statistics updated.
"""

from __future__ import annotations

from typing import Any

import torch

from safespot.attacks import PGD, attack_context, fgsm_rs
from safespot.attacks.context import AttackMode, check_attack_mode
from safespot.methods.base import ClassifierModule, cross_entropy


class AdversarialTraining(ClassifierModule):
    """K-step PGD (``threat.steps``, step ``threat.step_size``, random start) on the
    training batch, then cross-entropy on the adversarial batch."""

    def __init__(
        self, *args: Any, attack_mode: AttackMode = "train", attack_updates_bn: bool = True, **kwargs: Any
    ) -> None:
        self.attack_mode = check_attack_mode(attack_mode)
        self.attack_updates_bn = bool(attack_updates_bn)
        super().__init__(*args, **kwargs)
        self.train_attack = self.build_train_attack()

    def extra_hparams(self) -> dict[str, Any]:
        return {"attack_mode": self.attack_mode, "attack_updates_bn": self.attack_updates_bn}

    def build_train_attack(self) -> PGD:
        t = self.threat
        return PGD(
            t["norm"],
            t["eps"],
            steps=int(t["steps"]),
            step_size=t["step_size"],
            random_start=True,
            mode=self.attack_mode,
        )

    def adversarial_examples(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with attack_context(self.net, update_bn=self.attack_updates_bn):
            return self.train_attack(self.net, x, y)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(self.adversarial_examples(x, y))
        return cross_entropy(logits, y), logits


class FastAdversarialTraining(AdversarialTraining):
    """FGSM-RS: a uniform random start in the ball, one signed step of ``step_factor * eps``
    (1.25 eps by default), projected back (Wong et al., 2020, Algorithm 3)."""

    def __init__(self, *args: Any, step_factor: float = 1.25, **kwargs: Any) -> None:
        self.step_factor = float(step_factor)
        super().__init__(*args, **kwargs)

    def extra_hparams(self) -> dict[str, Any]:
        return {**super().extra_hparams(), "step_factor": self.step_factor}

    def build_train_attack(self) -> PGD:
        return fgsm_rs(self.threat["norm"], self.threat["eps"], self.step_factor, mode=self.attack_mode)
