"""The maximum-softmax-probability detector (Hendrycks & Gimpel, 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from safespot.ood.detectors.base import Detector


class MSP(Detector):
    """``-max_y softmax(c(x))_y`` (Hendrycks & Gimpel, 2017). On a model trained with Outlier
    Exposure it is the "OE" detector of paper 000, Table 4 (Hendrycks et al., 2019)."""

    def __init__(self, name: str = "msp") -> None:
        super().__init__(name)

    @torch.no_grad()
    def parts(self, model: nn.Module, x: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"score": -F.softmax(model(x).float(), dim=1).amax(1)}
