"""Multi-targeted attacks: one run towards each of the ``k`` classes the clean image ranks highest
after its own, the best run kept per image.

Gowal et al. (2019, "An Alternative Surrogate Loss for PGD-based Adversarial Testing") replace the
untargeted loss by the *targeted* logit margin ``z_t(x') - z_y(x')``, ascended once towards every
target class ``t != y``: each run explores the decision boundary with one class only, and an image
counts as broken when any run breaks it. :class:`MultiTargetedPGD` is that attack with the PGD of
this framework (steepest steps of the threat ball, a random start); GAMA-MT
(:class:`safespot.attacks.gama.GAMA` with ``n_targets``) runs GAMA the same way.

The targets of an image are the ``k`` classes other than ``y`` with the highest scores on the
clean image (its logits, or the vote of a model that predicts by a vote; ties go to the lower
class index), the highest first (:func:`target_classes`). Per image the first run whose point is
misclassified is kept, else the run whose point has the highest margin ``max_{j != y} s_j - s_y``
(:func:`judge`, on the logits or, for a voting model, on the vote seeded by ``vote_seeds``: success
is judged as the evaluation scores the points).

Seeds: with per-image ``seeds`` the run of rank ``j`` draws its start and the model's noise (the
latent draws of an FLSS model, smoothing noise) from ``derive(seeds, "attack_target", j)``
(:mod:`safespot.utils.rng`), the ranking pass from ``seeds``: an image's result depends on its own
seed only, whatever its batch or process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from safespot.attacks.context import AttackMode, attack_context, check_attack_mode
from safespot.attacks.losses import cw_margin
from safespot.smoothing.soft import seeded_noise
from safespot.threat import LpBall, check_positive_int, parse_budget
from safespot.utils.prediction import has_vote, predict_logits
from safespot.utils.rng import derive

#: ``run(x, y, target, seeds) -> points``: one targeted run (``target``: one class per image)
TargetRun = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def target_classes(scores: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, min(k, C - 1))``: per image the classes other than ``y[i]`` in decreasing order of
    ``scores`` (``(B, C)``), ties broken towards the lower class index."""
    masked = scores.detach().float().scatter(1, y[:, None], float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    return order[:, : min(int(k), scores.shape[1] - 1)]


def targeted_margin(scores: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``s_t - s_y`` per image (Gowal et al., 2019): positive once ``t`` outscores the label."""
    scores = scores.float()
    return scores.gather(1, target[:, None]).squeeze(1) - scores.gather(1, y[:, None]).squeeze(1)


@torch.no_grad()
def judge(
    model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, vote_seeds: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(margin, success)`` of points: the margin ``max_{j != y} s_j - s_y`` (higher is better for
    the attacker) and misclassification, on the logits or, for a model that predicts by a vote, on
    the vote seeded by ``vote_seeds`` (:func:`safespot.utils.prediction.predict_logits`)."""
    scores = predict_logits(model, x_adv, vote_seeds) if has_vote(model) else model(x_adv)
    return cw_margin(scores, y), scores.argmax(1) != y


def multi_targeted(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    n_targets: int,
    run: TargetRun,
    seeds: torch.Tensor | None,
    vote_seeds: torch.Tensor | None,
) -> torch.Tensor:
    """``run`` towards each of the ``n_targets`` top classes of every image (see the module
    docstring); per image the first successful run's points, else those of highest margin."""
    with torch.no_grad(), seeded_noise(model, seeds):
        ranking = predict_logits(model, x, vote_seeds) if has_vote(model) else model(x)
    targets = target_classes(ranking, y, n_targets)
    best = x.clone()
    best_margin = torch.full((len(x),), -torch.inf, device=x.device)
    done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for j in range(targets.shape[1]):
        run_seeds = None if seeds is None else derive(seeds, "attack_target", j)
        with seeded_noise(model, run_seeds):
            x_adv = run(x, y, targets[:, j], run_seeds)
            margin, success = judge(model, x_adv, y, vote_seeds)
        better = ~done & (success | (margin > best_margin))
        best = torch.where(better.view(-1, *[1] * (x.dim() - 1)), x_adv, best)
        best_margin = torch.where(better, margin, best_margin)
        done |= success
    return best


def prepare(x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor | None, vote_seeds: torch.Tensor | None) -> tuple:
    """``(x, y, seeds, vote_seeds)`` detached and on the images' device; ``vote_seeds`` default
    to ``seeds``."""
    x = x.detach()
    y = y.detach().to(device=x.device, dtype=torch.long)
    if seeds is not None:
        seeds = torch.as_tensor(seeds).to(device=x.device, dtype=torch.int64).reshape(-1)
    vote_seeds = seeds if vote_seeds is None else torch.as_tensor(vote_seeds).to(device=x.device).reshape(-1)
    return x, y, seeds, vote_seeds


@dataclass
class MultiTargetedPGD:
    """MultiTargeted PGD (Gowal et al., 2019; implements :class:`safespot.attacks.Attack`).

    Args:
        norm, eps: the threat model (:class:`safespot.threat.LpBall`).
        steps: steps of each target's run (>= 1).
        step_size: step length (default ``eps / 4``, as the framework's PGD).
        n_targets: target classes per image (the top ones after the label; at most ``C - 1``).
        random_start: start each run uniformly inside the ball instead of at the input.
        mode: run the model in ``train`` or ``eval`` mode, or ``keep`` its current mode.

    Each run ascends ``z_t(x') - z_y(x')`` with projected steepest steps; see the module docstring
    for the targets, the kept run and the seeds.
    """

    norm: str
    eps: float | str
    steps: int = 100
    step_size: float | str | None = None
    n_targets: int = 9
    random_start: bool = True
    mode: AttackMode = "keep"
    ball: LpBall = field(init=False, repr=False)
    targeted: ClassVar[bool] = False  # the targets are its own
    requires_smoothing: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.ball = LpBall(self.norm, self.eps)
        self.eps = self.ball.eps
        check_positive_int(self.steps, "steps")
        check_positive_int(self.n_targets, "n_targets")
        self.step_size = self.eps / 4 if self.step_size is None else parse_budget(self.step_size, "step_size")
        check_attack_mode(self.mode)

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
            run = lambda x_, y_, t, s: self.run(model, x_, y_, t, s)  # noqa: E731
            return multi_targeted(model, x, y, self.n_targets, run, seeds, vote_seeds)

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, seeds: torch.Tensor | None
    ) -> torch.Tensor:
        """One run towards ``target`` (one class per image): ``steps`` projected steps ascending
        the targeted margin, from a random start drawn with ``seeds`` (the global RNG without)."""
        x_adv = self.ball.random_init(x, seeds=seeds) if self.random_start else x.clone()
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(targeted_margin(model(x_adv), y, target).sum(), x_adv)
            x_adv = self.ball.step(x_adv.detach(), grad, self.step_size, x)
        return x_adv.detach()
