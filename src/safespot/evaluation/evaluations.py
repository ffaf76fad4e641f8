"""Evaluations: small objects that take a batch (images, labels, dataset indices) and return
per-image fields for the records table.

Each evaluation produces the points it evaluates (the clean images, or adversarial examples),
and :meth:`Evaluation.__call__` scores them the same way for all: prediction, correctness,
cross-entropy and l_p distance to the original image, under keys ``<name>/<field>``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from safespot.threat import LpBall

_INDEX_STRIDE = 7919
_SEED_STRIDE = 1_000_003


def image_seeds(seed: int, index: torch.Tensor, salt: int) -> torch.Tensor:
    """Per-image integer seeds from the run seed, the dataset index and an evaluation salt,
    so random starts do not depend on batch composition or on the number of processes."""
    return (seed * _SEED_STRIDE + index.long().cpu() * _INDEX_STRIDE + salt) % (2**62)


class Evaluation:
    """Base class. Subclasses implement :meth:`points`."""

    def __init__(self, name: str, norm: str = "linf") -> None:
        if not name or "/" in name:
            raise ValueError(f"evaluation name must be a non-empty string without '/', got {name!r}")
        self.name = name
        self.norm = norm

    def points(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x_eval = self.points(model, x, y, seeds)
        with torch.no_grad():
            logits = model(x_eval)
        pred = logits.argmax(1)
        distance = (x_eval - x).flatten(1)
        distance = distance.abs().amax(1) if self.norm == "linf" else distance.norm(dim=1)
        fields = {
            "pred": pred,
            "correct": pred == y,
            "loss": F.cross_entropy(logits.float(), y, reduction="none"),
            "dist": distance,
        }
        return {f"{self.name}/{k}": v for k, v in fields.items()}, x_eval


class Clean(Evaluation):
    """The unmodified test images."""

    def __init__(self, name: str = "clean", norm: str = "linf") -> None:
        super().__init__(name, norm)

    def points(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        return x


class AttackEvaluation(Evaluation):
    """Adversarial examples from any attack object ``attack(model, x, y) -> x_adv`` with
    ``norm`` and ``eps`` attributes (PGD, FGSM, AutoAttack). Attacks that accept per-image
    ``seeds`` get them, which makes their records independent of batching."""

    def __init__(self, name: str, attack: Any) -> None:
        self.ball = LpBall(attack.norm, attack.eps)
        super().__init__(name, self.ball.norm)
        self.attack = attack
        self.takes_seeds = "seeds" in inspect.signature(attack.__call__).parameters

    def points(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        kwargs = {"seeds": seeds} if self.takes_seeds else {}
        x_adv = self.attack(model, x, y, **kwargs)
        if not self.ball.contains(x_adv, x, tol=1e-5).all():
            raise RuntimeError(f"evaluation {self.name!r}: the attack left its threat model")
        return x_adv
