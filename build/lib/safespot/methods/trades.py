"""TRADES (Zhang et al., 2019, "Theoretically Principled Trade-off between Robustness and
Accuracy", Eq. 5): minimise

    CE(f(x), y) + beta * KL(p(x) || p(x')),   x' = argmax_{x' in B_eps(x)} KL(p(x) || p(x')),

where ``p`` is the softmax of the logits. The inner maximisation is PGD on the KL divergence
from a start at ``x + 0.001 * N(0, I)``, as in the authors' description; it runs with the
network in eval mode by default (the authors' choice), and both forward passes of the outer
loss then run in train mode.
"""

from __future__ import annotations

from typing import Any

import torch

from safespot.attacks import attack_context
from safespot.attacks.context import AttackMode
from safespot.attacks.trades import TradesKL, trades_kl
from safespot.methods.adversarial import AdversarialTraining
from safespot.methods.base import cross_entropy

__all__ = ["TradesKL", "TradesTraining", "trades_kl"]


class TradesTraining(AdversarialTraining):
    """TRADES with trade-off ``beta`` (6 by default, Zhang et al.'s CIFAR-10 setting). The
    inner KL-PGD is ``train_attack`` (``conf/attack/trades_kl.yaml``:
    :class:`~safespot.attacks.trades.TradesKL` with ``threat.steps`` steps of
    ``threat.step_size``), run with the network in ``attack_mode``."""

    def __init__(self, *args: Any, beta: float = 6.0, attack_mode: AttackMode = "eval", **kwargs: Any) -> None:
        if not float(beta) >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = float(beta)
        super().__init__(*args, attack_mode=attack_mode, **kwargs)
        if self.adv_weight != 1.0:
            raise ValueError("TRADES weighs its terms with beta; adv_weight applies to PGD adversarial training")

    def extra_hparams(self) -> dict[str, Any]:
        return {**super().extra_hparams(), "beta": self.beta}

    def fixed_attack_settings(self) -> dict[str, Any]:
        return {}  # the network mode is set around the attack (adversarial_examples)

    def default_train_attack(self) -> TradesKL:  # type: ignore[override]
        return TradesKL(self.threat["norm"], self.threat["eps"], int(self.threat["steps"]), self.threat["step_size"])

    def adversarial_examples(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with attack_context(self.net, mode=self.attack_mode, update_bn=self.attack_updates_bn):
            return self.train_attack(self.net, x, y)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = self.adversarial_examples(x, y)
        clean_logits = self.net(x)
        adv_logits = self.net(x_adv)
        loss = cross_entropy(clean_logits, y) + self.beta * trades_kl(clean_logits, adv_logits)
        return loss, clean_logits
