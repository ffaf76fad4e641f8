"""Smoothed inference versus the number of samples and the vote rule (paper 003, Section 5 and its
figures): one evaluation scores the same points, clean or attacked once, by the smoothed
classifier's vote with every ``n`` of a sweep and every rule (prediction / majority, soft,
weighted), from one run of ``max(n)`` draws per image (:meth:`SmoothedClassifier.vote_sweep`).

Fields: ``<name>_<vote>_n<n>/{pred,correct,loss,dist}`` per image; ``results.json`` has each one's
accuracy. The vote with the run's ``smoothing.vote`` and ``n = smoothing.n_vote`` equals the other
evaluations' scoring of the same points.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from safespot.attacks.base import Attack, check_attack
from safespot.errors import ConfigError
from safespot.evaluation.evaluations import Evaluation
from safespot.smoothing.smoothed import VOTES, SmoothedClassifier, check_vote
from safespot.threat import LpBall, check_positive_int


class VoteSweep(Evaluation):
    """Args:
    name: the evaluation's name.
    ns: the numbers of draws (paper 003: 1 .. 512).
    votes: the vote rules (``majority``, ``soft``, ``weighted``).
    attack: ``None`` (clean images) or the attack run once on the smoothed classifier (e.g. PGD-20
        on its soft smoothed loss, ``smoothing.m_attack`` draws per pass).
    """

    requires_smoothing = True

    def __init__(
        self,
        name: str,
        ns: Sequence[int] = (1, 4, 8, 16, 32),
        votes: Sequence[str] = VOTES,
        attack: Attack | None = None,
    ) -> None:
        self.attack = None if attack is None else check_attack(attack, f"evaluation {name!r}: attack")
        self.ball = None if self.attack is None else LpBall(self.attack.norm, self.attack.eps)
        super().__init__(name, "linf" if self.ball is None else self.ball.norm)
        if not ns or not votes:
            raise ConfigError(f"evaluation {name!r}: ns and votes must not be empty")
        self.ns = sorted({check_positive_int(n, "ns") for n in ns})
        self.votes = [check_vote(v) for v in votes]

    @property
    def outputs(self) -> list[str]:
        return [f"{self.name}_{vote}_n{n}" for vote in self.votes for n in self.ns]

    def points(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        if self.attack is None:
            return x
        x_adv = self.attack(model, x, y, seeds=seeds)
        if self.ball is not None and not self.ball.contains(x_adv, x, tol=1e-5).all():
            raise RuntimeError(f"evaluation {self.name!r}: the attack left its threat model")
        return x_adv

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if not isinstance(model, SmoothedClassifier):
            raise ConfigError(f"evaluation {self.name!r} needs a smoothed classifier: set smoothing.sigma")
        x_eval = self.points(model, x, y, seeds)
        sweep = model.vote_sweep(x_eval, self.ns, self.votes, seed=seeds)
        fields: dict[str, torch.Tensor] = {}
        for (vote, n), logits in sweep.items():
            fields.update(self.score_logits(logits, x_eval, x, y, f"{self.name}_{vote}_n{n}"))
        return fields, x_eval
