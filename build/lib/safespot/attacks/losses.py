"""Per-sample attack losses. Each maps ``(logits, labels)`` to a ``(B,)`` tensor that an
untargeted attack ascends; a targeted attack descends the same loss at the target label.

- ``ce``: cross-entropy.
- ``cw``: the Carlini-Wagner margin ``max_{i != y} z_i - z_y`` (Carlini & Wagner, 2017,
  f_6). The true class is excluded by masking it with ``-inf``, not by zeroing it, so the
  margin is right when every logit is negative.
- ``dlr``: the difference-of-logits ratio of Croce & Hein (2020, Eq. 6),
  ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)``, invariant to shifts and scaling
  of the logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="none")


def _true_and_best_other(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.float()
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true, others.amax(1)


def cw_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    true, best_other = _true_and_best_other(logits, labels)
    return best_other - true


def dlr(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] < 3:
        raise ValueError("the DLR loss needs at least 3 classes")
    true, best_other = _true_and_best_other(logits, labels)
    top = logits.float().sort(dim=1, descending=True).values
    return -(true - best_other) / (top[:, 0] - top[:, 2] + 1e-12)


LOSSES: dict[str, LossFn] = {"ce": cross_entropy, "cw": cw_margin, "dlr": dlr}


def get_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise ValueError(f"attack loss must be one of {sorted(LOSSES)}, got {name!r}")
    return LOSSES[name]
