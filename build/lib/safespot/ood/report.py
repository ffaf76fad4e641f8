"""OOD results: per-set metrics, the paper-000 Table 4 layout, score histograms (Figure 3
style) and mean ± std over repeated runs.

Table 4 of paper 000 has one row per test outlier set plus their average and, for each of
FPR95 (lower is better), AUROC and AUPR (higher is better), one column per detector; all
values are percentages. :func:`table4` builds that table from :func:`detector_metrics`.

Aggregate several ``ood.py`` runs (e.g. 10 training seeds, as Table 4 is averaged over 10
runs) with::

    python -m safespot.ood.report RUN_DIR [RUN_DIR ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # object-oriented API: renders with Agg, no global pyplot state

from safespot.ood.metrics import METRICS, mean_std, ood_metrics, threshold_at_tpr
from safespot.utils.tables import markdown_table

IN_DISTRIBUTION = "in_distribution"
AVERAGE = "Average"
LABELS = {"fpr95": "FPR95 ↓", "auroc": "AUROC ↑", "aupr": "AUPR ↑"}

Results = dict[str, dict[str, dict[str, float]]]  # detector -> outlier set (and Average) -> metric -> percent


def detector_metrics(scores: pd.DataFrame, detectors: Sequence[str]) -> Results:
    """``{detector: {set: {fpr95, auroc, aupr}}}`` in percent, one entry per outlier set in
    ``scores`` (column ``set``; in-distribution rows have set ``in_distribution``) and the
    average over the sets."""
    inliers = scores[scores["set"] == IN_DISTRIBUTION]
    sets = [s for s in dict.fromkeys(scores["set"]) if s != IN_DISTRIBUTION]
    results: Results = {}
    for det in detectors:
        per_set = {}
        for name in sets:
            out = scores.loc[scores["set"] == name, det].to_numpy(dtype=float)
            per_set[name] = {k: 100 * v for k, v in ood_metrics(inliers[det].to_numpy(dtype=float), out).items()}
        per_set[AVERAGE] = {k: float(np.mean([per_set[s][k] for s in sets])) for k in METRICS}
        results[det] = per_set
    return results


def table4(results: Mapping[str, Mapping[str, Mapping[str, float]]], digits: int = 2) -> pd.DataFrame:
    """Paper 000, Table 4 layout: rows = test outlier sets + Average, columns = ``FPR95 ↓ <det>``
    for every detector, then AUROC and AUPR likewise (percent). Cells may be ``(mean, std)``
    pairs, shown as ``mean ± std``."""
    detectors = list(results)
    sets = list(next(iter(results.values()))) if results else []
    rows = []
    for name in sets:
        row: dict[str, Any] = {"D_out^test": name}
        for metric in METRICS:
            for det in detectors:
                value = results[det][name][metric]
                if isinstance(value, Mapping):
                    row[f"{LABELS[metric]} {det}"] = f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"
                else:
                    row[f"{LABELS[metric]} {det}"] = round(float(value), digits)
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame, digits: int = 2) -> str:
    return markdown_table(df, f".{digits}f")


def plot_histograms(scores: pd.DataFrame, detector: str, path: Path, title: str | None = None) -> Path:
    """Density histograms of one detector's anomaly scores: in-distribution images against
    each outlier set, with a dotted line at the threshold that detects 95% of all outliers."""
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.add_subplot()
    values = scores[detector].to_numpy(dtype=float)
    low, high = np.nanmin(values), np.nanmax(values)
    bins = np.linspace(low, high if high > low else low + 1.0, 51)
    for name, group in scores.groupby("set", sort=False):
        label = "D_in" if name == IN_DISTRIBUTION else str(name)
        ax.hist(group[detector].to_numpy(dtype=float), bins=bins, density=True, alpha=0.45, label=label)
    inliers = scores.loc[scores["set"] == IN_DISTRIBUTION, detector]
    outliers = scores.loc[scores["set"] != IN_DISTRIBUTION, detector]
    if len(outliers) and len(inliers):
        ax.axvline(threshold_at_tpr(inliers.to_numpy(float), outliers.to_numpy(float)), color="k", linestyle=":")
    ax.set(xlabel=f"{detector} score (higher = more anomalous)", ylabel="density", title=title or detector)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_figure3(scores: pd.DataFrame, detector: str, path: Path) -> Path:
    """Paper 000, Figure 3: histograms of ``CE(x_o, c(x_o))`` (left) and of the attacked safe
    spot's ``CE(x_a*, c(x_o))`` (right), in-distribution against all outliers, dotted lines at
    the threshold that detects 95% of the outliers."""
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    outlier = scores["set"] != IN_DISTRIBUTION
    for ax, column, label in zip(
        axes, ("loss", "loss_adv"), ("CE(x_o, c(x_o))", "CE(x_a*, c(x_o)), x_a* in B_eps(x_s*)"), strict=True
    ):
        values = scores[f"{detector}/{column}"].to_numpy(dtype=float)
        finite = values[np.isfinite(values)]
        low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        bins = np.linspace(low, high if high > low else low + 1.0, 51)
        ax.hist(values[~outlier.to_numpy()], bins=bins, density=True, alpha=0.5, label="D_in")
        ax.hist(values[outlier.to_numpy()], bins=bins, density=True, alpha=0.5, label="D_out^test")
        if outlier.any() and (~outlier).any():
            # outliers have the larger losses here, so the loss itself is the anomaly score
            ax.axvline(threshold_at_tpr(values[~outlier.to_numpy()], values[outlier.to_numpy()]), color="k", ls=":")
        ax.set(xlabel=label, ylabel="density")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def write_tables(out: Path, results: Results, meta: Mapping[str, Any]) -> pd.DataFrame:
    """``table.md`` and ``table.csv`` (Table 4 layout) and ``results.json`` into ``out``."""
    table = table4(results)
    header = f"# OOD detection ({meta.get('method') or 'model'}, D_in: {meta.get('data') or '?'})\n\n"
    note = (
        "\nPercentages. Outliers are the positive class; a higher score means more anomalous; "
        "FPR95 = in-distribution images flagged when 95% of the outliers are detected.\n"
    )
    (out / "table.md").write_text(header + to_markdown(table) + note)
    table.to_csv(out / "table.csv", index=False)
    (out / "results.json").write_text(json.dumps({"metrics": results, **meta}, indent=2, default=str))
    return table


# --- aggregation over runs ----------------------------------------------------------------
def aggregate(run_dirs: Sequence[str | Path]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``{detector: {set: {metric: {mean, std, n}}}}`` over the ``results.json`` of several runs
    (detectors and sets present in every run)."""
    runs = [json.loads((Path(d) / "results.json").read_text())["metrics"] for d in run_dirs]
    if not runs:
        raise ValueError("aggregate needs at least one run directory")
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for det in [d for d in runs[0] if all(d in r for r in runs)]:
        out[det] = {}
        for name in [s for s in runs[0][det] if all(s in r[det] for r in runs)]:
            out[det][name] = mean_std([r[det][name] for r in runs])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mean ± std of OOD metrics over ood.py run directories")
    parser.add_argument("runs", nargs="+", help="ood.py run directories (each with results.json)")
    parser.add_argument("--out", default=None, help="output directory (default: a new directory under logs/ood)")
    args = parser.parse_args(argv)
    missing = [r for r in args.runs if not (Path(r) / "results.json").is_file()]
    if missing:
        print(f"error: no results.json in {missing}", file=sys.stderr)
        return 2
    summary = aggregate(args.runs)
    out = Path(args.out or f"logs/ood/aggregate/{datetime.now():%Y-%m-%d_%H-%M-%S}")
    if out.exists() and any(out.iterdir()):
        print(f"error: --out {out} exists and is not empty", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(
        f"# OOD detection, mean ± std over {len(args.runs)} runs\n\n" + to_markdown(table4(summary))
    )
    (out / "summary.json").write_text(json.dumps({"runs": [str(r) for r in args.runs], "metrics": summary}, indent=2))
    print(f"[safespot] {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
