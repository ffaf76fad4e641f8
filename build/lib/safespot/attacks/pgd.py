"""Projected gradient descent (Madry et al., 2018) and FGSM on the shared threat model.

PGD maximises a per-sample loss inside ``B_eps(x) ∩ [0, 1]`` with projected steepest-ascent
steps (sign steps for l_inf, normalised gradients for l_2) from a uniform random start;
with several restarts an image counts as broken when any restart breaks it. FGSM
(Goodfellow et al., 2015) is one step of size eps, and FGSM-RS (Wong et al., 2020) one step
of size 1.25 eps from a random start. For randomised models, ``eot`` averages the input
gradient over several forward passes (expectation over transformation, Athalye et al., 2018).

Randomised models. With per-image ``seeds`` the whole run happens inside
:func:`safespot.smoothing.seeded_noise`: the noise of a smoothed or noisy model
(:class:`~safespot.smoothing.SmoothedClassifier`, :class:`~safespot.smoothing.NoisyClassifier`)
at the t-th forward pass is a function of the image's seed and t alone, so an image's
adversarial example does not depend on its batch or the DDP rank, and every step and EOT pass
gets fresh draws. With restarts, a model that predicts by a vote
(:func:`safespot.utils.prediction.has_vote`) has each restart judged by that vote, seeded by
the image seeds, as the evaluation scores the final point (paper 002, Appendix C.2: points are
scored by the 50-draw vote), never by one fresh noisy soft estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from safespot.attacks.context import AttackMode, attack_context, check_attack_mode
from safespot.attacks.losses import get_loss
from safespot.smoothing.soft import seeded_noise
from safespot.threat import LpBall, check_positive_int, parse_budget
from safespot.utils.prediction import has_vote, predict_logits
from safespot.utils.rng import derive


@dataclass
class PGD:
    """Projected gradient attack (implements :class:`safespot.attacks.Attack`).

    Args:
        norm, eps: the threat model (see :class:`safespot.threat.LpBall`).
        steps: number of gradient steps (>= 1).
        step_size: step length; defaults to ``eps / 4`` whatever ``steps`` is (paper 000, Section 4:
            20-step PGD with step eps/4; paper 002, Appendix C: the inner PGD's alpha = eps/4 and
            the 10-step training attack with step eps/4).
        random_start: start uniformly inside the ball instead of at the input.
        restarts: independent runs; per image the first successful one is kept, else the
            one with the highest loss (for a voting model: success and loss of its vote).
        loss: ``ce``, ``cw`` or ``dlr`` (see :mod:`safespot.attacks.losses`).
        targeted: descend the loss at ``target`` instead of ascending it at ``y``.
        early_stop: freeze an image as soon as the attack succeeds on it.
        eot: forward passes averaged per gradient (for randomised models).
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
    early_stop: bool = False
    eot: int = 1
    mode: AttackMode = "keep"
    ball: LpBall = field(init=False, repr=False)
    requires_smoothing: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.ball = LpBall(self.norm, self.eps)  # validates norm and eps
        self.eps = self.ball.eps
        check_positive_int(self.steps, "steps")
        check_positive_int(self.restarts, "restarts")
        check_positive_int(self.eot, "eot")
        self.step_size = self.eps / 4 if self.step_size is None else parse_budget(self.step_size, "step_size")
        self.loss_fn = get_loss(self.loss)
        check_attack_mode(self.mode)

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        seeds: torch.Tensor | None = None,
        vote_seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return detached adversarial examples for images ``x`` in [0, 1] with labels ``y``.

        ``target`` holds the classes a targeted attack moves towards. Random starts come from
        ``generator``, or, with ``seeds`` (one integer per image), from per-image streams, and
        the model's noise too (:func:`safespot.smoothing.seeded_noise`; restart ``r`` uses the
        seeds ``derive(seeds, "restart", r)``, :mod:`safespot.utils.rng`), so that each image's
        result does not depend on the batch it is in. ``vote_seeds`` seed the vote that judges
        restarts on a voting model (default ``seeds``): pass the seeds the caller will score the
        points with when they differ from the attack's.
        """
        if self.targeted and target is None:
            raise ValueError("a targeted attack needs target labels")
        x = x.detach()
        if seeds is not None:
            seeds = torch.as_tensor(seeds).to(device=x.device, dtype=torch.int64)
        vote_seeds = seeds if vote_seeds is None else torch.as_tensor(vote_seeds).to(x.device)
        with attack_context(model, self.mode):
            if self.restarts == 1:
                with seeded_noise(model, seeds):
                    return self._run(model, x, y, target, generator, seeds)
            best = x.clone()
            best_loss = torch.full((x.shape[0],), -torch.inf, device=x.device)
            best_success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            for r in range(self.restarts):
                restart_seeds = None if seeds is None else derive(seeds, "restart", r)
                with seeded_noise(model, restart_seeds):
                    x_adv = self._run(model, x, y, target, generator, restart_seeds)
                    loss, success = self._score(model, x_adv, y, target, vote_seeds)
                better = ~best_success & (success | (loss > best_loss))
                best[better] = x_adv[better]
                best_loss = torch.where(better, loss, best_loss)
                best_success |= success
            return best

    def _gradient(
        self, model: nn.Module, x_adv: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input gradient of the summed loss (averaged over ``eot`` passes) and the logits
        of the last pass."""
        x_adv.requires_grad_(True)
        grad = torch.zeros_like(x_adv)
        for _ in range(self.eot):
            logits = model(x_adv)
            (g,) = torch.autograd.grad(self.loss_fn(logits, labels).sum(), x_adv)
            grad += g
        return grad / self.eot, logits.detach()

    def _run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        generator: torch.Generator | None,
        seeds: torch.Tensor | None,
    ) -> torch.Tensor:
        ball, labels = self.ball, (target if self.targeted else y)
        x_adv = ball.random_init(x, generator, seeds) if self.random_start else x.clone()
        for _ in range(self.steps):
            grad, logits = self._gradient(model, x_adv, labels)
            stepped = ball.step(x_adv.detach(), -grad if self.targeted else grad, self.step_size, x)
            if self.early_stop:
                done = self._succeeded(logits, y, target)
                stepped = torch.where(done.view(-1, *[1] * (x.dim() - 1)), x_adv.detach(), stepped)
            x_adv = stepped
        return x_adv.detach()

    def _succeeded(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        pred = logits.argmax(1)
        return pred == target if self.targeted else pred != y

    @torch.no_grad()
    def _score(
        self,
        model: nn.Module,
        x_adv: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        seeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample objective (higher is better for the attacker) and success flag of one
        restart's points: on the model's vote (seeded by the image ``seeds``, as the evaluation
        scores points) when it predicts by a vote, else on one forward pass."""
        logits = predict_logits(model, x_adv, seeds) if has_vote(model) else model(x_adv)
        if self.targeted:
            return -self.loss_fn(logits, target), self._succeeded(logits, y, target)
        return self.loss_fn(logits, y), self._succeeded(logits, y, target)


def fgsm(
    norm: str,
    eps: float | str,
    random_start: bool = False,
    step_size: float | str | None = None,
    mode: AttackMode = "keep",
    loss: str = "ce",
    targeted: bool = False,
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
        loss=loss,
        targeted=targeted,
    )


def fgsm_rs(norm: str, eps: float | str, step_factor: float = 1.25, mode: AttackMode = "keep") -> PGD:
    """FGSM-RS (Wong et al., 2020, "Fast is better than free"): a uniform random start in
    the ball, then one step of ``step_factor * eps`` projected back into the ball."""
    eps_value = parse_budget(eps, "eps")
    return PGD(norm, eps_value, steps=1, step_size=step_factor * eps_value, random_start=True, mode=mode)
