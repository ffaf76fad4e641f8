"""NAttack (Li, Li, Wang, Zhang & Gong, 2019, "NATTACK: Learning the Distributions of Adversarial
Examples for an Improved Black-Box Attack on Deep Neural Networks"): a score-based black-box
attack, the one paper 003 (Section 5) reports besides the transfer attack.

For each image it learns the mean ``mu`` of an isotropic Gaussian ``N(mu, sigma^2 I)`` over a
perturbation in the tanh space of the image, with natural evolution strategies (NES):

1. draw a population ``e_1 .. e_npop ~ N(0, I)``; candidate ``j`` is
   ``x_j = P(0.5 tanh(atanh(2x - 1) + mu + sigma e_j) + 0.5)``, ``P`` the projection onto
   ``B_eps(x) ∩ [0, 1]`` (the reference code clips the distance to ``[-eps, eps]``);
2. each candidate's loss is the margin ``f_j = clip(log p_y(x_j) - max_{k != y} log p_k(x_j), 0, 1000)``
   (the model's softmax probabilities: the scores a black-box attacker sees), reward ``-f_j / 2``;
3. ``mu <- mu + alpha / (npop sigma) sum_j A_j e_j`` with the rewards standardised to ``A``;
4. every ``check_every`` iterations the mean's own candidate ``x(mu)`` is classified; an image
   stops once it is misclassified.

Defaults are the published CIFAR-10 ones of the authors' code (github.com/Cold-Winter/Nattack,
read for the protocol): ``npop = 300``, ``sigma = 0.1``, ``alpha = 0.02``, 500 iterations, the check
every 10 iterations, ``mu`` initialised to ``0.001 N(0, I)``, l_inf ``eps = 0.031``. Differences:
all images of a batch run together (finished images stop changing, and their queries stop being
counted), every draw, including a randomised model's noise (:func:`safespot.smoothing.seeded_noise`),
comes from the image's own seeded stream (results independent of the batch), and the projection is
the threat model's (any norm; the published attack is l_inf).

Queries per image (``last_queries`` after a call; the evaluation records them as
``<name>/queries``): ``npop`` per iteration the image was still running, plus one per check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from safespot.attacks.context import AttackMode, attack_context, check_attack_mode
from safespot.smoothing.soft import seeded_noise
from safespot.threat import LpBall, check_positive_int, parse_budget
from safespot.utils.rng import derive, seeded_normal

_ATANH_LIMIT = 1.0 - 1e-6  # the reference code's arctanh scales its argument by 1 - 1e-6


def margin_loss(log_probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``clip(log p_y - max_{k != y} log p_k, 0, 1000)`` per row: 0 once ``y`` is not the top class."""
    true = log_probs.gather(1, y[:, None])[:, 0]
    others = log_probs.scatter(1, y[:, None], float("-inf")).amax(1)
    return (true - others).clamp(0.0, 1000.0)


@dataclass
class NAttack:
    """NAttack (implements :class:`safespot.attacks.Attack`); see the module docstring.

    Args:
        norm, eps: the threat model (published: l_inf, 0.031).
        iterations: NES iterations (500). npop: population per iteration (300).
        sigma: standard deviation of the search distribution in tanh space (0.1).
        alpha: NES learning rate (0.02). check_every: iterations between success checks (10).
        init_scale: standard deviation of the initial mean (0.001). mode: network mode.
        pop_chunk: population members per forward pass (``pop_chunk * images`` rows; memory only).
    """

    norm: str = "linf"
    eps: float | str = 0.031
    iterations: int = 500
    npop: int = 300
    sigma: float = 0.1
    alpha: float = 0.02
    check_every: int = 10
    init_scale: float = 0.001
    mode: AttackMode = "eval"
    pop_chunk: int = 100
    ball: LpBall = field(init=False, repr=False)
    last_queries: torch.Tensor | None = field(init=False, repr=False, default=None)
    targeted: ClassVar[bool] = False
    requires_smoothing: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.ball = LpBall(self.norm, self.eps)
        self.eps = self.ball.eps
        for name in ("iterations", "npop", "check_every", "pop_chunk"):
            check_positive_int(getattr(self, name), name)
        self.sigma = parse_budget(self.sigma, "sigma")
        self.alpha = parse_budget(self.alpha, "alpha")
        self.init_scale = parse_budget(self.init_scale, "init_scale", allow_zero=True)
        check_attack_mode(self.mode)

    def _scores(self, model: nn.Module, x: torch.Tensor, rows: int) -> torch.Tensor:
        """Log-probabilities of ``x`` (the attacker sees only the model's scores), ``rows`` per
        forward pass: whole population members, so a randomised model's seeded draws (row ``r``
        belongs to image ``r % B``) do not depend on the batch."""
        return torch.cat([F.log_softmax(model(part).float(), dim=1) for part in x.split(rows)])

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        seeds: torch.Tensor | None = None,
        vote_seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x, y = x.detach(), y.to(x.device)
        b, shape = x.shape[0], x.shape[1:]
        d = int(shape.numel())
        if seeds is None:  # no per-image seeds: draw them from the global RNG
            seeds = torch.randint(0, 2**62, (b,), device=x.device)
        seeds = seeds.to(x.device)
        base = torch.atanh((2.0 * x - 1.0) * _ATANH_LIMIT)

        def candidate(offset: torch.Tensor) -> torch.Tensor:  # offset (..., B, *shape) in tanh space
            image = 0.5 * torch.tanh(base + offset) + 0.5
            return self.ball.project(image, x.expand_as(image))

        mu = self.init_scale * seeded_normal(derive(seeds, "nattack", 0), d, 0, x.device).view(b, *shape)
        done = torch.zeros(b, dtype=torch.bool, device=x.device)
        queries = torch.zeros(b, dtype=torch.int64, device=x.device)
        best = x.clone()
        context = seeded_noise(model, derive(seeds, "nattack", self.iterations + 1))  # a randomised model's draws
        with attack_context(model, self.mode, update_bn=False), context, torch.no_grad():
            for t in range(self.iterations):
                if t % self.check_every == 0:
                    point = candidate(mu)
                    fooled = (self._scores(model, point, b).argmax(1) != y) & ~done
                    queries += (~done).long()
                    best = torch.where(fooled.view(-1, *([1] * len(shape))), point, best)
                    done |= fooled
                    if bool(done.all()):  # one host sync per check, not per iteration
                        break
                # population draws: image i's e_{i,1..npop} from its own stream (seed, iteration)
                e = seeded_normal(derive(seeds, "nattack", t + 1), self.npop * d, 0, x.device)
                e = e.view(b, self.npop, *shape).transpose(0, 1)  # (npop, B, *shape)
                candidates = candidate(mu.unsqueeze(0) + self.sigma * e)
                log_probs = self._scores(model, candidates.reshape(-1, *shape), b * self.pop_chunk)
                loss = margin_loss(log_probs, y.repeat(self.npop)).view(self.npop, b)
                reward = -0.5 * loss
                a = (reward - reward.mean(0)) / (reward.std(0, unbiased=False) + 1e-7)
                step = (a.view(self.npop, b, *([1] * len(shape))) * e).sum(0)
                running = (~done).view(-1, *([1] * len(shape)))
                mu = torch.where(running, mu + self.alpha / (self.npop * self.sigma) * step, mu)
                queries += self.npop * (~done).long()
            if not bool(done.all()):  # images still running end at their mean's candidate
                best = torch.where(done.view(-1, *([1] * len(shape))), best, candidate(mu))
        self.last_queries = queries
        return best.detach()
