"""The layers the feature-based detectors (Mahalanobis, Gram) read: named layers, the
penultimate features, every convolution, or the stages of a network found by one forward pass;
and the hooks that record them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from safespot.attacks import attack_context
from safespot.ood.detectors.base import DetectorError

PENULTIMATE, CONV, STAGES = "penultimate", "conv", "stages"
#: A resolved layer: ``(name, module, capture its input rather than its output)``.
Layer = tuple[str, nn.Module, bool]


def resolve_layers(model: nn.Module, layers: Sequence[str], probe: torch.Tensor | None = None) -> list[Layer]:
    """``(name, module, capture its input)`` for each requested layer: ``penultimate`` (the
    input of the last ``nn.Linear``), ``conv`` (every ``nn.Conv2d`` output), ``stages`` (the
    output of each stage of the network, :func:`stage_modules`; found by a forward pass of
    ``probe``, images of the model's input size) or a module name from ``model.named_modules()``."""
    modules = dict(model.named_modules())
    resolved: list[Layer] = []
    for layer in layers:
        if layer == PENULTIMATE:
            linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
            if not linears:
                raise DetectorError("layer 'penultimate' needs a model with an nn.Linear head")
            resolved.append((PENULTIMATE, linears[-1][1], True))
        elif layer == CONV:
            convs = [(n, m, False) for n, m in modules.items() if isinstance(m, nn.Conv2d)]
            if not convs:
                raise DetectorError("layer 'conv' needs a model with nn.Conv2d layers")
            resolved.extend(convs)
        elif layer == STAGES:
            if probe is None:
                raise DetectorError(
                    "layer 'stages' is found by a forward pass of the fitting images, which only the "
                    "Mahalanobis detector makes; name the layers instead"
                )
            resolved.extend((n, modules[n], False) for n in stage_modules(model, probe))
        elif layer in modules and layer:
            resolved.append((layer, modules[layer], False))
        else:
            names = [n for n in modules if n][:12]
            raise DetectorError(
                f"unknown layer {layer!r}; use 'penultimate', 'conv', 'stages' or a module name such as {names}"
            )
    names = [n for n, _, _ in resolved]
    if len(set(names)) != len(names):
        raise DetectorError(f"layers {list(layers)} name a layer twice: {names}")
    return resolved


def stage_modules(model: nn.Module, probe: torch.Tensor) -> list[str]:
    """Names of the modules whose outputs end the *stages* of a convolutional network: the
    feature maps of Lee et al.'s (2018) multi-layer ensemble (the stem and each residual stage of
    a ResNet), found from one forward pass of ``probe`` without knowing the architecture.

    Every module's 4-D output is recorded in the order the modules finish. The *trunk* is the
    shallowest module depth (``a.b.c`` has depth 3) whose modules produce at least two different
    feature-map shapes ``(C, H, W)``, leaving out the input's own shape (e.g. ``Normalize``) and
    ``1 x 1`` maps (global pooling: those are the penultimate features). Consecutive trunk
    modules with the same output shape form one stage, which ends at the last of them.

    With the models of ``conf/model``: SmallCNN ``backbone.features.0`` ... ``.2`` (its three
    conv blocks); PreActResNet-18 ``backbone.features.2``, ``.4``, ``.6`` and ``.10`` (the stem
    conv has the first stage's shape and joins it; the last stage ends after the final
    batch norm + ReLU); WRN-34-10 / WRN-28-10 the stem ``backbone.features.0`` and the ends of
    its three stages, the last after the final batch norm + ReLU; torchvision's ResNet-50 the
    stem (after ReLU and after max pooling), ``layer1`` ... ``layer4``; the FLSS models the same
    modules of their encoder (``encoder.features.*``). The channel means of the last stage are
    the penultimate features of these networks (global average pooling, then the linear head).
    """
    records: list[tuple[str, int, tuple[int, ...]]] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(m: nn.Module, args: Any, out: Any, n: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                records.append((n, n.count(".") + 1, tuple(out.shape[1:])))

        handles.append(module.register_forward_hook(hook))
    try:
        with attack_context(model, "eval", update_bn=False), torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    image = tuple(probe.shape[1:])
    for depth in sorted({d for _, d, _ in records}):
        runs: list[list[Any]] = []  # [last module name, shape] of consecutive equal shapes
        for name, d, shape in records:
            if d != depth:
                continue
            if runs and runs[-1][1] == shape:
                runs[-1][0] = name
            else:
                runs.append([name, shape])
        stages = [(n, shape) for n, shape in runs if shape != image and shape[1] * shape[2] > 1]
        if len({shape for _, shape in stages}) >= 2:
            names = [n for n, _ in stages]
            if len(set(names)) != len(names):
                raise DetectorError(
                    f"layer 'stages': module(s) {sorted({n for n in names if names.count(n) > 1})} end several "
                    "stages (a module called more than once); name the layers instead"
                )
            return names
    raise DetectorError("layer 'stages' needs a convolutional network whose feature maps change shape; name the layers")


@contextmanager
def capture(layers: Sequence[Layer]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output (or input) of each layer during forward passes inside the block."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name, module, use_input in layers:
        if use_input:
            handles.append(module.register_forward_pre_hook(lambda m, args, n=name: store.__setitem__(n, args[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, n=name: store.__setitem__(n, out)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def pooled(t: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` channel means of a ``(B, C, ...)`` activation (Lee et al.'s feature)."""
    return t.flatten(2).mean(2) if t.dim() > 2 else t
