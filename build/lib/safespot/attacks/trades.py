"""The inner maximisation of TRADES (Zhang et al., 2019, "Theoretically Principled Trade-off
between Robustness and Accuracy", Eq. 5): PGD that *maximises*
``KL(p(x) || p(x'))`` inside ``B_eps(x) ∩ [0, 1]``, where ``p`` is the softmax of the logits,
from a start at ``x + 0.001 * N(0, I)`` (the authors' description). The labels play no part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from safespot.threat import LpBall, check_positive_int, parse_budget
from safespot.utils.rng import derive, seeded_normal


def trades_kl(clean_logits: torch.Tensor, adv_logits: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """``KL(softmax(clean) || softmax(adv))``, averaged over the batch (``batchmean``) or
    summed (``sum``); non-negative and zero when both outputs agree."""
    return F.kl_div(
        F.log_softmax(adv_logits.float(), dim=1),
        F.softmax(clean_logits.float(), dim=1),
        reduction=reduction,
    )


@dataclass
class TradesKL:
    """KL-PGD of TRADES (implements :class:`safespot.attacks.Attack`; ``y`` is ignored).

    Args:
        norm, eps: the threat model (:class:`safespot.threat.LpBall`).
        steps: gradient steps (>= 1); step_size: step length (default ``eps / 4``).
        start_scale: standard deviation of the Gaussian start around ``x`` (0.001).
    The network mode is the caller's (TRADES runs the attack in eval mode,
    :class:`safespot.methods.TradesTraining`).
    """

    norm: str
    eps: float | str
    steps: int = 10
    step_size: float | str | None = None
    start_scale: float = 1e-3
    ball: LpBall = field(init=False, repr=False)
    targeted: ClassVar[bool] = False
    requires_smoothing: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.ball = LpBall(self.norm, self.eps)
        self.eps = self.ball.eps
        check_positive_int(self.steps, "steps")
        self.step_size = self.eps / 4 if self.step_size is None else parse_budget(self.step_size, "step_size")
        if not float(self.start_scale) >= 0:
            raise ValueError(f"start_scale must be >= 0, got {self.start_scale!r}")

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        seeds: torch.Tensor | None = None,
        vote_seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x.detach()
        with torch.no_grad():
            clean_logits = model(x)
        if seeds is None:  # no per-image seeds: the global generator
            start = torch.randn_like(x)
        else:  # image i's start from its own stream: independent of its batch and process
            own = derive(seeds.to(x.device), "trades_start")
            start = seeded_normal(own, x[0].numel(), device=x.device, dtype=x.dtype).view_as(x)
        x_adv = self.ball.project(x + self.start_scale * start, x)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(trades_kl(clean_logits, model(x_adv), "sum"), x_adv)
            x_adv = self.ball.step(x_adv.detach(), grad, self.step_size, x)
        return x_adv.detach()
