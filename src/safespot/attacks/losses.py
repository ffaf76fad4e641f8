"""Per-sample attack losses. Each maps ``(logits, labels)`` to a ``(B,)`` tensor that an
untargeted attack ascends."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="none")


LOSSES: dict[str, LossFn] = {"ce": cross_entropy}


def get_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise ValueError(f"attack loss must be one of {sorted(LOSSES)}, got {name!r}")
    return LOSSES[name]
