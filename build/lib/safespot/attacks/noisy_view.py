"""Attacks on the noisy view of a smoothed classifier.

Paper 003 (Section 4.2, Eqs. 24-25) contrasts two ways of attacking a Gaussian-smoothed
classifier with ``m`` noise draws: the soft smoothed loss of Salman et al. (2019),
``-log mean_m softmax(c(x + xi_m))_y`` (the gradient of the log of a mean; what any attack
computes on :class:`~safespot.smoothing.SmoothedClassifier` itself), and its expectation PGD
(EPGD), which averages the gradients of the per-draw losses,
``mean_m grad_x CE(c(x + xi_m), y)``. EPGD is PGD with ``eot = m`` on
:class:`~safespot.smoothing.NoisyClassifier` (one fresh draw per forward pass);
:class:`NoisyViewAttack` runs any attack on that view. With ``eot = 1`` it is paper 003's own
PGD on the noisy model (Section 4.2: every gradient from one fresh draw, no averaging).

The view keeps the smoothed model's vote (``vote_logits``), so attacks that judge success on
the model they attack (restart selection of :class:`safespot.attacks.PGD`, AutoAttack's checks)
judge it by the vote that scores the final points, not by one noisy forward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from safespot.attacks.base import Attack, check_attack
from safespot.smoothing.soft import NoisyClassifier, SoftSmoothed
from safespot.threat import ThreatConfigError, check_positive_int, parse_budget
from safespot.utils.prediction import VotingClassifier, has_vote


class VotingNoisyView(NoisyClassifier, VotingClassifier):
    """``c(x + xi)`` with one fresh draw per forward pass (:class:`NoisyClassifier`) that
    predicts by the vote of the smoothed classifier it was taken from."""

    def __init__(self, base: nn.Module, sigma: float, smoothed: nn.Module) -> None:
        super().__init__(base, sigma)
        self._smoothed = [smoothed]  # not a registered submodule: the view's modules are those of base

    def vote_logits(self, x: torch.Tensor, seed: Any = None) -> torch.Tensor:
        """The smoothed classifier's vote (see :meth:`safespot.smoothing.SmoothedClassifier.vote_logits`)."""
        return self._smoothed[0].vote_logits(x, seed=seed)


class NoisyViewAttack:
    """Run ``attack`` on ``NoisyClassifier(base, sigma)`` instead of on the model it is given.

    ``base`` and ``sigma`` come from the attacked model when it is a smoothed classifier
    (:class:`~safespot.smoothing.SoftSmoothed`, e.g. :class:`~safespot.smoothing.SmoothedClassifier`,
    or :class:`~safespot.smoothing.NoisyClassifier`); a ``sigma`` given here overrides the
    model's, and for a plain classifier it is required (the model is then the base).
    The adversarial examples are returned as the inner attack returns them; the evaluation
    scores them on the full smoothed model. The view votes as the smoothed model does
    (:class:`VotingNoisyView`) when the model has a vote.

    ``eot`` sets the inner attack's gradient samples (its ``eot`` field): an integer, or
    ``"model"`` for the smoothed model's current draws per forward pass (its ``m``: ``m_attack``
    at rest), which makes EPGD average as many single-draw gradients as the soft smoothed loss
    averages probabilities (paper 003, Eqs. 24-25); ``None`` keeps the inner attack's own value.

    It implements :class:`safespot.attacks.Attack` (``norm``, ``eps`` and ``targeted`` are the
    inner attack's) and declares ``requires_smoothing``: the evaluations that run it need
    ``smoothing.sigma``.
    """

    requires_smoothing: ClassVar[bool] = True

    def __init__(self, attack: Attack, sigma: float | str | None = None, eot: int | str | None = None) -> None:
        self.sigma = None if sigma is None else parse_budget(sigma, "sigma")
        if eot is not None and eot != "model":
            eot = check_positive_int(eot, "eot")
        if eot is not None and not _has_eot_field(attack):
            raise ThreatConfigError(f"eot={eot!r} needs an inner attack with an eot field, got {attack!r}")
        self.attack = check_attack(attack, "NoisyViewAttack.attack")
        self.eot = eot

    @property
    def norm(self) -> str:
        return self.attack.norm

    @property
    def eps(self) -> float:
        return self.attack.eps

    @property
    def targeted(self) -> bool:
        return self.attack.targeted

    def noisy_view(self, model: nn.Module) -> NoisyClassifier:
        smoothed = isinstance(model, (SoftSmoothed, NoisyClassifier))
        sigma = self.sigma if self.sigma is not None else (model.sigma if smoothed else None)
        if sigma is None:
            raise ValueError("NoisyViewAttack needs a smoothed model (with base and sigma) or an explicit sigma")
        base = model.base if smoothed else model
        if has_vote(model):
            return VotingNoisyView(base, sigma, model)
        return NoisyClassifier(base, sigma)

    def inner_attack(self, model: nn.Module) -> Attack:
        """The inner attack with its ``eot`` set as configured (see the class docstring)."""
        if self.eot is None:
            return self.attack
        eot = self.eot
        if eot == "model":
            if not isinstance(model, SoftSmoothed):
                raise ValueError("eot='model' needs a smoothed model with m draws per forward pass")
            eot = model.m
        return self.attack if self.attack.eot == eot else dataclasses.replace(self.attack, eot=eot)

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        seeds: torch.Tensor | None = None,
        vote_seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the inner attack on the noisy view, passing ``seeds`` and ``vote_seeds`` on
        (see :class:`safespot.attacks.Attack`)."""
        return self.inner_attack(model)(self.noisy_view(model), x, y, seeds=seeds, vote_seeds=vote_seeds)

    def __repr__(self) -> str:
        return f"NoisyViewAttack({self.attack!r}, sigma={self.sigma}, eot={self.eot!r})"


def _has_eot_field(attack: object) -> bool:
    """Whether ``attack`` is a dataclass with an ``eot`` field (which ``eot`` replaces)."""
    if not dataclasses.is_dataclass(attack) or isinstance(attack, type):
        return False
    return any(f.name == "eot" for f in dataclasses.fields(attack))
