"""Projected gradient descent (Madry et al., 2018) and FGSM on the shared threat model.

PGD maximises a per-sample loss inside ``B_eps(x) ∩ [0, 1]`` with projected steepest-ascent
steps (sign steps for l_inf, normalised gradients for l_2) from a uniform random start;
with several restarts an image counts as broken when any restart breaks it. FGSM
(Goodfellow et al., 2015) is one step of size eps, and FGSM-RS (Wong et al., 2020) one step
of size 1.25 eps from a random start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from safespot.attacks.context import AttackMode, attack_context, check_attack_mode
from safespot.attacks.losses import get_loss
from safespot.threat import LpBall, ThreatConfigError, parse_budget


@dataclass
class PGD:
    """Projected gradient attack.

    Args:
        norm, eps: the threat model (see :class:`safespot.threat.LpBall`).
        steps: number of gradient steps (>= 1).
        step_size: step length; defaults to ``eps / 4`` (the papers' evaluation setting).
        random_start: start uniformly inside the ball instead of at the input.
        restarts: independent runs; per image the first successful one is kept, else the
            one with the highest loss.
        loss: name of a per-sample loss in :mod:`safespot.attacks.losses`.
        targeted: descend the loss towards ``target`` instead of ascending it at ``y``.
        mode: run the model in ``train`` or ``eval`` mode, or ``keep`` its current mode.
    """

    norm: str
    eps: float | str
    steps: int = 10
    step_size: float | str | None = None
    random_start: bool = True
    restarts: int = 1
    loss: str = "ce"
    targeted: bool = False
    mode: AttackMode = "keep"
    ball: LpBall = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.ball = LpBall(self.norm, self.eps)  # validates norm and eps
        self.eps = self.ball.eps
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ThreatConfigError(f"steps must be an integer >= 1, got {self.steps!r}")
        if isinstance(self.restarts, bool) or not isinstance(self.restarts, int) or self.restarts < 1:
            raise ThreatConfigError(f"restarts must be an integer >= 1, got {self.restarts!r}")
        self.step_size = self.eps / 4 if self.step_size is None else parse_budget(self.step_size, "step_size")
        self.loss_fn = get_loss(self.loss)
        check_attack_mode(self.mode)

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Return detached adversarial examples for images ``x`` in [0, 1] with labels ``y``.

        For a targeted attack ``target`` holds the class to move towards (``y`` is then
        only used to judge success of untargeted restarts and may equal ``target``).
        """
        if self.targeted and target is None:
            raise ValueError("a targeted attack needs target labels")
        x = x.detach()
        with attack_context(model, self.mode):
            if self.restarts == 1:
                return self._run(model, x, y, target, generator)
            best = x.clone()
            best_loss = torch.full((x.shape[0],), -torch.inf, device=x.device)
            best_success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            for _ in range(self.restarts):
                x_adv = self._run(model, x, y, target, generator)
                loss, success = self._score(model, x_adv, y, target)
                better = ~best_success & (success | (loss > best_loss))
                best[better] = x_adv[better]
                best_loss = torch.where(better, loss, best_loss)
                best_success |= success
            return best

    def _run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        ball, labels = self.ball, (target if self.targeted else y)
        x_adv = ball.random_init(x, generator) if self.random_start else x.clone()
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            loss = self.loss_fn(model(x_adv), labels).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = ball.step(x_adv.detach(), -grad if self.targeted else grad, self.step_size, x)
        return x_adv.detach()

    @torch.no_grad()
    def _score(
        self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample objective (higher is better for the attacker) and success flag."""
        logits = model(x_adv)
        pred = logits.argmax(1)
        if self.targeted:
            return -self.loss_fn(logits, target), pred == target
        return self.loss_fn(logits, y), pred != y


def fgsm(
    norm: str,
    eps: float | str,
    random_start: bool = False,
    step_size: float | str | None = None,
    mode: AttackMode = "keep",
) -> PGD:
    """FGSM: one steepest step of ``step_size`` (default eps) from the input."""
    eps_value = parse_budget(eps, "eps")
    return PGD(
        norm,
        eps_value,
        steps=1,
        step_size=eps_value if step_size is None else step_size,
        random_start=random_start,
        mode=mode,
    )


def fgsm_rs(norm: str, eps: float | str, step_factor: float = 1.25, mode: AttackMode = "keep") -> PGD:
    """FGSM-RS (Wong et al., 2020, "Fast is better than free"): a uniform random start in
    the ball, then one step of ``step_factor * eps`` projected back into the ball."""
    eps_value = parse_budget(eps, "eps")
    return PGD(norm, eps_value, steps=1, step_size=step_factor * eps_value, random_start=True, mode=mode)
