"""Learning-rate schedules as Hydra partials: each takes the optimiser plus the run's
``max_epochs`` and ``total_steps`` and returns a Lightning scheduler dict."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.optim import Optimizer, lr_scheduler


def step_decay(
    optimizer: Optimizer,
    max_epochs: int,
    total_steps: int,
    fractions: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
) -> dict[str, Any]:
    """Multiply the learning rate by ``gamma`` after each fraction of the epochs (the
    papers' 200-epoch schedule decays at epochs 100 and 150: fractions 0.5 and 0.75)."""
    milestones = sorted({max(1, round(f * max_epochs)) for f in fractions})
    return {"scheduler": lr_scheduler.MultiStepLR(optimizer, milestones, gamma), "interval": "epoch"}


def cosine(optimizer: Optimizer, max_epochs: int, total_steps: int, eta_min: float = 0.0) -> dict[str, Any]:
    return {
        "scheduler": lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=eta_min),
        "interval": "step",
    }


def one_cycle(
    optimizer: Optimizer, max_epochs: int, total_steps: int, max_lr: float = 0.2, pct_start: float = 0.4
) -> dict[str, Any]:
    """Piecewise-linear one-cycle schedule as used by fast adversarial training."""
    sched = lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start, anneal_strategy="linear"
    )
    return {"scheduler": sched, "interval": "step"}
