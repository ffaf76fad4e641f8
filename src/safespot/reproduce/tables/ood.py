"""Sections of OOD-detection reproductions (paper 000, Table 4), rendered from the ``ood.py`` runs
of a spec (one per training seed: ``results.json``, ``scores.csv``) and its training logs:

- ``ood_setup``: the seeds and the images scored per seed;
- ``ood_search``: the safe-spot score's search (start, schedule) as each ``ood.py`` run stored it;
- ``ood_models``: each model's validation accuracy at the epoch of the checkpoint ``ood.py`` used
  (a detector's model, or the run another run was fine-tuned from);
- ``training_curves``: validation metrics per epoch (table, and a figure drawn next to the records);
- ``ood_table4``: paper 000's Table 4 layout, mean ± std over seeds (:mod:`safespot.ood.report`);
- ``ood_per_seed``, ``ood_tuned``: one detector's metric per seed, the tuned settings per seed;
- ``ood_claims``: the paper's claims, "detector a has the higher AUROC than b on these outliers",
  as the mean over seeds of the AUROC difference paired on each seed's images, with the t interval
  over seeds (:func:`safespot.stats.auroc_difference_over_seeds`) and a verdict in the direction
  the paper claims; ``ood_differences``: the same differences without a claim, for information.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from safespot.ood.report import IN_DISTRIBUTION, LABELS, aggregate, table4, to_markdown
from safespot.reproduce.claims import claim_verdict, size_verdict
from safespot.reproduce.evidence import Evidence
from safespot.reproduce.sections import MISSING, section
from safespot.reproduce.spec import SpecError, checkpoint_refs
from safespot.stats import SeedInterval, auroc_difference_over_seeds
from safespot.utils.tables import markdown_table

#: the epoch in a checkpoint name written by the ``best-epoch{epoch:03d}`` callback
BEST_EPOCH = re.compile(r"best-epoch(\d+)")
CURVE_METRICS = ("val/acc", "val/auroc")
FIGURE = "training_curves.png"


# --- what the ood.py runs used ----------------------------------------------------------------
def ood_evaluations(evidence: Evidence) -> list[str]:
    """The spec's ``ood.py`` evaluations (one per training seed), in the spec's order."""
    keys = [key for key, e in evidence.spec.evaluations.items() if e.command == "ood"]
    if not keys:
        raise SpecError(f"{evidence.spec.name}: an OOD section needs an evaluation with command: ood")
    return keys


def seed_of(evidence: Evidence, key: str) -> int:
    """The seed an ``ood.py`` run stored in its ``results.json``."""
    return int(evidence.results(key)["seed"])


def detector_run(evidence: Evidence, key: str, detector: str) -> str:
    """The training run whose checkpoint ``detector`` used in evaluation ``key``: the run its
    ``detector.<detector>.ckpt_path={checkpoint:<run>/...}`` override names, else the evaluation's."""
    evaluation = evidence.spec.evaluations[key]
    prefix = f"detector.{detector}.ckpt_path="
    for override in evaluation.overrides:
        if override.startswith(prefix) and (refs := checkpoint_refs([override])):
            return refs[0][0]
    if evaluation.run is None:
        raise SpecError(f"{evidence.spec.name}: evaluation {key!r} names no run for detector {detector!r}")
    return evaluation.run


def recorded_checkpoint(evidence: Evidence, key: str, detector: str) -> str:
    """The checkpoint path ``detector`` used, as the ``ood.py`` run recorded it."""
    results = evidence.results(key)
    named = (results.get("detector_checkpoints") or {}).get(detector) or {}
    return str(named.get("ckpt_path") or results["ckpt_path"])


def started_from(evidence: Evidence, run: str, option: str) -> tuple[str, str]:
    """The run that training run ``run`` started from through ``option`` (e.g. ``init_from``) and
    the checkpoint path it stored for it."""
    refs = [r for o in evidence.spec.runs[run].overrides if o.startswith(f"{option}=") for r in checkpoint_refs([o])]
    stored = [o.split("=", 1)[1] for o in evidence.overrides("train", run) or () if o.startswith(f"{option}=")]
    if not refs or not stored:
        raise SpecError(f"{evidence.spec.name}: run {run!r} has no recorded {option}={{checkpoint:...}}")
    return refs[0][0], stored[-1]


