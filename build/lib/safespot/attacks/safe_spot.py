"""The safe-spot step of preemptively robust training (paper 002, Section 3.5 and Algorithm 2;
paper 000, Section 3.5).

Before the K-step attack, the training batch is moved to a nearby "safe spot": ``x_r`` starts
(uniformly in ``B_delta(x_o)``, or at ``x_o``) and takes ``L`` projected steps of size ``beta``
that *descend* ``CE(c(x_r), y)`` inside ``B_delta(x_o) ∩ [0, 1]``, the first-order approximation
of the outer minimisation of paper 002, Eq. 2. It is a targeted PGD towards the labels.
Paper 000's variants are settings: S-FGSM (``L = 1``, ``beta = delta``, no random start) and
S-PGD (``L = 10``, ``beta = delta / 4``).

:class:`SafeSpotStep` is what ``method.safe_spot`` configures (``_partial_: true``,
``conf/method/preemptive.yaml``); the methods call it (:class:`safespot.methods.PreemptiveTraining`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from safespot.attacks.context import AttackMode, attack_context, check_attack_mode
from safespot.attacks.pgd import PGD
from safespot.threat import LpBall, ThreatConfigError, check_budget, parse_budget

#: The settings a safe-spot step is given (``method.safe_spot``).
SAFE_SPOT_KEYS: tuple[str, ...] = ("delta", "steps", "step_size", "step_fraction", "random_start", "mode", "updates_bn")


@dataclass
class SafeSpotStep:
    """``L`` targeted PGD steps descending ``CE(c(x_r), labels)`` inside ``B_delta(x_o)``.

    Args:
        norm: the threat model's norm.
        eps: the attacker's budget (``threat.eps``); the default of ``delta``.
        delta: the defender's budget (``None``: ``eps``, paper 002: delta = eps).
        steps: L (default 1).
        step_size: beta (``None``: ``step_fraction * delta``).
        step_fraction: beta / delta when ``step_size`` is ``None`` (default 1).
        random_start: start uniformly in ``B_delta(x_o)`` instead of at ``x_o``.
        mode: the network's mode during the step (``train`` by default, as the attack of
            Rice et al.; ``eval`` for validation).
        updates_bn: let the step's forward passes update batch-norm statistics (off by
            default: clean batches leave them untouched).

    After validation ``delta`` and ``step_size`` hold floats. The step is called like an attack,
    ``step(model, x, labels)`` (optionally ``target=labels``, the same labels), and returns
    ``x_r``; it declares ``targeted`` and ``requires_smoothing`` as :class:`~safespot.attacks.Attack`
    does, with ``eps`` the attacker's budget and the output inside ``B_delta(x)``.
    """

    norm: str
    eps: float | str
    delta: float | str | None = None
    steps: int = 1
    step_size: float | str | None = None
    step_fraction: float | str = 1.0
    random_start: bool = True
    mode: AttackMode = "train"
    updates_bn: bool = False
    pgd: PGD = field(init=False, repr=False)
    targeted: ClassVar[bool] = True
    requires_smoothing: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.eps = LpBall(self.norm, self.eps).eps  # validates norm and eps
        self.delta = check_budget(self.eps if self.delta is None else self.delta, self.norm, "safe_spot.delta")
        self.step_fraction = parse_budget(self.step_fraction, "safe_spot.step_fraction")
        self.step_size = (
            self.step_fraction * self.delta
            if self.step_size is None
            else parse_budget(self.step_size, "safe_spot.step_size")
        )
        self.steps = int(self.steps)
        self.random_start, self.updates_bn = bool(self.random_start), bool(self.updates_bn)
        self.mode = check_attack_mode(self.mode)
        self.pgd = PGD(
            self.norm,
            self.delta,
            steps=self.steps,
            step_size=self.step_size,
            random_start=self.random_start,
            targeted=True,
            mode=self.mode,
        )

    @classmethod
    def from_settings(cls, norm: str, eps: float | str, settings: dict[str, Any] | None) -> SafeSpotStep:
        """The step from a plain ``safe_spot`` mapping (earlier configs and direct use),
        refusing unknown keys."""
        settings = dict(settings or {})
        unknown = sorted(set(settings) - set(SAFE_SPOT_KEYS))
        if unknown:
            raise ThreatConfigError(f"unknown safe_spot settings {unknown}; expected some of {list(SAFE_SPOT_KEYS)}")
        return cls(norm, eps, **settings)

    def settings(self) -> dict[str, Any]:
        """The resolved settings (plain data, as recorded with a checkpoint's hyperparameters)."""
        return {
            "delta": self.delta,
            "steps": self.steps,
            "step_size": self.step_size,
            "random_start": self.random_start,
            "mode": self.mode,
            "updates_bn": self.updates_bn,
        }

    def evaluation_step(self) -> SafeSpotStep:
        """The same step in eval mode without batch-norm updates (validation and test: the
        train-mode step would make ``x_r`` depend on the batch)."""
        return dataclasses.replace(self, mode="eval", updates_bn=False)

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        seeds: torch.Tensor | None = None,
        vote_seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x_r`` for images ``x`` protecting the labels ``y`` (``target``, when given, are the
        same labels); ``seeds`` as for :class:`~safespot.attacks.PGD`."""
        labels = y if target is None else target
        with attack_context(model, update_bn=self.updates_bn):
            return self.pgd(model, x, labels, target=labels, seeds=seeds, vote_seeds=vote_seeds)
