"""The prediction of any classifier object, smoothed or not."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class VotingClassifier(nn.Module):
    """A classifier that predicts by a vote over noise draws rather than by one forward pass
    (:class:`safespot.smoothing.SmoothedClassifier`, the FLSS
    :class:`safespot.models.stochastic.StochasticClassifier`): subclasses declare it by
    inheriting from this class and implement :meth:`vote_logits`."""

    def vote_logits(self, x: torch.Tensor, seed: Any = None) -> torch.Tensor:
        """Scores whose ``argmax`` is the vote's prediction for ``x`` (``seed``: an integer or
        one per image, seeding the vote's draws)."""
        raise NotImplementedError


def has_vote(model: object) -> bool:
    """Whether ``model`` predicts by a vote over noise draws (:class:`VotingClassifier`) rather
    than by one forward pass."""
    return isinstance(model, VotingClassifier)


def predict_logits(model: nn.Module, x: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
    """The scores whose ``argmax`` is the model's prediction, without gradients: ``model(x)``,
    or for a smoothed classifier (see :func:`has_vote`) its vote over many noise draws (Cohen
    et al., 2019; paper 003, Eqs. 8-13), seeded per image by ``seeds`` when given.

    Attacks judge success with this function too (restart selection of
    :class:`safespot.attacks.PGD`, the success checks of :class:`safespot.attacks.AutoAttack`),
    so that a point counts as broken exactly when the evaluation will score it as broken."""
    with torch.no_grad():
        if has_vote(model):
            return model.vote_logits(x, seed=seeds)
        return model(x)
