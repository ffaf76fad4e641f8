"""TRADES (Zhang et al., 2019, "Theoretically Principled Trade-off between Robustness and
Accuracy", Eq. 5): minimise

    CE(f(x), y) + beta * KL(p(x) || p(x')),   x' = argmax_{x' in B_eps(x)} KL(p(x) || p(x')),

where ``p`` is the softmax of the logits. The inner maximisation is PGD on the KL divergence
from a start at ``x + 0.001 * N(0, I)``, as in the authors' description; it runs with the
network in eval mode by default (the authors' choice), and both forward passes of the outer
loss then run in train mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from safespot.attacks import attack_context
from safespot.attacks.context import AttackMode
from safespot.methods.adversarial import AdversarialTraining
from safespot.methods.base import cross_entropy
from safespot.threat import LpBall, check_positive_int

_START_SCALE = 1e-3


def trades_kl(clean_logits: torch.Tensor, adv_logits: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """``KL(softmax(clean) || softmax(adv))``, averaged over the batch (``batchmean``) or
    summed (``sum``); non-negative and zero when both outputs agree."""
    return F.kl_div(
        F.log_softmax(adv_logits.float(), dim=1),
        F.softmax(clean_logits.float(), dim=1),
        reduction=reduction,
    )


@dataclass
class TradesAttack:
    """PGD that maximises ``KL(p(x) || p(x'))`` inside ``B_eps(x) ∩ [0, 1]``."""

    ball: LpBall
    steps: int
    step_size: float

    def __post_init__(self) -> None:
        check_positive_int(self.steps, "steps")

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        with torch.no_grad():
            clean_logits = model(x)
        x_adv = self.ball.project(x + _START_SCALE * torch.randn_like(x), x)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(trades_kl(clean_logits, model(x_adv), "sum"), x_adv)
            x_adv = self.ball.step(x_adv.detach(), grad, self.step_size, x)
        return x_adv.detach()


class TradesTraining(AdversarialTraining):
    """TRADES with trade-off ``beta`` (6 by default, Zhang et al.'s CIFAR-10 setting);
    ``threat.steps`` and ``threat.step_size`` set the inner KL-PGD."""

    def __init__(self, *args: Any, beta: float = 6.0, attack_mode: AttackMode = "eval", **kwargs: Any) -> None:
        if not float(beta) >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = float(beta)
        super().__init__(*args, attack_mode=attack_mode, **kwargs)

    def extra_hparams(self) -> dict[str, Any]:
        return {**super().extra_hparams(), "beta": self.beta}

    def build_train_attack(self) -> TradesAttack:  # type: ignore[override]
        return TradesAttack(self.ball, int(self.threat["steps"]), self.threat["step_size"])

    def adversarial_examples(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with attack_context(self.net, mode=self.attack_mode, update_bn=self.attack_updates_bn):
            return self.train_attack(self.net, x)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = self.adversarial_examples(x, y)
        clean_logits = self.net(x)
        adv_logits = self.net(x_adv)
        loss = cross_entropy(clean_logits, y) + self.beta * trades_kl(clean_logits, adv_logits)
        return loss, clean_logits
