"""8-bit output: a robustified image only helps if it survives being saved as an image file.

:func:`round_trip_8bit` is what saving to PNG/JPEG-quality-100 and reading back does to
pixel values; :func:`project_to_8bit` finds an 8-bit image near x_r that still lies in
``B_delta(x_o) ∩ [0, 1]`` (for an 8-bit original x_o such an image always exists: x_o).
"""

from __future__ import annotations

import torch

from safespot.threat import LpBall, round_to_grid

LEVELS = 255


def round_trip_8bit(x: torch.Tensor) -> torch.Tensor:
    """Values after a uint8 round trip: ``round(255 x) / 255``."""
    return round_to_grid(x, LEVELS)


def project_to_8bit(x_r: torch.Tensor, x_o: torch.Tensor, ball: LpBall) -> torch.Tensor:
    """An 8-bit image close to ``x_r`` inside ``ball`` around ``x_o``
    (:meth:`safespot.threat.LpBall.project_to_grid`: for l_inf round, then clamp to the grid
    points of the box; for l_2 round ``x_o + s (x_r - x_o)`` with the largest ``s`` in [0, 1]
    whose rounding stays in the ball)."""
    return ball.project_to_grid(x_r, x_o, LEVELS)
