"""Certified accuracy of a smoothed classifier versus the l_2 radius.

Cohen et al. (2019, Section 4) report the *certified test-set accuracy at radius r*: the
share of test images that CERTIFY classifies correctly, without abstaining, with a certified
radius of at least ``r`` (paper 002, Table 7, does the same at r in {0, 0.25, 0.5, 0.75, 1}).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm

from safespot.utils import tables


def certified_accuracy(
    radii: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray, at: float | Sequence[float]
) -> float | np.ndarray:
    """Share of images that are correct (and not abstained) with certified radius ``>= at``.

    ``at`` may be one radius (returns a float) or several (returns an array)."""
    radius = np.asarray(radii, dtype=np.float64).reshape(-1)
    ok = np.asarray(correct, dtype=bool).reshape(-1)
    if radius.shape != ok.shape:
        raise ValueError(f"radii and correct differ in length: {radius.shape[0]} vs {ok.shape[0]}")
    grid = np.asarray(at, dtype=np.float64)
    if radius.size == 0:
        values = np.zeros(grid.shape)
    else:
        values = (ok[None, :] & (radius[None, :] >= grid.reshape(-1, 1))).mean(axis=1).reshape(grid.shape)
    return float(values) if grid.ndim == 0 else values


def certified_curve(
    radii: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray, grid: Sequence[float] | None = None
) -> pd.DataFrame:
    """Certified accuracy on a radius grid (default: 201 points from 0 to just past the
    largest radius), columns ``radius`` and ``certified_accuracy``."""
    if grid is None:
        top = float(np.max(np.asarray(radii, dtype=np.float64), initial=0.0))
        grid = np.linspace(0.0, max(top * 1.05, 1e-3), 201)
    grid = np.asarray(grid, dtype=np.float64)
    return pd.DataFrame({"radius": grid, "certified_accuracy": certified_accuracy(radii, correct, grid)})


def certified_table(records: pd.DataFrame, names: Sequence[str], radii: Sequence[float]) -> pd.DataFrame:
    """One row per radius in ``radii``, one certified-accuracy column per certify evaluation
    (read from the ``<name>/radius`` and ``<name>/correct`` fields of the records)."""
    table = pd.DataFrame({"radius": [float(r) for r in radii]})
    for name in names:
        table[name] = certified_accuracy(records[f"{name}/radius"], records[f"{name}/correct"], table["radius"])
    return table


def markdown_table(table: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub markdown table of a data frame (numbers to ``digits`` significant digits)."""
    return tables.markdown_table(table, f".{digits}g")


def plot_certified_accuracy(curves: Mapping[str, pd.DataFrame], path: str | Path, title: str | None = None) -> Path:
    """Write a PNG of certified accuracy versus l_2 radius, one line per curve (frames as
    returned by :func:`certified_curve`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, curve in curves.items():
        ax.plot(curve["radius"], curve["certified_accuracy"], label=label)
    ax.set_xlabel("l2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_certified_accuracy(
    records: pd.DataFrame, names: Sequence[str], radii: Sequence[float], out: str | Path, title: str | None = None
) -> pd.DataFrame:
    """``certified_accuracy.csv`` / ``.md`` (accuracy at ``radii``) and ``certified_accuracy.png``
    (the full curve) for the certify evaluations ``names`` into ``out``; returns the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = certified_table(records, names, radii)
    tmp = out / "certified_accuracy.csv.tmp"
    table.to_csv(tmp, index=False)
    tmp.replace(out / "certified_accuracy.csv")
    (out / "certified_accuracy.md").write_text(markdown_table(table))
    curves = {name: certified_curve(records[f"{name}/radius"], records[f"{name}/correct"]) for name in names}
    plot_certified_accuracy(curves, out / "certified_accuracy.png", title)
    return table


def max_certifiable_radius(sigma: float, n: int, alpha: float = 0.001) -> float:
    """The largest l_2 radius CERTIFY (Cohen et al., 2019) can return with ``n`` draws: when every
    draw votes for the class, the one-sided Clopper-Pearson lower bound is ``alpha^(1/n)``, and the
    radius ``sigma * PhiInverse(alpha^(1/n))``."""
    return float(sigma * norm.ppf(alpha ** (1 / n)))
