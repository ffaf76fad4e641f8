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
from safespot.attacks.base import Attack, AttackSpec
from safespot.attacks.context import AttackMode, check_attack_mode
from safespot.methods.base import ClassifierModule, build_train_attack, cross_entropy


class AdversarialTraining(ClassifierModule):
    """Cross-entropy on the training batch attacked by ``train_attack``.

    Args:
        train_attack: the training attack: a factory (``_partial_: true`` config, by default
            ``conf/attack/pgd_train.yaml``: ``threat.steps`` steps of ``threat.step_size`` from a
            random start), an attack config or an attack; ``None``: that PGD built from
            ``threat``. Its config is recorded with the hyperparameters.
        attack_mode: the network mode while attacking (``train``: Rice et al.; ``eval``;
            ``keep``); the method binds it into the attack as ``mode``.
        attack_updates_bn: whether the attack's forward passes may update batch-norm statistics.
        adv_weight: ``w`` of ``(1 - w) CE(c(x), y) + w CE(c(x_a), y)`` (paper 003, Eq. 23; the
            code accompanying it trains its CNI-W base models with ``w = 0.5``); 1 is Madry et al.
    """

    def __init__(
        self,
        *args: Any,
        train_attack: AttackSpec = None,
        attack_mode: AttackMode = "train",
        attack_updates_bn: bool = True,
        adv_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < float(adv_weight) <= 1.0:
            raise ValueError(f"adv_weight must be in (0, 1], got {adv_weight!r}")
        self.adv_weight = float(adv_weight)
        self.attack_mode = check_attack_mode(attack_mode)
        self.attack_updates_bn = bool(attack_updates_bn)
        self._train_attack_spec = train_attack
        self._train_attack: tuple[Attack, dict[str, Any] | None] | None = None
        super().__init__(*args, **kwargs)
        self.train_attack = self.build_train_attack()

    def extra_hparams(self) -> dict[str, Any]:
        extra = {"adv_weight": self.adv_weight} if self.adv_weight != 1.0 else {}
        return {
            **extra,
            "attack_mode": self.attack_mode,
            "attack_updates_bn": self.attack_updates_bn,
            "train_attack": self._resolved_train_attack()[1],
        }

    def fixed_attack_settings(self) -> dict[str, Any]:
        """The training attack's settings this method owns (bound into its factory)."""
        return {"mode": self.attack_mode}

    def default_train_attack(self) -> Attack:
        """The training attack without a ``train_attack`` setting (methods built in code and
        checkpoints written before ``conf/attack/``)."""
        t = self.threat
        return PGD(
            t["norm"],
            t["eps"],
            steps=int(t["steps"]),
            step_size=t["step_size"],
            random_start=True,
            mode=self.attack_mode,
        )

    def _resolved_train_attack(self) -> tuple[Attack, dict[str, Any] | None]:
        if self._train_attack is None:  # once: the hyperparameters record it before it is used
            self._train_attack = build_train_attack(
                self._train_attack_spec, self.default_train_attack, self.fixed_attack_settings()
            )
        return self._train_attack

    def build_train_attack(self) -> Attack:
        return self._resolved_train_attack()[0]

    def adversarial_examples(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with attack_context(self.net, update_bn=self.attack_updates_bn):
            return self.train_attack(self.net, x, y)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(self.adversarial_examples(x, y))
        loss = cross_entropy(logits, y)
        if self.adv_weight < 1.0:
            loss = (1.0 - self.adv_weight) * cross_entropy(self.net(x), y) + self.adv_weight * loss
        return loss, logits


class FastAdversarialTraining(AdversarialTraining):
    """FGSM-RS: a uniform random start in the ball, one signed step of ``step_factor * eps``
    (1.25 eps by default), projected back (Wong et al., 2020, Algorithm 3)."""

    def __init__(self, *args: Any, step_factor: float = 1.25, **kwargs: Any) -> None:
        self.step_factor = float(step_factor)
        super().__init__(*args, **kwargs)

    def extra_hparams(self) -> dict[str, Any]:
        return {**super().extra_hparams(), "step_factor": self.step_factor}

    def fixed_attack_settings(self) -> dict[str, Any]:
        return {**super().fixed_attack_settings(), "step_factor": self.step_factor}

    def default_train_attack(self) -> PGD:
        return fgsm_rs(self.threat["norm"], self.threat["eps"], self.step_factor, mode=self.attack_mode)