@dataclass(frozen=True)
class ModelRun:
    """One model of one seed: its training run and the checkpoint (path) the evaluation used."""

    model: str
    seed: int
    run: str
    checkpoint: str


def model_runs(evidence: Evidence, models: list[dict[str, Any]]) -> list[ModelRun]:
    """Every model of the section (``{model, detector[, via]}``: the run ``detector`` used, or with
    ``via: init_from`` the run that run started from) for every seed, model by model."""
    found = []
    for entry in models:
        for key in ood_evaluations(evidence):
            run = detector_run(evidence, key, entry["detector"])
            if entry.get("via"):
                run, checkpoint = started_from(evidence, run, entry["via"])
            else:
                checkpoint = recorded_checkpoint(evidence, key, entry["detector"])
            found.append(ModelRun(str(entry["model"]), seed_of(evidence, key), run, checkpoint))
    return found


def checkpoint_epoch(checkpoint: str, metrics: pd.DataFrame) -> int:
    """The (0-based) epoch of a checkpoint: ``best-epochNNN`` names it, ``last.ckpt`` is the last
    epoch of the run's log."""
    name = Path(checkpoint).name
    if m := BEST_EPOCH.search(name):
        return int(m[1])
    if name == "last.ckpt":
        return last_epoch(metrics)
    raise SpecError(f"cannot tell the epoch of checkpoint {checkpoint!r} (best-epochNNN.ckpt or last.ckpt)")


def last_epoch(metrics: pd.DataFrame) -> int:
    """The last epoch a run trained: the last with a ``train/`` or ``val/`` metric (the test after
    training logs the epoch after it)."""
    logged = [c for c in metrics.columns if c.startswith(("train/", "val/"))]
    rows = metrics[metrics[logged].notna().any(axis=1)] if logged else metrics
    return int(rows["epoch"].max())


def metric_at(metrics: pd.DataFrame, metric: str, epoch: int) -> float:
    """The last logged ``metric`` of ``epoch`` (NaN when not logged)."""
    if metric not in metrics:
        return float("nan")
    rows = metrics.dropna(subset=[metric])
    rows = rows[rows["epoch"] == epoch]
    return float(rows[metric].iloc[-1]) if len(rows) else float("nan")


def _title(spec_section: dict[str, Any]) -> list[str]:
    lines = [str(spec_section["title"]).strip(), ""] if spec_section.get("title") else []
    if spec_section.get("text"):
        lines += [str(spec_section["text"]).strip(), ""]
    return lines


def _pct(value: float) -> float:
    """A fraction in percent (rounded, not truncated, when the table is written)."""
    return 100 * value


# --- sections ----------------------------------------------------------------------------------
@section("ood_setup")
def setup_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """The seeds and, per seed, the images scored (``n_images`` of each ``results.json``)."""
    keys = ood_evaluations(evidence)
    counts = {key: evidence.results(key)["n_images"] for key in keys}
    seeds = ", ".join(str(seed_of(evidence, key)) for key in keys)
    described = {_counts(c) for c in counts.values()}
    if len(described) == 1:
        images = f"per seed, {described.pop()}"
    else:
        images = "; ".join(f"seed {seed_of(evidence, k)}: {_counts(c)}" for k, c in counts.items())
    return [f"Training seeds {seeds}; {images}.", ""]


#: the search's start point, as a report names it (paper 000, Algorithm 1: x_s = x_o; paper 002,
#: Section 3.7: a uniform point of B_delta(x_o))
STARTS = {
    "original": "started at x_o (paper 000, Algorithm 1)",
    "random": "started at a uniform random point of B_delta(x_o) (paper 002's start, not paper 000's)",
}


