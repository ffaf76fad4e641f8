"""Aggregate evaluation runs into a paper-style robustness report.

Reads the ``results.json`` (and, when present, ``records.csv``) that ``evaluate.py`` writes into each evaluation
run directory, and writes into a fresh output directory (inputs are never touched):

* ``report.md``: one row per (model, method[, norm, eps]), one column per evaluation (Clean, attacks, worst case),
  accuracies in percent with one decimal, ``mean ± std`` over the runs (seeds) sharing a configuration;
* ``summary.csv``: the numbers of that table (see :func:`summary_table`);
* ``robust_vs_eps.png``: robust accuracy versus eps, only when the runs cover several eps;
* ``loss_hist.png``: per-image loss histograms of every evaluation, only when runs have ``records.csv``.

Usage::

    python -m safespot.report RUN_DIR [RUN_DIR ...] [--out DIR] [--title T]
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # object-oriented API: renders with Agg, no global pyplot state

from safespot.errors import ConfigError
from safespot.utils.tables import markdown_table

KEYS = ("model", "method", "norm", "eps")
PRETTY = {"clean": "Clean", "pgd": "PGD", "fgsm": "FGSM", "apgd": "APGD", "autoattack": "AutoAttack", "cw": "CW"}
PRETTY |= {"square": "Square", "worst_case": "Worst case"}


class ReportError(ConfigError):
    """A run directory that cannot be read, or an output directory that must not be overwritten."""


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def pretty(name: str) -> str:
    """Display name of an evaluation: ``autoattack`` -> ``AutoAttack``."""
    return PRETTY.get(name, name)


def format_eps(eps: Any) -> str:
    """``8/255`` for multiples of 1/255 below 1, else the plain number; ``–`` when unknown."""
    if not _is_number(eps):
        return "–"
    k = float(eps) * 255
    return f"{round(k)}/255" if 0 < eps < 1 and abs(k - round(k)) < 1e-3 else f"{float(eps):g}"


def canonical_eps(eps: Any) -> float | None:
    """``eps`` snapped to a multiple of 1/255 when within 1e-3/255 of one (else rounded to 1e-6), so that
    ``0.0313725`` and ``8 / 255`` group together; None when unknown."""
    if not _is_number(eps):
        return None
    k = float(eps) * 255
    return round(k) / 255 if abs(k - round(k)) < 1e-3 else round(float(eps), 6)


@dataclass
class Run:
    """One evaluation run: its flat ``results`` summary, their ``meta`` and the per-image ``records`` (or None)."""

    path: Path
    results: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    records: pd.DataFrame | None = None

    @property
    def accuracies(self) -> dict[str, float]:
        """``{evaluation: accuracy in [0, 1]}`` from the ``<evaluation>/acc`` keys of ``results``."""
        return {k[: -len("/acc")]: float(v) for k, v in self.results.items() if k.endswith("/acc") and _is_number(v)}

    @property
    def key(self) -> tuple[str, str, str | None, float | None]:
        """The configuration the run belongs to: (model, method, norm, eps), eps canonical so float noise groups."""
        eps, norm = self.meta.get("eps"), self.meta.get("norm")
        return (
            str(self.meta.get("model", "?")),
            str(self.meta.get("method", "?")),
            None if norm is None else str(norm),
            canonical_eps(eps),
        )


def load_run(path: str | Path) -> Run:
    """Read a run directory (or its ``results.json``); raise :class:`ReportError` with a one-line reason."""
    path = Path(path)
    run_dir = path.parent if path.name == "results.json" else path
    results_file = run_dir / "results.json"
    if not run_dir.is_dir():
        raise ReportError(f"run directory not found: {run_dir}")
    if not results_file.is_file():
        raise ReportError(f"no results.json in {run_dir}")
    try:
        results = json.loads(results_file.read_text())
    except (OSError, ValueError) as err:
        raise ReportError(f"cannot read {results_file}: {err}") from err
    if not isinstance(results, dict):
        raise ReportError(f"{results_file} does not hold a JSON object")
    meta = results.get("meta")
    records = None
    if (run_dir / "records.csv").is_file():
        try:
            records = pd.read_csv(run_dir / "records.csv")
        except (OSError, ValueError) as err:
            raise ReportError(f"cannot read {run_dir / 'records.csv'}: {err}") from err
    return Run(run_dir, results, dict(meta) if isinstance(meta, dict) else {}, records)


def evaluations(runs: Sequence[Run]) -> list[str]:
    """Evaluations with an accuracy in any run: ``clean`` first, then in ``meta.evaluations`` order, worst case last."""
    seen: dict[str, None] = {}
    for run in runs:
        listed = run.meta.get("evaluations")
        for name in [*(listed if isinstance(listed, list) else []), *run.accuracies]:
            if name in run.accuracies:
                seen.setdefault(name)
    return sorted(seen, key=lambda name: (name != "clean", name == "worst_case"))


def summary_table(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per (model, method, norm, eps): ``n_runs``, then per evaluation E the mean accuracy ``E`` and its
    sample standard deviation ``E_std`` (ddof=1, NaN for a single run) over the runs, both in percent."""
    names = evaluations(runs)
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.key, []).append(run)
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2] or "", math.inf if k[3] is None else k[3])):
        row: dict[str, Any] = dict(zip(KEYS, key, strict=True), n_runs=len(groups[key]))
        for name in names:
            values = [100 * run.accuracies[name] for run in groups[key] if name in run.accuracies]
            row[name] = float(np.mean(values)) if values else math.nan
            row[f"{name}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=[*KEYS, "n_runs", *(c for n in names for c in (n, f"{n}_std"))])


def paper_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The papers' format of a :func:`summary_table`, as strings: Model, Method, Norm / ε only where the rows differ in
    them, Runs where some row averages several, then ``81.0`` or ``81.0 ± 0.5`` per evaluation."""
    out = pd.DataFrame({"Model": summary["model"].astype(str), "Method": summary["method"].astype(str)})
    if summary["norm"].nunique(dropna=False) > 1:
        out["Norm"] = ["–" if pd.isna(v) else str(v) for v in summary["norm"]]
    if summary["eps"].nunique(dropna=False) > 1:
        out["ε"] = [format_eps(v) for v in summary["eps"]]
    if (summary["n_runs"] > 1).any():
        out["Runs"] = summary["n_runs"].astype(str)
    for name in [c for c in summary.columns[len(KEYS) + 1 :] if not c.endswith("_std")]:
        std = summary[f"{name}_std"] if f"{name}_std" in summary else [math.nan] * len(summary)
        out[pretty(name)] = [
            "–" if pd.isna(m) else f"{m:.1f}" if pd.isna(s) else f"{m:.1f} ± {s:.1f}"
            for m, s in zip(summary[name], std, strict=True)
        ]
    return out


def to_markdown(df: pd.DataFrame) -> str:
    """Render ``df`` as a GitHub markdown table without its index. A :func:`summary_table` is first put in the
    papers' format (:func:`paper_table`); floats are shown with one decimal, NaN as ``–``."""
    if {"model", "method", "n_runs"} <= set(df.columns):
        df = paper_table(df)
    return markdown_table(df, ".1f")


def plot_robust_vs_eps(runs: Sequence[Run], path: str | Path) -> Path | None:
    """Robust accuracy (%, mean ± std) versus eps, one line per (model, method, attack) and norm; writes nothing and
    returns None when the runs cover fewer than two eps."""
    table = summary_table(runs).dropna(subset=["eps"])
    if table["eps"].nunique() < 2:
        return None
    several_norms = table["norm"].nunique(dropna=False) > 1
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for (model, method, norm), group in table.groupby(["model", "method", "norm"], dropna=False, sort=False):
        group = group.sort_values("eps")
        for attack in [n for n in evaluations(runs) if n != "clean" and group[n].notna().any()]:
            label = f"{model} / {method} – {pretty(attack)}" + (f" ({norm})" if several_norms else "")
            yerr = group[f"{attack}_std"].fillna(0.0)
            ax.errorbar(group["eps"], group[attack], yerr=yerr, marker="o", capsize=3, label=label)
    if not ax.lines:
        return None
    ticks = sorted(table["eps"].unique())
    ax.set_xticks(ticks, [format_eps(t) for t in ticks])
    ax.set(xlabel="ε", ylabel="robust accuracy (%)", title="Robust accuracy versus ε")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


def _run_label(run: Run) -> str:
    model, method, norm, eps = run.key
    seed = run.meta.get("seed")
    details = ", ".join(s for s in (norm, f"ε={format_eps(eps)}", None if seed is None else f"seed {seed}") if s)
    return f"{model} / {method} ({details}): {run.path.name}"


def plot_loss_histograms(runs: Sequence[Run], path: str | Path) -> Path | None:
    """One panel per run with records: overlaid histograms of the per-image ``E/loss`` of each evaluation E.
    Writes nothing and returns None when no run has loss records."""
    runs = [r for r in runs if r.records is not None and any(c.endswith("/loss") for c in r.records.columns)]
    if not runs:
        return None
    fig = Figure(figsize=(7, 2.8 * len(runs)))
    for ax, run in zip(fig.subplots(len(runs), 1, squeeze=False)[:, 0], runs, strict=True):
        losses = {}
        for column in (c for c in run.records.columns if c.endswith("/loss")):
            values = pd.to_numeric(run.records[column], errors="coerce").to_numpy(dtype=float)
            losses[column[: -len("/loss")]] = values[np.isfinite(values)]
        pooled = np.concatenate(list(losses.values()))
        low, high = (pooled.min(), pooled.max()) if pooled.size else (0.0, 1.0)
        bins = np.linspace(low, high if high > low else low + 1.0, 41)
        for name, values in losses.items():
            ax.hist(
                values,
                bins=bins,
                alpha=0.5,
                label=f"{pretty(name)} (mean {values.mean():.2f})" if values.size else name,
            )
        ax.set_title(_run_label(run), fontsize="small", wrap=True)
        ax.set(xlabel="cross-entropy loss", ylabel="images")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


def runs_table(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per run: its directory, configuration, seed, image count and accuracies (%)."""
    rows = []
    for run in runs:
        model, method, norm, eps = run.key
        row = {"Run": str(run.path), "Model": model, "Method": method, "Norm": norm or "–", "ε": format_eps(eps)}
        row |= {"Seed": str(run.meta.get("seed", "–")), "Images": str(run.results.get("n_images", "–"))}
        rows.append(row | {pretty(n): 100 * run.accuracies.get(n, math.nan) for n in evaluations(runs)})
    return pd.DataFrame(rows)


PREEMPTIONS = (
    ("preempt_none", "None"),
    ("preempt_sfgsm", "S-FGSM"),
    ("preempt_spgd", "S-PGD"),
    ("preempt_sfull", "S-Full"),
)


def _pct(results: dict[str, Any], key: str) -> float:
    value = results.get(key)
    return 100 * float(value) if _is_number(value) else math.nan


def _preemption_rows(
    runs: Sequence[Run], preemptions: Sequence[tuple[str, str]], columns: dict[str, str], sigma: bool = False
) -> pd.DataFrame | None:
    """One row per run and robustifier present in its results: model, threat, preemption and
    ``columns`` ({header: key suffix}, accuracies in percent); ``None`` when no row applies."""
    rows = []
    for run in runs:
        model, method, norm, eps = run.key
        for key, label in preemptions:
            if f"{key}/acc" not in run.results:
                continue
            row: dict[str, Any] = {"Model": f"{model} / {method}"}
            if sigma:
                value = (run.meta.get("smoothing") or {}).get("sigma")
                row["σ"] = "–" if value is None else f"{float(value):g}"  # not the one-decimal float format
            else:
                row["Norm"] = norm or "–"
            row |= {"ε": format_eps(eps), "Preempt.": label}
            row |= {header: _pct(run.results, f"{key}{suffix}") for header, suffix in columns.items()}
            rows.append(row)
    return pd.DataFrame(rows) if rows else None


def preemptive_table(runs: Sequence[Run]) -> pd.DataFrame | None:
    """Paper 002's layout (Tables 1-4): Model | Preempt. | Clean | Grey PGD | Grey AA | White PGD |
    White AA, plus the safe-spot rate; one row per run and robustifier. ``None`` when no run
    has preemptive evaluations.

    White PGD / White AA are the paper's numbers (Section 4): the lowest accuracy over the
    swept budgets eps'. The "(union)" columns count an image as broken when any eps' broke it,
    a per-image choice that needs x_o, hence stricter than the paper."""
    columns = {
        "Clean": "/acc",
        "Grey PGD": "_pgd/acc",
        "Grey AA": "_autoattack/acc",
        "White PGD": "_white_pgd/acc",
        "White AA": "_white_autoattack/acc",
        "White PGD (union)": "_white_pgd_union/acc",
        "White AA (union)": "_white_autoattack_union/acc",
        "Safe-spot rate": "/safe_spot_rate",
        "Clean (8-bit)": "_8bit/acc",
        "Grey PGD (8-bit)": "_8bit_pgd/acc",
    }
    return _preemption_rows(runs, PREEMPTIONS, columns)


def safe_spot_table(runs: Sequence[Run]) -> pd.DataFrame | None:
    """Paper 000's layout (Tables 1-2): one row per model, a column per robustifier (None,
    S-FGSM, S-PGD, S-Full) holding "clean / adversarial" accuracy of the robustified images
    under grey-box PGD."""
    rows = []
    for run in runs:
        model, method, _norm, eps = run.key
        row: dict[str, Any] = {"Model": f"{model} / {method}", "ε": format_eps(eps)}
        for key, label in PREEMPTIONS:
            if f"{key}/acc" in run.results:
                row[label] = f"{_pct(run.results, f'{key}/acc'):.1f} / {_pct(run.results, f'{key}_pgd/acc'):.1f}"
        if len(row) > 2:
            rows.append(row)
    return pd.DataFrame(rows) if rows else None


SMOOTHED_PREEMPTIONS = (("preempt_smooth_none", "None"), ("preempt_smooth_sfull", "Ours"))
CERTIFIED_PREEMPTIONS = (("preempt_certify_none", "None"), ("preempt_certify_sfull", "Ours"))


def smoothed_table(runs: Sequence[Run]) -> pd.DataFrame | None:
    """Paper 002's Tables 5-6 layout for smoothed classifiers: Model | Preempt. | Clean |
    Grey PGD | Grey PGD-10 | White PGD | White PGD-10 (randomised attacks, vote-scored;
    white-box: lowest accuracy over eps', then the stricter per-image union over eps')."""
    columns = {
        "Clean": "/acc",
        "Grey PGD": "_pgd/acc",
        "Grey PGD-10": "_pgd10/acc",
        "White PGD": "_white_pgd/acc",
        "White PGD-10": "_white_pgd10/acc",
        "White PGD (union)": "_white_pgd_union/acc",
        "White PGD-10 (union)": "_white_pgd10_union/acc",
        "Safe-spot rate": "/safe_spot_rate",
    }
    return _preemption_rows(runs, SMOOTHED_PREEMPTIONS, columns, sigma=True)


def certified_preemptive_table(runs: Sequence[Run]) -> pd.DataFrame | None:
    """Paper 002's Table 7 layout: certified accuracy of the smoothed classifier at each radius,
    without (None) and with (Ours) preemptive robustification."""
    rows = []
    for run in runs:
        model, method, _norm, _eps = run.key
        for key, label in CERTIFIED_PREEMPTIONS:
            prefix = f"{key}_certify/cert_"
            radii = sorted(float(k[len(prefix) :]) for k in run.results if k.startswith(prefix))
            if not radii:
                continue
            row: dict[str, Any] = {"Model": f"{model} / {method}", "Preempt.": label}
            row |= {f"r = {r:g}": _pct(run.results, f"{prefix}{r:g}") for r in radii}
            rows.append(row)
    return pd.DataFrame(rows) if rows else None


def write_report(runs: Sequence[Run], out: str | Path, title: str = "Robustness report") -> dict[str, Path]:
    """Write ``report.md``, ``summary.csv`` and the plots that apply into the existing directory ``out``."""
    out = Path(out)
    table = summary_table(runs)
    written = {"summary": out / "summary.csv", "report": out / "report.md"}
    table.to_csv(written["summary"], index=False)
    plots = {"robust_vs_eps": plot_robust_vs_eps(runs, out / "robust_vs_eps.png")}
    plots["loss_hist"] = plot_loss_histograms(runs, out / "loss_hist.png")
    written |= {name: p for name, p in plots.items() if p is not None}
    parts = [
        f"# {title}\n",
        f"Generated {datetime.now():%Y-%m-%d %H:%M:%S} from {len(runs)} run(s).\n",
        to_markdown(table),
        "Accuracy in percent; `mean ± std` is over the runs (seeds) sharing model, method, norm and ε "
        "(sample standard deviation).\n",
    ]
    preemptive, safe_spot = preemptive_table(runs), safe_spot_table(runs)
    if preemptive is not None:
        parts += [
            "## Preemptive robustification (grey-box and white-box)\n",
            to_markdown(preemptive),
            "Clean: accuracy of the robustified images; Grey: attacks on x_r within B_eps(x_r); White: "
            "reconstruct x_o, then attack with budget eps' = f eps, counting only examples inside B_eps(x_o), "
            "and report the lowest accuracy over eps' (paper 002, Section 4); White (union): an image counts "
            "as broken if any eps' broke it (stricter than the paper: choosing eps' per image needs x_o); "
            "safe-spot rate: share of correctly classified originals whose x_r survives every grey-box "
            "attack.\n",
        ]
    if safe_spot is not None:
        parts += ["## Safe spots (clean / grey-box PGD accuracy of robustified images)\n", to_markdown(safe_spot)]
    smoothed, certified = smoothed_table(runs), certified_preemptive_table(runs)
    if smoothed is not None:
        parts += [
            "## Preemptive robustification of smoothed classifiers\n",
            to_markdown(smoothed),
            "White: lowest accuracy over eps'; White (union): broken at any eps' (stricter than the paper).\n",
        ]
    if certified is not None:
        parts += ["## Certified accuracy before and after robustification\n", to_markdown(certified)]
    parts += [f"![{name}]({p.name})\n" for name, p in plots.items() if p is not None]
    parts += ["## Runs\n", to_markdown(runs_table(runs))]
    written["report"].write_text("\n".join(parts))
    return written


def _new_out_dir(out: Path | None) -> Path:
    """Create the output directory; a default name gets a unique suffix, an explicit existing one is refused."""
    if out is None:
        base = out = Path(f"report_{datetime.now():%Y%m%d-%H%M%S}")
        for i in range(1, 1000):
            if not out.exists():
                break
            out = base.with_name(f"{base.name}_{i}")
    try:
        out.mkdir(parents=True, exist_ok=False)
    except FileExistsError as err:
        raise ReportError(f"output directory already exists, refusing to overwrite it: {out}") from err
    except OSError as err:
        raise ReportError(f"cannot create output directory {out}: {err}") from err
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns 0 on success and 2 on unreadable runs or an existing output directory."""
    parser = argparse.ArgumentParser(prog="python -m safespot.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="evaluation run directories")
    parser.add_argument("--out", type=Path, help="new output directory (default: ./report_<YYYYmmdd-HHMMSS>)")
    parser.add_argument("--title", default="Robustness report", help="title of report.md")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(p) for p in {p.resolve(): p for p in args.runs}.values()]  # each directory once
        out = _new_out_dir(args.out)
    except ReportError as err:
        print(f"report: error: {err}", file=sys.stderr)
        return 2
    write_report(runs, out, args.title)
    print(f"report: wrote {out / 'report.md'} ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
