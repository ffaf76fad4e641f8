"""Speed options of the network: channels-last layout, ``torch.compile``, bf16 autocast.

The attacks, the robustifier and CERTIFY spend their time in forward and input-gradient
passes of one network, so these options act on the network itself: they apply equally to
training, evaluation, the robustify command and OOD scoring.

Precision. ``bf16-mixed`` keeps float32's exponent range, so input gradients of attacks keep
their magnitude. ``16-mixed`` (float16 autocast) does not: Lightning's ``GradScaler`` scales only
the training loss before the weights' backward pass, while an attack takes
``torch.autograd.grad(loss, x)`` of an unscaled loss inside the same autocast region, so small
input gradients underflow to zero in float16 and the attack (PGD, AutoAttack, the safe-spot
search's inner attack, ...) silently weakens. :func:`refuse_float16` therefore refuses float16 for
evaluation (``evaluate.py``), robustification (``robustify.py``) and OOD scoring (``ood.py``)
before any work starts. Training with ``16-mixed`` is not refused here (``train.py`` does not
consult this module about precision): the weight update is loss-scaled, but the training attack of
an adversarial method and the validation attacks (``val/robust_acc``, which selects the best
checkpoint) run under the same unscaled float16 autocast and weaken in the same way; use
``bf16-mixed`` for adversarial training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from safespot.errors import ConfigError

PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")
# Lightning's float16 settings ("16" is its alias of "16-mixed"); see the module docstring.
FLOAT16_PRECISIONS = ("16-mixed", "16", "16-true", "transformer-engine-float16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def prepare_net(net: nn.Module, perf: Any | None) -> nn.Module:
    """Apply the ``perf`` block (``channels_last``, ``compile``, ``compile_mode``) to ``net``
    in place and return it. ``nn.Module.compile`` keeps the parameter names, so checkpoints
    written from a compiled network load anywhere."""
    if not perf:
        return net
    mode = perf.get("compile_mode")
    if mode is not None and mode not in COMPILE_MODES:
        raise ConfigError(f"perf.compile_mode must be one of {list(COMPILE_MODES)} or null, got {mode!r}")
    if perf.get("channels_last", False):
        net.to(memory_format=torch.channels_last)
    if perf.get("compile", False):
        net.compile(**({"mode": mode} if mode else {}))
    return net


def check_precision(precision: Any) -> str:
    """``precision`` as a string, refused unless it is one of :data:`PRECISIONS`."""
    value = str(precision)
    if value not in PRECISIONS:
        raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return value


def refuse_float16(precision: Any, setting: str, task: str) -> str:
    """``precision`` as a string; a :class:`ConfigError` naming ``setting`` when it selects float16
    (:data:`FLOAT16_PRECISIONS`), under which the attacks' input gradients are not loss-scaled and
    can underflow (module docstring). ``task`` names what is refused, e.g. ``"evaluation"``."""
    value = str(precision)
    if value in FLOAT16_PRECISIONS:
        raise ConfigError(
            f"{setting}={value} is not supported for {task}: float16 autocast takes the attacks' input "
            "gradients (and those of the safe-spot search's inner attack) without loss scaling, so they can "
            "underflow to zero and every attack silently weakens; "
            f"use {setting}=bf16-mixed (float32's exponent range, GPUs with bf16) or {setting}=32-true"
        )
    return value


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """Mixed precision for code outside a Lightning Trainer: ``bf16-mixed``
    and ``16-mixed`` autocast the forward passes; losses are taken in float32 by the callers.
    Callers that attack the network refuse ``16-mixed`` first (:func:`refuse_float16`)."""
    precision = check_precision(precision)
    if precision.startswith("32"):
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
