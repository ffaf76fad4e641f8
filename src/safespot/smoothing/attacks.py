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
import inspect
from typing import Any

import torch
from torch import nn

from safespot.smoothing.soft import NoisyClassifier
from safespot.threat import ThreatConfigError, check_positive_int, parse_budget


class VotingNoisyView(NoisyClassifier):
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
    (any module with ``base`` and ``sigma`` attributes, such as
    :class:`~safespot.smoothing.SmoothedClassifier`); a ``sigma`` given here overrides the
    model's, and for a plain classifier it is required (the model is then the base).
    The adversarial examples are returned as the inner attack returns them; the evaluation
    scores them on the full smoothed model. The view votes as the smoothed model does
    (:class:`VotingNoisyView`) when the model has a vote.

    ``eot`` sets the inner attack's gradient samples (its ``eot`` field): an integer, or
    ``"model"`` for the smoothed model's current draws per forward pass (its ``m``: ``m_attack``
    at rest), which makes EPGD average as many single-draw gradients as the soft smoothed loss
    averages probabilities (paper 003, Eqs. 24-25); ``None`` keeps the inner attack's own value.
    """

    requires_smoothing = True

    def __init__(self, attack: Any, sigma: float | str | None = None, eot: int | str | None = None) -> None:
        self.attack = attack
        self.sigma = None if sigma is None else parse_budget(sigma, "sigma")
        if eot is not None and eot != "model":
            eot = check_positive_int(eot, "eot")
        if eot is not None and not (dataclasses.is_dataclass(attack) and hasattr(attack, "eot")):
            raise ThreatConfigError(f"eot={eot!r} needs an inner attack with an eot field, got {attack!r}")
        self.eot = eot
        parameters = inspect.signature(attack.__call__).parameters
        self._takes_seeds, self._takes_vote_seeds = "seeds" in parameters, "vote_seeds" in parameters

    @property
    def norm(self) -> str:
        return self.attack.norm

    @property
    def eps(self) -> float:
        return self.attack.eps

    def noisy_view(self, model: nn.Module) -> NoisyClassifier:
        smoothed = hasattr(model, "base") and hasattr(model, "sigma")
        sigma = self.sigma if self.sigma is not None else (model.sigma if smoothed else None)
        if sigma is None:
            raise ValueError("NoisyViewAttack needs a smoothed model (with base and sigma) or an explicit sigma")
        base = model.base if smoothed else model
        if callable(getattr(model, "vote_logits", None)):
            return VotingNoisyView(base, sigma, model)
        return NoisyClassifier(base, sigma)

    def inner_attack(self, model: nn.Module) -> Any:
        """The inner attack with its ``eot`` set as configured (see the class docstring)."""
        if self.eot is None:
            return self.attack
        eot = self.eot
        if eot == "model":
            draws = getattr(model, "m", None)
            if draws is None:
                raise ValueError("eot='model' needs a smoothed model with m draws per forward pass")
            eot = int(draws)
        return self.attack if self.attack.eot == eot else dataclasses.replace(self.attack, eot=eot)

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        seeds: torch.Tensor | None = None,
        vote_seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the inner attack on the noisy view; ``seeds`` and ``vote_seeds`` are passed on
        when the inner attack takes them (see :class:`safespot.attacks.PGD`)."""
        kwargs = {"seeds": seeds} if self._takes_seeds and seeds is not None else {}
        if vote_seeds is not None and self._takes_vote_seeds:
            kwargs["vote_seeds"] = vote_seeds
        return self.inner_attack(model)(self.noisy_view(model), x, y, **kwargs)

    def __repr__(self) -> str:
        return f"NoisyViewAttack({self.attack!r}, sigma={self.sigma}, eot={self.eot!r})"
