"""8-bit output: a robustified image only helps if it survives being saved as an image file.

:func:`round_trip_8bit` is what saving to PNG/JPEG-quality-100 and reading back does to
pixel values; :func:`project_to_8bit` finds an 8-bit image near x_r that still lies in
``B_delta(x_o) ∩ [0, 1]`` (for an 8-bit original x_o such an image always exists: x_o).
"""

from __future__ import annotations

import torch

from safespot.threat import LpBall

LEVELS = 255


def round_trip_8bit(x: torch.Tensor) -> torch.Tensor:
    """Values after a uint8 round trip: ``round(255 x) / 255``."""
    return torch.round(x.clamp(0, 1) * LEVELS) / LEVELS


def project_to_8bit(x_r: torch.Tensor, x_o: torch.Tensor, ball: LpBall, search_steps: int = 12) -> torch.Tensor:
    """An 8-bit image close to ``x_r`` inside ``ball`` around ``x_o``.

    l_inf: round, then clamp to the grid points inside ``[x_o - delta, x_o + delta] ∩ [0, 1]``.
    l_2: round ``x_o + s (x_r - x_o)`` with the largest ``s`` in [0, 1] (bisection per image)
    whose rounding stays in the ball; ``s = 0`` gives the (rounded) original.
    """
    if ball.norm == "linf":
        lower = torch.ceil(((x_o - ball.eps).clamp(0, 1) * LEVELS) - 1e-6) / LEVELS
        upper = torch.floor(((x_o + ball.eps).clamp(0, 1) * LEVELS) + 1e-6) / LEVELS
        q = torch.min(torch.max(round_trip_8bit(x_r), lower), upper)
        return torch.where(lower <= upper, q, round_trip_8bit(x_o))
    view = (-1, *[1] * (x_r.dim() - 1))
    low = torch.zeros(len(x_r), device=x_r.device, dtype=x_r.dtype)
    high = torch.ones_like(low)
    candidate = round_trip_8bit(x_r)
    ok = ball.contains(candidate, x_o, tol=1e-7)
    low = torch.where(ok, high, low)
    for _ in range(search_steps):
        mid = (low + high) / 2
        inside = ball.contains(round_trip_8bit(x_o + mid.view(view) * (x_r - x_o)), x_o, tol=1e-7)
        low = torch.where(inside & ~ok, mid, low)
        high = torch.where(inside | ok, high, mid)
    return round_trip_8bit(x_o + low.view(view) * (x_r - x_o))
