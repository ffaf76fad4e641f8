"""Running a model under attack without side effects on training state.

Attacks need input gradients only. :func:`attack_context` freezes the parameters (so no
parameter gradient is computed or accumulated), optionally switches the model to train or
eval mode, optionally protects batch-norm running statistics, and restores all of it on
exit, also when the attack raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

AttackMode = Literal["train", "eval", "keep"]
ATTACK_MODES: tuple[str, ...] = ("train", "eval", "keep")


def check_attack_mode(mode: str) -> AttackMode:
    if mode not in ATTACK_MODES:
        raise ValueError(f"attack mode must be one of {list(ATTACK_MODES)}, got {mode!r}")
    return mode  # type: ignore[return-value]


def _norm_buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, saved copy) pairs of every batch-norm running statistic."""
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            for buf in (module.running_mean, module.running_var, module.num_batches_tracked):
                if buf is not None:
                    saved.append((buf, buf.detach().clone()))
    return saved


@contextmanager
def attack_context(model: nn.Module, mode: AttackMode = "keep", update_bn: bool = True) -> Iterator[nn.Module]:
    """Freeze parameters, set ``mode``, and restore modes, flags and (unless ``update_bn``)
    batch-norm statistics on exit.

    Gradient attacks cannot run under ``torch.inference_mode``; this raises a clear error
    instead of failing deep inside autograd (Lightning's ``trainer.test`` needs
    ``Trainer(inference_mode=False)``).
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "gradient attacks cannot run under torch.inference_mode(); build the Trainer with inference_mode=False"
        )
    check_attack_mode(mode)
    training = [(m, m.training) for m in model.modules()]
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    saved_bn = [] if update_bn else _norm_buffers(model)
    for p, _ in grad_flags:
        p.requires_grad_(False)
    if mode == "train":
        model.train()
    elif mode == "eval":
        model.eval()
    try:
        with torch.enable_grad():
            yield model
    finally:
        for m, flag in training:
            m.training = flag
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        with torch.no_grad():
            for buf, copy in saved_bn:
                buf.copy_(copy)
