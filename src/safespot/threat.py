"""Threat models: l_p norm balls intersected with the [0, 1] image box.

This module is the only place that knows the norms: one small class per norm
(:class:`LinfBall`, :class:`L2Ball`, returned by ``LpBall(norm, eps)``) owns its projection,
random start, steepest step, distance, the 8-bit grid projection and the outer update of the
safe-spot search (the tanh box reparameterisation for l_inf). Every attack, defence,
evaluation and training method asks a ball; nothing else branches on the norm (a test checks).

The ball is ``B_eps(x) = {x' : ||x' - x||_p <= eps} ∩ [0, 1]^d`` for p in {inf, 2}
(papers 000 and 002, Section 2; DESIGN.md "The science in one page").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import ClassVar, Literal

import torch

from safespot.errors import ConfigError
from safespot.utils.rng import seeded_normal, seeded_uniform

Norm = Literal["linf", "l2"]
NORMS: tuple[str, ...] = ("linf", "l2")
_TINY = 1e-12


class ThreatConfigError(ConfigError):
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


def check_budget(
    value: float | int | str,
    norm: str,
    name: str = "eps",
    image_shape: tuple[int, ...] | None = None,
    allow_zero: bool = False,
) -> float:
    """A budget of the ``norm`` ball (:func:`parse_budget`) that is at most the largest distance
    two images in [0, 1] can have (:meth:`LpBall.max_budget`): 1 for l_inf, and for l_2
    ``sqrt(C H W)`` when ``image_shape`` (``(C, H, W)``) is known (unbounded otherwise). A larger
    budget allows every image, so it is almost always a budget in 8-bit levels (``8`` for
    ``8/255``); it is refused with a :class:`ThreatConfigError` naming ``name``."""
    number = parse_budget(value, name, allow_zero)
    ball = geometry(norm)
    bound = ball.max_budget(math.prod(image_shape) if image_shape else None)
    if bound is not None and number > bound + _TINY:
        raise ThreatConfigError(
            f"{name}={value} is above {ball.describe_max(bound, image_shape)}: budgets are in [0, 1] "
            f"pixel units, e.g. {name}={ball.example_budget}"
        )
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


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a ``(B,)`` tensor so it broadcasts against a batch shaped like ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def round_to_grid(x: torch.Tensor, levels: int = 255) -> torch.Tensor:
    """Values after an 8-bit (``levels``) round trip: ``round(levels x) / levels``."""
    return torch.round(x.clamp(0, 1) * levels) / levels


@dataclass
class SearchVariables:
    """The variables of the safe-spot search's outer update (paper 002, Algorithm 1 and
    Appendix C) for one batch of images: the centre x_o, and for l_inf the box
    ``[lower, upper] = [x_o - delta, x_o + delta] ∩ [0, 1]``, the tanh variable ``w`` and its
    RMSProp state. Rows can be selected and concatenated (:meth:`map`)."""

    center: torch.Tensor
    lower: torch.Tensor | None = None
    upper: torch.Tensor | None = None
    w: torch.Tensor | None = None
    square_avg: torch.Tensor | None = None

    def map(self, fn: Callable[..., torch.Tensor], other: SearchVariables | None = None) -> SearchVariables:
        values = {}
        for f in fields(self):
            mine = getattr(self, f.name)
            values[f.name] = None if mine is None else (fn(mine) if other is None else fn(mine, getattr(other, f.name)))
        return SearchVariables(**values)


@dataclass(frozen=True)
class LpBall:
    """An l_p ball of radius ``eps`` around a centre, intersected with [0, 1].

    ``LpBall(norm, eps)`` returns the class of that norm (:class:`LinfBall`, :class:`L2Ball`),
    which owns all of the norm's geometry: distance, projection, random start, steepest step,
    the 8-bit grid projection and the outer update of the safe-spot search. ``eps`` may be a
    float or a fraction string (``"8/255"``); it is validated on creation.
    """

    norm: Norm
    eps: float

    #: the search's outer step size beta (paper 002, Appendix C.1, CIFAR-10)
    search_beta: ClassVar[float]
    #: whether the steepest step is differentiable (the second-order search needs it)
    smooth_steps: ClassVar[bool]
    #: a usual budget, suggested when a budget is refused (:func:`check_budget`)
    example_budget: ClassVar[str]

    def __new__(cls, norm: str | None = None, eps: float | str | None = None) -> LpBall:
        if cls is LpBall:
            cls = _BALLS[check_norm(norm)]  # type: ignore[arg-type]
        return object.__new__(cls)

    def __post_init__(self) -> None:
        expected = _NAMES[type(self)]
        if check_norm(self.norm) != expected:
            raise ThreatConfigError(f"{type(self).__name__} is the {expected} ball, got norm {self.norm!r}")
        object.__setattr__(self, "eps", check_budget(self.eps, self.norm, "eps"))

    def with_eps(self, eps: float) -> LpBall:
        return LpBall(self.norm, eps)

    # --- geometry every norm provides ---------------------------------------------------
    @staticmethod
    def max_budget(dims: int | None) -> float | None:
        """The largest distance between two images of ``dims`` values in [0, 1] (``None``: not
        known without ``dims``), the largest budget :func:`check_budget` accepts."""
        raise NotImplementedError

    @staticmethod
    def describe_max(bound: float, image_shape: tuple[int, ...] | None) -> str:
        """:meth:`max_budget` in words, for error messages."""
        raise NotImplementedError

    @staticmethod
    def size(t: torch.Tensor) -> torch.Tensor:
        """Per-sample norm ``||t_i||_p`` of a batch, shape ``(B,)``."""
        raise NotImplementedError

    def _clip(self, delta: torch.Tensor) -> torch.Tensor:
        """``delta`` projected onto the ball of radius eps around 0."""
        raise NotImplementedError

    def _uniform(self, shape: torch.Size, uniform: Callable, normal: Callable) -> torch.Tensor:
        """Offsets uniform in the ball, from ``uniform(count, stream)`` / ``normal(count, stream)``
        draws of shape ``(B, count)`` (stream 0 for the offsets, 1 for an extra per-image draw)."""
        raise NotImplementedError

    def steepest_direction(self, grad: torch.Tensor) -> torch.Tensor:
        """Unit-norm steepest-ascent direction for this norm (zero where the gradient is zero)."""
        raise NotImplementedError

    def project_to_grid(self, x: torch.Tensor, center: torch.Tensor, levels: int = 255) -> torch.Tensor:
        """An 8-bit (``levels``) image close to ``x`` inside the ball around ``center`` (which
        exists when ``center`` is on the grid: ``center`` itself)."""
        raise NotImplementedError

    def search_variables(self, start: torch.Tensor, center: torch.Tensor) -> SearchVariables:
        """The outer variables of the safe-spot search started at ``start`` in the ball around ``center``."""
        return SearchVariables(center=center)

    def search_update(self, x: torch.Tensor, v: SearchVariables, grad: torch.Tensor, beta: float) -> torch.Tensor:
        """One outer update of the search along ``-grad``; returns the new iterate (``v`` is
        updated in place)."""
        raise NotImplementedError

    # --- generic, from the above ----------------------------------------------------------
    def distance(self, x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """Per-sample l_p distance ``||x - center||_p``, shape ``(B,)``."""
        return self.size(x - center)

    def contains(self, x: torch.Tensor, center: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
        """Per-sample boolean: inside the ball (up to ``tol``) and inside [0, 1]."""
        in_box = (x >= -tol).flatten(1).all(1) & (x <= 1 + tol).flatten(1).all(1)
        return in_box & (self.distance(x, center) <= self.eps + tol)

    def project(self, x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """Project ``x`` onto ``B_eps(center)`` and then clamp to [0, 1] (the exact projection onto
        the intersection for l_inf; for l_2 the clamp can only shrink the distance to a centre in
        [0, 1], so the result stays in both sets)."""
        return (center + self._clip(x - center)).clamp(0.0, 1.0)

    def random_init(
        self,
        center: torch.Tensor,
        generator: torch.Generator | None = None,
        seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A point drawn uniformly from the ball around each centre, then clamped to [0, 1].

        A ``generator`` must live on the centre's device. With ``seeds`` (one integer per image)
        each image's start depends only on its own seed, whatever batch it is in (counter-based
        draws on the centre's device, :mod:`safespot.utils.rng`; a caller that needs a start
        independent of another one made from the same seeds derives its own seeds for its
        purpose, :func:`safespot.utils.rng.derive`).
        """
        uniform, normal = _draws(center, generator, seeds)
        return (center + self._uniform(center.shape, uniform, normal)).clamp(0.0, 1.0)

    def boundary_init(
        self,
        center: torch.Tensor,
        generator: torch.Generator | None = None,
        seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A point drawn uniformly from the boundary of the ball around each centre, then clamped
        to [0, 1] (a vertex of the l_inf box, a point of the l_2 sphere: the start of GAMA,
        :mod:`safespot.attacks.gama`); ``generator`` and ``seeds`` as in :meth:`random_init`."""
        uniform, normal = _draws(center, generator, seeds)
        return (center + self._boundary(center.shape, uniform, normal)).clamp(0.0, 1.0)

    def _boundary(self, shape: torch.Size, uniform: Callable, normal: Callable) -> torch.Tensor:
        """Offsets uniform on the boundary of the ball (draws as in :meth:`_uniform`)."""
        raise NotImplementedError

    def step(self, x: torch.Tensor, grad: torch.Tensor, step_size: float, center: torch.Tensor) -> torch.Tensor:
        """One projected steepest-ascent step; pass ``-grad`` to descend."""
        return self.project(x + step_size * self.steepest_direction(grad), center)


class LinfBall(LpBall):
    """``{x' : max_i |x'_i - x_i| <= eps} ∩ [0, 1]^d``: sign steps, a box."""

    search_beta = 0.1
    smooth_steps = False
    example_budget = "8/255 (8 of 255 levels)"
    #: |tanh(w)| stays below this in the search's box reparameterisation: a pixel on the edge of
    #: its box still has dx/dw ~ 1e-2 of the box, so RMSProp (eps 1e-8) moves it like an interior
    #: pixel; with 1 - 1e-6 a pixel at 0 or 1 could not move at realistic gradients.
    TANH_LIMIT: ClassVar[float] = 1 - 1e-2
    RMS_ALPHA: ClassVar[float] = 0.99  # torch.optim.RMSprop defaults
    RMS_EPS: ClassVar[float] = 1e-8

    @staticmethod
    def max_budget(dims: int | None) -> float:
        """1, whatever the image: a pixel moves at most from 0 to 1."""
        return 1.0

    @staticmethod
    def describe_max(bound: float, image_shape: tuple[int, ...] | None) -> str:
        return "1 for norm linf (a budget of 1 already allows any image)"

    @staticmethod
    def size(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1).abs().amax(dim=1)

    def _clip(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.clamp(-self.eps, self.eps)

    def _uniform(self, shape: torch.Size, uniform: Callable, normal: Callable) -> torch.Tensor:
        d = math.prod(shape[1:])
        return (2 * uniform(d, 0).view(shape) - 1) * self.eps

    def _boundary(self, shape: torch.Size, uniform: Callable, normal: Callable) -> torch.Tensor:
        """A vertex of the box: every value ``+eps`` or ``-eps`` with probability 1/2."""
        d = math.prod(shape[1:])
        u = uniform(d, 0).view(shape)
        return (2 * (u >= 0.5).to(u.dtype) - 1) * self.eps

    def steepest_direction(self, grad: torch.Tensor) -> torch.Tensor:
        """``sign(g)``."""
        return grad.sign()

    def project_to_grid(self, x: torch.Tensor, center: torch.Tensor, levels: int = 255) -> torch.Tensor:
        """Round, then clamp to the grid points inside ``[center - eps, center + eps] ∩ [0, 1]``."""
        lower = torch.ceil(((center - self.eps).clamp(0, 1) * levels) - 1e-6) / levels
        upper = torch.floor(((center + self.eps).clamp(0, 1) * levels) + 1e-6) / levels
        q = torch.min(torch.max(round_to_grid(x, levels), lower), upper)
        return torch.where(lower <= upper, q, round_to_grid(center, levels))

    # --- the box reparameterisation of the search (paper 002, Appendix C) -----------------
    def search_variables(self, start: torch.Tensor, center: torch.Tensor) -> SearchVariables:
        """``x = lower + (tanh(w) + 1) / 2 (upper - lower)`` with the box of the ball around
        ``center``; ``w`` represents ``start`` (an edge pixel up to ``(1 - TANH_LIMIT) / 2`` of
        its box inside); RMSProp state zero."""
        lower, upper = (center - self.eps).clamp(0, 1), (center + self.eps).clamp(0, 1)
        span = (upper - lower).clamp_min(_TINY)
        w = torch.atanh((2 * (start - lower) / span - 1).clamp(-self.TANH_LIMIT, self.TANH_LIMIT))
        return SearchVariables(center=center, lower=lower, upper=upper, w=w, square_avg=torch.zeros_like(w))

    def search_update(self, x: torch.Tensor, v: SearchVariables, grad: torch.Tensor, beta: float) -> torch.Tensor:
        """RMSProp on ``w`` (``torch.optim.RMSprop`` defaults: alpha 0.99, eps 1e-8), ``w`` kept
        within ``atanh(TANH_LIMIT)`` so that every pixel's gradient keeps flowing."""
        assert v.w is not None and v.square_avg is not None and v.lower is not None and v.upper is not None
        t = torch.tanh(v.w)
        grad_w = grad * (v.upper - v.lower) / 2 * (1 - t * t)
        v.square_avg.mul_(self.RMS_ALPHA).addcmul_(grad_w, grad_w, value=1 - self.RMS_ALPHA)
        v.w.addcdiv_(grad_w, v.square_avg.sqrt().add_(self.RMS_EPS), value=-beta)
        limit = math.atanh(self.TANH_LIMIT)
        v.w.clamp_(-limit, limit)
        x_new = v.lower + (torch.tanh(v.w) + 1) / 2 * (v.upper - v.lower)
        return torch.min(torch.max(x_new, v.lower), v.upper)


class L2Ball(LpBall):
    """``{x' : ||x' - x||_2 <= eps} ∩ [0, 1]^d``: normalised-gradient steps."""

    search_beta = 0.001
    smooth_steps = True
    example_budget = "0.5"

    @staticmethod
    def max_budget(dims: int | None) -> float | None:
        """``sqrt(dims)``, the distance between a black and a white image (unknown without ``dims``)."""
        return math.sqrt(dims) if dims else None

    @staticmethod
    def describe_max(bound: float, image_shape: tuple[int, ...] | None) -> str:
        shape = "x".join(str(d) for d in image_shape or ())
        return f"{bound:.4g} for norm l2 (the distance between a black and a white {shape} image)"

    @staticmethod
    def size(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1).norm(p=2, dim=1)

    def _clip(self, delta: torch.Tensor) -> torch.Tensor:
        norms = _per_sample(self.size(delta), delta)
        return delta * torch.clamp(self.eps / (norms + _TINY), max=1.0)

    def _uniform(self, shape: torch.Size, uniform: Callable, normal: Callable) -> torch.Tensor:
        """An isotropic Gaussian direction on the unit sphere and radius ``eps U^(1/d)``: uniform
        in volume (not on the sphere)."""
        d = math.prod(shape[1:])
        direction = normal(d, 0).view(shape)
        direction = direction / _per_sample(self.size(direction) + _TINY, direction)
        radius = self.eps * uniform(1, 1).view(-1).pow(1.0 / d)
        return direction * _per_sample(radius, direction)

    def _boundary(self, shape: torch.Size, uniform: Callable, normal: Callable) -> torch.Tensor:
        """An isotropic Gaussian direction scaled to the sphere of radius ``eps``."""
        d = math.prod(shape[1:])
        direction = normal(d, 0).view(shape)
        return self.eps * direction / _per_sample(self.size(direction) + _TINY, direction)

    def steepest_direction(self, grad: torch.Tensor) -> torch.Tensor:
        """``g / ||g||_2`` (zero where the gradient is zero, never NaN)."""
        norms = _per_sample(self.size(grad), grad)
        return torch.where(norms > _TINY, grad / norms.clamp_min(_TINY), torch.zeros_like(grad))

    def project_to_grid(
        self, x: torch.Tensor, center: torch.Tensor, levels: int = 255, search_steps: int = 12
    ) -> torch.Tensor:
        """Round ``center + s (x - center)`` with the largest ``s`` in [0, 1] (bisection per
        image) whose rounding stays in the ball; ``s = 0`` gives the (rounded) centre."""
        view = (-1, *[1] * (x.dim() - 1))
        low = torch.zeros(len(x), device=x.device, dtype=x.dtype)
        high = torch.ones_like(low)
        ok = self.contains(round_to_grid(x, levels), center, tol=1e-7)
        low = torch.where(ok, high, low)
        for _ in range(search_steps):
            mid = (low + high) / 2
            inside = self.contains(round_to_grid(center + mid.view(view) * (x - center), levels), center, tol=1e-7)
            low = torch.where(inside & ~ok, mid, low)
            high = torch.where(inside | ok, high, mid)
        return round_to_grid(center + low.view(view) * (x - center), levels)

    def search_update(self, x: torch.Tensor, v: SearchVariables, grad: torch.Tensor, beta: float) -> torch.Tensor:
        """A projected gradient-descent step onto the ball and [0, 1]."""
        return self.project(x - beta * grad, v.center)


def _draws(
    center: torch.Tensor, generator: torch.Generator | None, seeds: torch.Tensor | None
) -> tuple[Callable, Callable]:
    """``(uniform, normal)``: ``(count, stream) -> (B, count)`` draws for the images of ``center``,
    from per-image seeded streams (``seeds``) or from ``generator`` (the global RNG when ``None``),
    created on the centre's device in its dtype."""
    opts = {"device": center.device, "dtype": center.dtype}
    if seeds is not None:
        uniform = lambda count, k: seeded_uniform(seeds, count, stream=k, **opts)  # noqa: E731
        normal = lambda count, k: seeded_normal(seeds, count, stream=k, **opts)  # noqa: E731
    else:
        batch = center.shape[0]
        uniform = lambda count, k: torch.rand((batch, count), generator=generator, **opts)  # noqa: E731
        normal = lambda count, k: torch.randn((batch, count), generator=generator, **opts)  # noqa: E731
    return uniform, normal


_BALLS: dict[str, type[LpBall]] = {"linf": LinfBall, "l2": L2Ball}
_NAMES: dict[type, str] = {cls: name for name, cls in _BALLS.items()}


def geometry(norm: str) -> type[LpBall]:
    """The ball class of ``norm`` (validated), e.g. for its per-sample :meth:`LpBall.size`."""
    return _BALLS[check_norm(norm)]
