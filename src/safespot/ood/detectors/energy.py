"""The free-energy detector (Liu et al., 2020, "Energy-based Out-of-distribution Detection")."""

from __future__ import annotations

import torch
from torch import nn

from safespot.ood.detectors.base import Detector, DetectorError


class Energy(Detector):
    """Free energy ``E(x) = -T logsumexp(logits / T)`` (Liu et al., 2020, Eq. 7); higher
    energy = more anomalous."""

    def __init__(self, name: str = "energy", temperature: float = 1.0) -> None:
        super().__init__(name)
        if temperature <= 0:
            raise DetectorError(f"{name}.temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    @torch.no_grad()
    def parts(self, model: nn.Module, x: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.temperature
        return {"score": -t * torch.logsumexp(model(x).float() / t, dim=1)}
