"""Natural (standard) training: cross-entropy on clean images."""

from __future__ import annotations

import torch

from safespot.methods.base import ClassifierModule, cross_entropy


class NaturalTraining(ClassifierModule):
    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x)
        return cross_entropy(logits, y), logits