def search_description(robustifier: dict[str, Any]) -> str:
    """The safe-spot search of a stored robustifier config in words: start, MAXITER, T, N, the
    iterate returned, early exit (the defaults of :class:`safespot.defenses.SafeSpotSearch` where
    the config leaves a setting out)."""
    start = str(robustifier.get("init", "random"))
    early = robustifier.get("early_exit")
    parts = [
        STARTS.get(start, f"started by init={start}"),
        f"MAXITER {robustifier.get('max_iter', 100)}, T {robustifier.get('inner_steps', 20)}, "
        f"N {robustifier.get('restarts', 1)}",
        f"the {robustifier.get('output', 'last')} iterate",
        "no early exit" if early is None else f"early exit after {early} iterations without a successful inner attack",
    ]
    return ", ".join(parts)


@section("ood_search")
def search_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """The safe-spot score's search as each ``ood.py`` run stored it
    (``detector_config.safe_spot.robustifier`` of its ``results.json``): one sentence for the seeds
    that share a setting, so the report states the start and schedule its records were made with."""
    described: dict[str, list[str]] = {}
    for key in ood_evaluations(evidence):
        stored = ((evidence.results(key).get("detector_config") or {}).get("safe_spot") or {}).get("robustifier")
        text = "not in the records" if stored is None else search_description(stored)
        described.setdefault(text, []).append(str(seed_of(evidence, key)))
    parts = [f"seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}: {text}" for text, seeds in described.items()]
    return [f"The safe-spot score's search, as the runs stored it: {'; '.join(parts)}.", ""]


def _counts(n_images: dict[str, int]) -> str:
    sets = {k: v for k, v in n_images.items() if k != IN_DISTRIBUTION}
    per_set = set(sets.values())
    outliers = (
        f"{per_set.pop():,} images per outlier set ({', '.join(sets)})"
        if len(per_set) == 1
        else ", ".join(f"{v:,} {k}" for k, v in sets.items())
    )
    return f"{n_images.get(IN_DISTRIBUTION, 0):,} in-distribution test images and {outliers}"


@section("ood_models")
def models_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """``val/acc`` of every model at the epoch of the checkpoint the evaluation used."""
    rows = []
    for found in model_runs(evidence, list(spec_section["models"])):
        metrics = evidence.training_metrics(found.run)
        epoch = checkpoint_epoch(found.checkpoint, metrics)
        rows.append(
            {
                "Model": found.model,
                "Seed": found.seed,
                "Checkpoint used (epoch)": f"{Path(found.checkpoint).name} ({epoch + 1})",
                spec_section.get("column", "val/acc (%)"): _pct(metric_at(metrics, "val/acc", epoch)),
            }
        )
    return [*_title(spec_section), markdown_table(pd.DataFrame(rows), fmt=".1f"), ""]


def training_curves(evidence: Evidence, runs: list[ModelRun]) -> pd.DataFrame:
    """Per model and seed, the last logged value of each of :data:`CURVE_METRICS` in every epoch:
    columns model, seed, run, metric, epoch, value."""
    rows = []
    for found in runs:
        metrics = evidence.training_metrics(found.run)
        for metric in CURVE_METRICS:
            if metric in metrics:
                per_epoch = metrics.dropna(subset=[metric]).groupby("epoch")[metric].last()
                rows += [
                    {**asdict(found), "metric": metric, "epoch": int(e), "value": float(v)}
                    for e, v in per_epoch.items()
                ]
    return pd.DataFrame(rows, columns=["model", "seed", "run", "checkpoint", "metric", "epoch", "value"])


def epoch_offsets(evidence: Evidence, curves: pd.DataFrame) -> dict[str, int]:
    """Per run, the epochs before it: a run fine-tuned (``init_from``) from another drawn run
    continues that run's curve."""
    epochs = curves.groupby("run")["epoch"].max().to_dict()
    offsets = {}
    for run in epochs:
        refs = [
            r for o in evidence.spec.runs[run].overrides if o.startswith("init_from=") for r in checkpoint_refs([o])
        ]
        offsets[run] = int(epochs[refs[0][0]]) + 1 if refs and refs[0][0] in epochs else 0
    return offsets


