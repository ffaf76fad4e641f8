"""The prediction of any classifier object, smoothed or not."""

from __future__ import annotations

import torch
from torch import nn


def has_vote(model: object) -> bool:
    """Whether ``model`` predicts by a vote over noise draws (a ``vote_logits`` method, as
    :class:`safespot.smoothing.SmoothedClassifier` and the FLSS stochastic classifier have)
    rather than by one forward pass."""
    return callable(getattr(model, "vote_logits", None))


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
