"""Speed options of the network: channels-last layout, ``torch.compile``, bf16 autocast.

The attacks, the robustifier and CERTIFY spend their time in forward and input-gradient
passes of one network, so these options act on the network itself: they apply equally to
training, evaluation, the robustify command and OOD scoring.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from safespot.utils.task import ConfigError

PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")
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
    value = str(precision)
    if value not in PRECISIONS:
        raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return value


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """Mixed precision for code outside a Lightning Trainer (``robustify.py``): ``bf16-mixed``
    and ``16-mixed`` autocast the forward passes; losses are taken in float32 by the callers."""
    precision = check_precision(precision)
    if precision.startswith("32"):
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
