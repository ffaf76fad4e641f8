"""Threat models: l_p norm balls intersected with the [0, 1] image box.

This module is the single place where the framework branches on the norm. Every attack,
defence and training method asks an :class:`LpBall` to project, to draw a random start,
to take a steepest step, or to measure a distance.

The ball is ``B_eps(x) = {x' : ||x' - x||_p <= eps} ∩ [0, 1]^d`` for p in {inf, 2}
(papers 000 and 002, Section 2; DESIGN.md "The science in one page").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch

from safespot.utils.rng import seeded_normal, seeded_uniform

Norm = Literal["linf", "l2"]
NORMS: tuple[str, ...] = ("linf", "l2")
_TINY = 1e-12


class ThreatConfigError(ValueError):
    """An invalid threat-model or attack setting (named in the message)."""


def parse_budget(value: float | int | str, name: str = "eps", allow_zero: bool = False) -> float:
    """Read a budget given as a number or as a fraction string such as ``"8/255"``.

    Raises :class:`ThreatConfigError` naming ``name`` when the value is not a finite
    positive number (or non-negative when ``allow_zero``).
    """
    if isinstance(value, bool):
        raise ThreatConfigError(f"{name} must be a number, got {value!r}")
    try:
        number = float(Fraction(value.replace(" ", ""))) if isinstance(value, str) else float(value)
    except (ValueError, ZeroDivisionError, TypeError):
        raise ThreatConfigError(f"{name} must be a number or a fraction like 8/255, got {value!r}") from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ThreatConfigError(f"{name} must be {bound}, got {value!r}")
    return number


def check_positive_int(value: object, name: str) -> int:
    """An integer >= 1 (steps, restarts, iterations), else a :class:`ThreatConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ThreatConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_norm(norm: str, name: str = "norm") -> Norm:
    if norm not in NORMS:
        raise ThreatConfigError(f"{name} must be one of {list(NORMS)}, got {norm!r}")
    return norm  # type: ignore[return-value]


def _flat_norm(t: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Per-sample norm of a batch, shape ``(B,)``."""
    flat = t.flatten(1)
    if norm == "linf":
        return flat.abs().amax(dim=1)
    return flat.norm(p=2, dim=1)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a ``(B,)`` tensor so it broadcasts against a batch shaped like ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class LpBall:
    """An l_inf or l_2 ball of radius ``eps`` around a centre, intersected with [0, 1].

    ``eps`` may be a float or a fraction string (``"8/255"``); it is validated on creation.
    """

    norm: Norm
    eps: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", check_norm(self.norm))
        object.__setattr__(self, "eps", parse_budget(self.eps, "eps"))

    def with_eps(self, eps: float) -> LpBall:
        return LpBall(self.norm, eps)

    # --- geometry -------------------------------------------------------------------
    def distance(self, x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """Per-sample l_p distance ``||x - center||_p``, shape ``(B,)``."""
        return _flat_norm(x - center, self.norm)

    def contains(self, x: torch.Tensor, center: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
        """Per-sample boolean: inside the ball (up to ``tol``) and inside [0, 1]."""
        in_box = (x >= -tol).flatten(1).all(1) & (x <= 1 + tol).flatten(1).all(1)
        return in_box & (self.distance(x, center) <= self.eps + tol)

    def project(self, x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """Project ``x`` onto ``B_eps(center)`` and then clamp to [0, 1].

        For l_inf the result is the exact Euclidean projection onto the intersection. For
        l_2, clamping after the ball projection can only shrink the distance to the centre
        when the centre lies in [0, 1], so the result stays in both sets.
        """
        delta = x - center
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = _per_sample(_flat_norm(delta, "l2"), delta)
            delta = delta * torch.clamp(self.eps / (norms + _TINY), max=1.0)
        return (center + delta).clamp(0.0, 1.0)

    def random_init(
        self,
        center: torch.Tensor,
        generator: torch.Generator | None = None,
        seeds: torch.Tensor | None = None,
        stream: int = 0,
    ) -> torch.Tensor:
        """A point drawn uniformly from the ball around each centre, then clamped to [0, 1].

        For l_2 the direction is an isotropic Gaussian normalised to the unit sphere and the
        radius is ``eps * U^(1/d)``, which is uniform in volume (not on the sphere).
        A ``generator`` must live on the centre's device. With ``seeds`` (one integer per
        image) each image's start depends only on its own seed, whatever batch it is in;
        ``stream`` selects an independent start for the same seeds (e.g. the safe-spot search's
        own random start, which must not reuse its first inner attack's offsets).
        """
        if seeds is not None:
            delta = self._seeded_delta(center, seeds, stream)
        else:
            delta = self._random_delta(center, generator)
        return (center + delta).clamp(0.0, 1.0)

    def _random_delta(self, center: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        opts = {"generator": generator, "device": center.device, "dtype": center.dtype}
        if self.norm == "linf":
            return (2 * torch.rand(center.shape, **opts) - 1) * self.eps
        direction = torch.randn(center.shape, **opts)
        return self._scale_l2(direction, torch.rand(center.shape[0], **opts))

    def _seeded_delta(self, center: torch.Tensor, seeds: torch.Tensor, stream: int = 0) -> torch.Tensor:
        """Per-image counter-based draws (``safespot.utils.rng``): all images at once, each
        image's start a function of its seed (and ``stream``) alone. Stream ``s`` uses the rng
        streams ``2 s`` (the offsets) and ``2 s + 1`` (the l_2 radius)."""
        opts = {"device": center.device, "dtype": center.dtype}
        d = center[0].numel()
        if self.norm == "linf":
            return (2 * seeded_uniform(seeds, d, stream=2 * stream, **opts).view_as(center) - 1) * self.eps
        direction = seeded_normal(seeds, d, stream=2 * stream, **opts).view_as(center)
        return self._scale_l2(direction, seeded_uniform(seeds, 1, stream=2 * stream + 1, **opts).view(-1))

    def _scale_l2(self, direction: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Gaussian directions to the unit sphere, radius ``eps * U^(1/d)`` (uniform in volume)."""
        direction = direction / _per_sample(_flat_norm(direction, "l2") + _TINY, direction)
        radius = self.eps * u.pow(1.0 / direction[0].numel())
        return direction * _per_sample(radius, direction)

    def steepest_direction(self, grad: torch.Tensor) -> torch.Tensor:
        """Unit-norm steepest-ascent direction for this norm: ``sign(g)`` for l_inf and
        ``g / ||g||_2`` for l_2 (zero where the gradient is zero, never NaN)."""
        if self.norm == "linf":
            return grad.sign()
        norms = _per_sample(_flat_norm(grad, "l2"), grad)
        return torch.where(norms > _TINY, grad / norms.clamp_min(_TINY), torch.zeros_like(grad))

    def step(self, x: torch.Tensor, grad: torch.Tensor, step_size: float, center: torch.Tensor) -> torch.Tensor:
        """One projected steepest-ascent step; pass ``-grad`` to descend."""
        return self.project(x + step_size * self.steepest_direction(grad), center)
