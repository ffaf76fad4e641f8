"""The safe-spot OOD score of paper 000, Section 3.6."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from safespot.ood.detectors.base import TUNE_IN, TUNE_OUT, Detector, DetectorError, best_by_fpr95
from safespot.utils.rng import derive

if TYPE_CHECKING:
    from safespot.attacks.base import Attack
    from safespot.defenses.robustifier import Robustifier

MU_GRID = tuple(round(0.1 * i, 1) for i in range(11))


class SafeSpotScore(Detector):
    """The safe-spot OOD score of paper 000, Section 3.6:

        D(x_o) = mu * max_y C(x_o)_y + (1 - mu) * max_y C(x_a*)_y,

    where ``x_s*`` in ``B_delta(x_o)`` is the safe spot the ``robustifier`` finds for the model's
    own prediction ``c(x_o)`` (Algorithm 1, :class:`~safespot.defenses.SafeSpotSearch`) and
    ``x_a*`` in ``B_eps(x_s*)`` is the ``attack``'s adversarial example of ``x_s*`` (untargeted PGD
    ascending ``CE(c(x), c(x_o))``). Inputs with low ``D`` are flagged, so the anomaly score is
    ``-D(x)``.

    ``mu`` weighs the two maximum softmax probabilities. With ``mu: null`` it is chosen from
    ``mu_grid`` (0, 0.1, ..., 1 by default) on the in-distribution validation images against
    ``D_out^train`` (lowest FPR95, then highest AUROC), the tuning protocol paper 000 applies
    to every detector; ``D_out^test`` is never used. Extra columns: ``msp`` and ``msp_adv``
    (the two terms), ``loss`` = ``CE(x_o, c(x_o))`` and ``loss_adv`` = ``CE(x_a*, c(x_o))``
    (the two quantities of Figure 3) and ``dist`` = ``||x_s* - x_o||_p``.
    """

    def __init__(
        self,
        robustifier: Robustifier,
        attack: Attack,
        name: str = "safe_spot",
        mu: float | None = None,
        mu_grid: Sequence[float] = MU_GRID,
    ) -> None:
        super().__init__(name)
        if robustifier.protect != "prediction":
            raise DetectorError(f"{name}.robustifier.protect must be 'prediction' (outliers have no labels)")
        if attack.targeted:
            raise DetectorError(f"{name}.attack must be untargeted (it attacks the safe spot's protected class)")
        self.mu_grid = [float(m) for m in mu_grid]
        if (mu is not None and not 0 <= mu <= 1) or any(not 0 <= m <= 1 for m in self.mu_grid) or not self.mu_grid:
            raise DetectorError(f"{name}: mu and mu_grid values must lie in [0, 1]")
        self.robustifier, self.attack = robustifier, attack
        self.mu = None if mu is None else float(mu)

    @property
    def requires_tuning(self) -> bool:  # type: ignore[override]
        return self.mu is None

    @staticmethod
    def combine(msp: torch.Tensor, msp_adv: torch.Tensor, mu: float) -> torch.Tensor:
        """The anomaly score ``-(mu * msp + (1 - mu) * msp_adv)``."""
        return -(mu * msp + (1 - mu) * msp_adv)

    def terms(self, model: nn.Module, x: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            logits = model(x)
        result = self.robustifier(model, x, seeds=seeds)
        labels = result.protected
        x_a = self.attack(model, result.x_r, labels, seeds=derive(seeds, "ood_attack"))
        with torch.no_grad():
            logits_a = model(x_a)
        return {
            "msp": F.softmax(logits.float(), 1).amax(1),
            "msp_adv": F.softmax(logits_a.float(), 1).amax(1),
            "loss": F.cross_entropy(logits.float(), labels, reduction="none"),
            "loss_adv": F.cross_entropy(logits_a.float(), labels, reduction="none"),
            "dist": result.distance,
        }

    def tune_values(self, model: nn.Module, x: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """The two terms of the score, to choose mu from."""
        terms = self.terms(model, x, seeds)
        return {"msp": terms["msp"], "msp_adv": terms["msp_adv"]}

    def tune(self, values: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        """mu from ``mu_grid`` with the lowest FPR95 of ``D_out^train`` against the in-distribution
        validation images (unless ``mu`` is set)."""
        if not self.requires_tuning:
            return {"mu": self.mu, "tuned": False}
        a, b = values[TUNE_IN], values[TUNE_OUT]
        in_scores = [self.combine(a["msp"], a["msp_adv"], m) for m in self.mu_grid]
        out_scores = [self.combine(b["msp"], b["msp_adv"], m) for m in self.mu_grid]
        self.mu, metrics = best_by_fpr95(self.mu_grid, in_scores, out_scores)
        return {"mu": self.mu, "tuned": True, "mu_grid": self.mu_grid, "tune": metrics}

    def parts(self, model: nn.Module, x: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.mu is None:
            raise DetectorError(f"{self.name}: mu is not set; call fit() first")
        terms = self.terms(model, x, seeds)
        return {"score": self.combine(terms["msp"], terms["msp_adv"], self.mu), **terms}
