"""The prediction of any classifier object, smoothed or not."""

from __future__ import annotations

import torch
from torch import nn


def predict_logits(model: nn.Module, x: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
    """The scores whose ``argmax`` is the model's prediction, without gradients: ``model(x)``,
    or for a smoothed classifier (a model with ``vote_logits``, such as
    :class:`safespot.smoothing.SmoothedClassifier`) its vote over many noise draws (Cohen et
    al., 2019; paper 003, Eqs. 8-13), seeded per image by ``seeds`` when given."""
    with torch.no_grad():
        vote = getattr(model, "vote_logits", None)
        if callable(vote):
            return vote(x, seed=seeds)
        return model(x)
