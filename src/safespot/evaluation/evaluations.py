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

    @property
    def outputs(self) -> list[str]:
        """The names under which this evaluation writes fields (one per scored point set)."""
        return [self.name]

    @property
    def groups(self) -> dict[str, list[str]]:
        """Grey-box groups ``{robustified name: [attack names]}`` for the safe-spot rate."""
        return {}

    def points(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(
        self, model: nn.Module, x_eval: torch.Tensor, x_ref: torch.Tensor, y: torch.Tensor, name: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Prediction, correctness, cross-entropy and distance to ``x_ref`` of ``x_eval``."""
        with torch.no_grad():
            logits = model(x_eval)
        pred = logits.argmax(1)
        distance = (x_eval - x_ref).flatten(1)
        distance = distance.abs().amax(1) if self.norm == "linf" else distance.norm(dim=1)
        fields = {
            "pred": pred,
            "correct": pred == y,
            "loss": F.cross_entropy(logits.float(), y, reduction="none"),
            "dist": distance,
        }
        return {f"{name or self.name}/{k}": v for k, v in fields.items()}

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x_eval = self.points(model, x, y, seeds)
        return self.score(model, x_eval, x, y), x_eval


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


class PreemptiveEvaluation(Evaluation):
    """Grey-box evaluation of preemptive robustification (paper 002, Section 3.1).

    The defender robustifies each test image x_o into x_r (any robustifier: none, S-FGSM,
    S-PGD, the safe-spot search); each attack then runs on x_r inside ``B_eps(x_r)``, unaware
    of the modification. Fields: ``<name>/...`` for x_r itself (distance to x_o, plus the
    robustifier's worst-case loss, iterations and early-exit flag) and ``<name>_<attack>/...``
    per attack (distance to x_r).
    """

    def __init__(self, name: str, robustifier: Any, attacks: dict[str, Any] | None = None) -> None:
        super().__init__(name, LpBall(robustifier.norm, robustifier.delta).norm)
        self.robustifier = robustifier
        self.attacks = [
            AttackEvaluation(f"{name}_{key}", attack) for key, attack in (attacks or {}).items() if attack is not None
        ]

    @property
    def outputs(self) -> list[str]:
        return [self.name, *(a.name for a in self.attacks)]

    @property
    def groups(self) -> dict[str, list[str]]:
        return {self.name: [a.name for a in self.attacks]}

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        result = self.robustifier(model, x, seeds=seeds)
        x_r = result.x_r
        fields = self.score(model, x_r, x, y)
        fields[f"{self.name}/worst_loss"] = result.worst_loss
        fields[f"{self.name}/iterations"] = result.iterations
        fields[f"{self.name}/early_exit"] = result.early_exit
        for k, attack in enumerate(self.attacks, start=1):
            attack_fields, _ = attack(model, x_r, y, seeds + k * 7_777_777)
            fields.update(attack_fields)
        return fields, x_r
