"""Attacks on the noisy view of a smoothed classifier.

Paper 003 (Section 4.2, Eqs. 24-25) contrasts two ways of attacking a Gaussian-smoothed
classifier with ``m`` noise draws: the soft smoothed loss of Salman et al. (2019),
``-log mean_m softmax(c(x + xi_m))_y`` (the gradient of the log of a mean; what any attack
computes on :class:`~safespot.smoothing.SmoothedClassifier` itself), and its expectation PGD
(EPGD), which averages the gradients of the per-draw losses,
``mean_m grad_x CE(c(x + xi_m), y)``. EPGD is PGD with ``eot = m`` on
:class:`~safespot.smoothing.NoisyClassifier` (one fresh draw per forward pass);
:class:`NoisyViewAttack` runs any attack on that view.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from safespot.smoothing.soft import NoisyClassifier
from safespot.threat import parse_budget


class NoisyViewAttack:
    """Run ``attack`` on ``NoisyClassifier(base, sigma)`` instead of on the model it is given.

    ``base`` and ``sigma`` come from the attacked model when it is a smoothed classifier
    (any module with ``base`` and ``sigma`` attributes, such as
    :class:`~safespot.smoothing.SmoothedClassifier`); a ``sigma`` given here overrides the
    model's, and for a plain classifier it is required (the model is then the base).
    The adversarial examples are returned as the inner attack returns them; the evaluation
    scores them on the full smoothed model.
    """

    requires_smoothing = True

    def __init__(self, attack: Any, sigma: float | str | None = None) -> None:
        self.attack = attack
        self.sigma = None if sigma is None else parse_budget(sigma, "sigma")
        self._takes_seeds = "seeds" in inspect.signature(attack.__call__).parameters

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
        return NoisyClassifier(model.base if smoothed else model, sigma)

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        kwargs = {"seeds": seeds} if self._takes_seeds and seeds is not None else {}
        return self.attack(self.noisy_view(model), x, y, **kwargs)

    def __repr__(self) -> str:
        return f"NoisyViewAttack({self.attack!r}, sigma={self.sigma})"
