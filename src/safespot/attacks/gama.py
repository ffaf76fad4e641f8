"""Guided Adversarial Margin Attack (GAMA; Sriramanan, Addepalli, Baburaj & Babu, 2020, "Guided
Adversarial Attack for Evaluating and Enhancing Adversarial Defenses", NeurIPS), optimised by PGD
(GAMA-PGD), and its multi-targeted variant (GAMA-MT).

GAMA ascends the maximum margin of the *softmax* output ``f`` plus a relaxation term that keeps the
perturbed image's output close to the clean image's early on (the paper's guided loss)::

    L_s(x') = max_{j != y} f_j(x') - f_y(x') + lambda_s * ||f(x) - f(x')||_2^2,

with ``lambda_s`` decayed linearly from ``lambda_0`` to 0 over the first ``tau`` steps
(``lambda_s = lambda_0 * max(0, 1 - s / tau)``) and steepest steps of the threat ball whose size
starts at ``step_factor * eps`` and is divided by ``decay`` at given fractions of the run. The
paper's CIFAR-10 setting for GAMA-PGD, the defaults here: 100 steps, ``lambda_0 = 50``, ``tau =
25`` steps, an initial step of ``2 eps`` divided by 10 at steps 60 and 85; the run starts at a
random vertex of the l_inf box (each pixel ``+-eps``; on the l_2 sphere for l_2,
:meth:`safespot.threat.LpBall.boundary_init`) and returns its last iterate. The guide ``f(x)`` is
the softmax of the clean image, as the paper writes it (the authors' evaluation script takes it at
the random start instead), computed once per run.

GAMA-MT (``n_targets``): the margin is replaced by the targeted margin ``f_t(x') - f_y(x')`` and
one GAMA run is made towards each of the ``n_targets`` top classes of the clean image, the best run
kept per image (:func:`safespot.attacks.multitargeted.multi_targeted`, which also describes the
targets, the judging of success and the seeds).

Seeds: with per-image ``seeds`` the start and the model's noise (the latent draws of an FLSS
model, smoothing noise) come from the image's own streams (:func:`safespot.smoothing.seeded_noise`):
results do not depend on the batch or the process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from safespot.attacks.context import AttackMode, attack_context, check_attack_mode
from safespot.attacks.losses import cw_margin
from safespot.attacks.multitargeted import multi_targeted, prepare, targeted_margin
from safespot.smoothing.soft import seeded_noise
from safespot.threat import LpBall, ThreatConfigError, check_positive_int

STARTS: tuple[str, ...] = ("boundary", "uniform")


def reg_weights(steps: int, reg_weight: float, reg_steps: int) -> list[float]:
    """``lambda_s`` for ``s = 0 .. steps - 1``: ``reg_weight * max(0, 1 - s / reg_steps)`` (a linear
    decay to 0 at step ``reg_steps``; none with ``reg_steps = 0``)."""
    if reg_steps <= 0:
        return [0.0] * steps
    return [reg_weight * max(0.0, 1.0 - s / reg_steps) for s in range(steps)]


def step_sizes(steps: int, initial: float, decay_steps: Sequence[int], decay: float) -> list[float]:
    """The step size of each step: ``initial`` divided by ``decay`` once for every step of
    ``decay_steps`` at or before it."""
    return [initial / decay ** sum(1 for m in decay_steps if m <= s) for s in range(steps)]


@dataclass
class GAMA:
    """GAMA-PGD, or GAMA-MT with ``n_targets`` (implements :class:`safespot.attacks.Attack`).

    Args:
        norm, eps: the threat model (:class:`safespot.threat.LpBall`).
        steps: steps of a run (>= 1; 100 in the paper).
        step_factor: the initial step size in units of ``eps`` (2).
        decay_at: fractions of ``steps`` at which the step size is divided by ``decay`` (0.6 and
            0.85: steps 60 and 85 of 100).
        decay: the step-size divisor (10).
        reg_weight: ``lambda_0``, the initial weight of the relaxation term (50).
        reg_fraction: the fraction of ``steps`` over which ``lambda`` decays to 0 (0.25: 25 steps).
        n_targets: ``None`` for GAMA-PGD; ``k`` for GAMA-MT with the top ``k`` classes as targets.
        start: ``boundary`` (a random vertex of the ball, the paper's) or ``uniform`` (inside it).
        mode: run the model in ``train`` or ``eval`` mode, or ``keep`` its current mode.
    """

    norm: str
    eps: float | str
    steps: int = 100
    step_factor: float = 2.0
    decay_at: Sequence[float] = (0.6, 0.85)
    decay: float = 10.0
    reg_weight: float = 50.0
    reg_fraction: float = 0.25
    n_targets: int | None = None
    start: str = "boundary"
    mode: AttackMode = "keep"
    ball: LpBall = field(init=False, repr=False)
    targeted: ClassVar[bool] = False  # GAMA-MT's targets are its own
    requires_smoothing: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.ball = LpBall(self.norm, self.eps)
        self.eps = self.ball.eps
        check_positive_int(self.steps, "steps")
        if self.n_targets is not None:
            check_positive_int(self.n_targets, "n_targets")
        self.decay_at = tuple(float(f) for f in self.decay_at)
        checks = {
            "step_factor": self.step_factor > 0,
            "decay": self.decay >= 1,
            "reg_weight": self.reg_weight >= 0,
            "reg_fraction": 0 <= self.reg_fraction <= 1,
            "decay_at": all(0 <= f <= 1 for f in self.decay_at),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ThreatConfigError(
                f"GAMA: {bad[0]}={getattr(self, bad[0])!r} out of range (step_factor > 0, decay >= 1, "
                "reg_weight >= 0, reg_fraction and decay_at in [0, 1])"
            )
        if self.start not in STARTS:
            raise ThreatConfigError(f"GAMA: start must be one of {list(STARTS)}, got {self.start!r}")
        check_attack_mode(self.mode)

    @property
    def schedule(self) -> tuple[list[float], list[float]]:
        """``(step sizes, lambdas)`` of the ``steps`` steps of a run."""
        decay_steps = [round(f * self.steps) for f in self.decay_at]
        sizes = step_sizes(self.steps, self.step_factor * self.eps, decay_steps, self.decay)
        return sizes, reg_weights(self.steps, self.reg_weight, round(self.reg_fraction * self.steps))

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        seeds: torch.Tensor | None = None,
        vote_seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Detached adversarial examples of ``x`` (see the module docstring for the seeds)."""
        x, y, seeds, vote_seeds = prepare(x, y, seeds, vote_seeds)
        with attack_context(model, self.mode):
            if self.n_targets is None:
                with seeded_noise(model, seeds):
                    return self.run(model, x, y, None, seeds)
            run = lambda x_, y_, t, s: self.run(model, x_, y_, t, s)  # noqa: E731
            return multi_targeted(model, x, y, self.n_targets, run, seeds, vote_seeds)

    def loss(
        self,
        logits: torch.Tensor,
        y: torch.Tensor,
        guide: torch.Tensor,
        weight: float,
        target: torch.Tensor | None,
    ) -> torch.Tensor:
        """Per-image GAMA loss of the perturbed images' ``logits``: the (targeted) margin of the
        softmax plus ``weight`` times the squared l_2 distance to the clean softmax ``guide``."""
        probs = F.softmax(logits.float(), dim=1)
        margin = cw_margin(probs, y) if target is None else targeted_margin(probs, y, target)
        if weight == 0:
            return margin
        return margin + weight * (guide - probs).pow(2).sum(1)

    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        seeds: torch.Tensor | None,
    ) -> torch.Tensor:
        """One GAMA run (towards ``target`` for GAMA-MT), started with ``seeds`` (the global RNG
        without); its last iterate."""
        with torch.no_grad():
            guide = F.softmax(model(x).float(), dim=1)
        start = self.ball.boundary_init if self.start == "boundary" else self.ball.random_init
        x_adv = start(x, seeds=seeds)
        for size, weight in zip(*self.schedule, strict=True):
            x_adv.requires_grad_(True)
            loss = self.loss(model(x_adv), y, guide, weight, target).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = self.ball.step(x_adv.detach(), grad, size, x)
        return x_adv.detach()
