"""Differentiable views of a Gaussian-smoothed classifier.

``g(x) = argmax_y P(c(x + xi) = y)``, ``xi ~ N(0, sigma^2 I)`` (Cohen et al., 2019) is not
differentiable. Attacks and the robustifier therefore use the *soft* smoothed classifier of
Salman et al. (2019), ``C~(x) = E_xi[softmax(c(x + xi))]`` (paper 002, Eq. 3), estimated with
``m`` noise draws: :class:`SoftSmoothed` returns ``log C~(x)`` as its "logits", so the
cross-entropy any attack computes on it is the soft smoothed loss
``-log mean_m softmax(c(x + xi_m))_y`` and its input gradient is the gradient of the mean.
:class:`NoisyClassifier` adds one fresh draw per forward pass; averaging its gradients over
``m`` passes (``PGD(eot=m)``) is EPGD, the mean of gradients of paper 003.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from safespot.threat import check_positive_int, parse_budget


class NoisyClassifier(nn.Module):
    """``c(x + xi)`` with one fresh ``xi ~ N(0, sigma^2 I)`` per call."""

    def __init__(self, base: nn.Module, sigma: float) -> None:
        super().__init__()
        self.base = base
        self.sigma = parse_budget(sigma, "sigma")
        self.num_classes = getattr(base, "num_classes", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x + self.sigma * torch.randn_like(x))


class SoftSmoothed(nn.Module):
    """``log mean_m softmax(c(x + xi_m))`` with ``m`` draws per image.

    Inside :meth:`fixed_noise` the same ``m`` draws are reused by every forward pass of the
    block (Salman et al.'s SmoothAdv fixes the noise for the whole inner attack of a
    minibatch); otherwise each call draws afresh.
    """

    def __init__(self, base: nn.Module, sigma: float, m: int = 5) -> None:
        super().__init__()
        self.base = base
        self.sigma = parse_budget(sigma, "sigma")
        self.m = check_positive_int(m, "m")
        self.num_classes = getattr(base, "num_classes", None)
        self._fixed: torch.Tensor | None = None
        self._fixing = False

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        """``(m, *x.shape)`` noise draws, reused inside :meth:`fixed_noise`."""
        if self._fixing and self._fixed is not None and self._fixed.shape[1:] == x.shape:
            return self._fixed
        draws = self.sigma * torch.randn((self.m, *x.shape), device=x.device, dtype=x.dtype)
        if self._fixing:
            self._fixed = draws
        return draws

    @contextmanager
    def fixed_noise(self) -> Iterator[SoftSmoothed]:
        self._fixing, self._fixed = True, None
        try:
            yield self
        finally:
            self._fixing, self._fixed = False, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noisy = (x.unsqueeze(0) + self.noise(x)).flatten(0, 1)  # (m * B, ...)
        probs = torch.softmax(self.base(noisy).float(), dim=1).view(self.m, x.shape[0], -1)
        return probs.mean(0).clamp_min(1e-12).log()