def plot_curves(curves: pd.DataFrame, offsets: dict[str, int], path: Path) -> Path:
    """``val/acc`` and ``val/auroc`` against epoch, one colour per model, one line per seed; a
    fine-tuned run drawn after the run it starts from."""
    from matplotlib.figure import Figure  # object-oriented API: renders with Agg, no global pyplot state

    fig = Figure(figsize=(10, 3.4))
    axes = fig.subplots(1, 2)
    models = list(dict.fromkeys(curves["model"]))
    colours = dict(
        zip(models, ("tab:grey", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"), strict=False)
    )
    for ax, metric in zip(axes, CURVE_METRICS, strict=True):
        part = curves[curves["metric"] == metric]
        for (model, seed, run), line in part.groupby(["model", "seed", "run"], sort=False):
            first = seed == part.loc[part["model"] == model, "seed"].min()
            ax.plot(line["epoch"] + offsets[run] + 1, 100 * line["value"], marker="o", color=colours.get(model),
                    label=model if first else None)  # fmt: skip
        fine_tuned = any(offsets.values())
        ax.set_xlabel("epoch" + (" (a fine-tune continues the run it starts from)" if fine_tuned else ""))
        ax.set_ylabel(f"{metric} (%)")
        if len(part):
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def figure_link(evidence: Evidence, name: str) -> str:
    """``name`` in the records root as a report links it: relative to the spec's kept report when
    these are the kept records, else to a report in the root itself (``run``'s ``report.md``)."""
    spec = evidence.spec
    if spec.report is not None and spec.records is not None and evidence.root.resolve() == spec.records.resolve():
        return Path(os.path.relpath(evidence.root / name, spec.report.parent)).as_posix()
    return name


@section("training_curves")
def curves_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """Validation metrics per epoch of every model (percent) and their figure, drawn into the
    records root when it is not there yet."""
    curves = training_curves(evidence, model_runs(evidence, list(spec_section["models"])))
    if not len(curves):
        return []
    table = curves.assign(value=100 * curves["value"]).pivot_table(
        index=["model", "seed", "metric"], columns="epoch", values="value", sort=False
    )
    table.columns = [f"epoch {c + 1}" for c in table.columns]
    table = table.reset_index().rename(columns={"model": "Model", "seed": "Seed", "metric": "Metric"})
    figure = evidence.root / FIGURE
    if not figure.is_file():
        plot_curves(curves, epoch_offsets(evidence, curves), figure)
    alt = spec_section.get("alt", "validation accuracy and AUROC per epoch")
    return [*_title(spec_section), markdown_table(table, fmt=".1f"), f"![{alt}]({figure_link(evidence, FIGURE)})", ""]


@section("ood_table4")
def table4_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """Paper 000's Table 4 layout over the ``ood.py`` runs: mean ± sample std over seeds of each
    metric (``metrics``: a subset of fpr95, auroc, aupr), detector and outlier set."""
    summary = aggregate([evidence.eval_dir(key) for key in ood_evaluations(evidence)])
    table = table4(summary, int(spec_section.get("digits", 2)))
    wanted = tuple(spec_section.get("metrics") or LABELS)
    keep = [c for c in table.columns if c == "D_out^test" or any(c.startswith(LABELS[m] + " ") for m in wanted)]
    return [*_title(spec_section), to_markdown(table[keep]), ""]


@section("ood_per_seed")
def per_seed_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """One detector's ``metric`` (percent) on every outlier set, one row per seed."""
    detector, metric = spec_section["detector"], spec_section.get("metric", "auroc")
    rows = []
    for key in ood_evaluations(evidence):
        per_set = evidence.results(key)["metrics"][detector]
        rows.append({"Seed": seed_of(evidence, key)} | {name: per_set[name][metric] for name in per_set})
    return [*_title(spec_section), markdown_table(pd.DataFrame(rows), fmt=".2f"), ""]


@section("ood_tuned")
def tuned_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """The settings each detector's tuning chose (``settings: {detector: [names]}``) and its
    tuning AUROC, one row per seed."""
    rows = []
    for key in ood_evaluations(evidence):
        tuned = evidence.results(key)["tuned"]
        row: dict[str, Any] = {"Seed": seed_of(evidence, key)}
        for detector, names in spec_section["settings"].items():
            for name in names:
                row[f"{detector} {name}"] = _setting(tuned[detector].get(name))
            row[f"{detector} tuning AUROC (%)"] = _pct(float(tuned[detector]["tune"]["auroc"]))
        rows.append(row)
    return [*_title(spec_section), markdown_table(pd.DataFrame(rows), fmt=".1f"), ""]


def _setting(value: Any) -> str:
    """A tuned setting: a number as it is (``0.01``), a list of weights with three decimals."""
    if isinstance(value, list):
        return ", ".join(f"{float(v):+.3f}" for v in value)
    return MISSING if value is None else f"{value:g}" if isinstance(value, int | float) else str(value)


# --- claims --------------------------------------------------------------------------------------
def auroc_groups(evidence: Evidence, outliers: str, a: str, b: str) -> list[tuple[np.ndarray, ...]]:
    """Per seed, ``(scores of a, scores of b, outlier flags)`` on that seed's in-distribution test
    images and the ``outliers`` set (the same images for both detectors)."""
    groups = []
    for key in ood_evaluations(evidence):
        scores = evidence.table(key, "scores.csv")
        part = scores[scores["set"].isin([IN_DISTRIBUTION, outliers])]
        missing = [d for d in (a, b) if d not in part] + ([outliers] if outliers not in set(part["set"]) else [])
        if missing:
            raise SpecError(f"{evidence.spec.name}: evaluation {key!r} has no scores for {missing}")
        flags = part["outlier"].astype(str).str.lower().eq("true").to_numpy()
        groups.append((part[a].to_numpy(dtype=float), part[b].to_numpy(dtype=float), flags))
    return groups


def _per_seed(interval: SeedInterval) -> str:
    return ", ".join(f"{100 * v:+.2f}" for v in interval.per_seed)


INTERVAL = "AUROC difference, pp [95% t interval over seeds]"


@section("ood_claims")
def claims_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """Each claim ``{text, outliers, a, b[, kind, margin, paper]}``, "a has the higher AUROC than b
    on these outliers" (the direction the paper claims), with its verdict and, with ``paper``
    (percentage points), its size against the paper's; ``overall`` states the claims together
    (holds when every one holds, does not hold when one does not)."""
    rows, words = [], []
    for claim in spec_section["claims"]:
        interval = auroc_difference_over_seeds(auroc_groups(evidence, claim["outliers"], claim["a"], claim["b"]))
        word = claim_verdict(
            interval,  # type: ignore[arg-type]  (low, high, n as a paired difference)
            str(claim.get("kind", "superiority")),
            float(claim.get("margin", 0.0)),
            evidence.spec.smallest_effect,
        )
        paper = None if claim.get("paper") is None else float(claim["paper"])
        words.append(word)
        rows.append(
            {
                "Claim (paper 000)": claim["text"],
                "Outliers": claim["outliers"],
                INTERVAL: interval.percent(2),
                "Per seed (pp)": _per_seed(interval),
                "Verdict": word,
                "Paper (pp)": MISSING if paper is None else f"{paper:+.2f}",
                "Size vs paper": size_verdict(interval, paper),  # type: ignore[arg-type]
            }
        )
    lines = [*_title(spec_section), markdown_table(pd.DataFrame(rows)), ""]
    if spec_section.get("overall"):
        lines += [f"{str(spec_section['overall']).strip()}: **{overall(words)}**.", ""]
    return lines


def overall(words: list[str]) -> str:
    """The verdict on claims made together: every one must hold."""
    if words and all(w == "holds" for w in words):
        return "holds"
    return "does not hold" if "does not hold" in words else "inconclusive at this scale"


@section("ood_differences")
def differences_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """``a`` minus each detector of ``rows`` (``{outlier set: [detectors]}``), AUROC, with the same
    interval as the claims and no verdict (comparisons the paper makes no claim about)."""
    a = spec_section["a"]
    rows = []
    for outliers, detectors in spec_section["rows"].items():
        for b in detectors:
            interval = auroc_difference_over_seeds(auroc_groups(evidence, outliers, a, b))
            rows.append(
                {
                    "Outliers": outliers,
                    f"{a} minus": b,
                    INTERVAL: interval.percent(2),
                    "Per seed (pp)": _per_seed(interval),
                }
            )
    return [*_title(spec_section), markdown_table(pd.DataFrame(rows)), ""]
