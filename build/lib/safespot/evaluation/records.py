"""Per-image records: merging shards from several processes, summarising, saving."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch


def to_frame(parts: Sequence[dict[str, torch.Tensor]]) -> pd.DataFrame:
    """Concatenate per-batch field dicts into one table (rows in any order)."""
    if not parts:
        return pd.DataFrame()
    columns = {k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]}
    return pd.DataFrame(columns)


def merge_shards(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Merge the records of all processes in dataset-index order, refusing duplicates (a
    padded distributed sampler would evaluate some images twice)."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame()
    records = pd.concat(frames, ignore_index=True).sort_values("index", kind="stable").reset_index(drop=True)
    duplicated = records["index"].duplicated()
    if duplicated.any():
        raise RuntimeError(f"{int(duplicated.sum())} images were evaluated more than once")
    return records


SWEEP_SEPARATOR = "_f"


def sweep_name(name: str, fraction: float) -> str:
    """The name of evaluation ``name`` run at budget ``fraction * eps`` in a budget sweep:
    ``<name>_f<fraction>`` (``pgd_f0.25``, ``pgd_f1``). The suffix ``_f<number>`` is reserved
    for sweeps (see :func:`resolve_budget_sweeps`)."""
    return f"{name}{SWEEP_SEPARATOR}{float(fraction):g}"


def budget_sweeps(names: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{N: {member: fraction}}`` for every name ``N`` of ``names`` such that ``names`` also
    holds members ``sweep_name(N, f)``, in ``names`` order."""
    present = set(names)
    sweeps: dict[str, dict[str, float]] = {}
    for member in names:
        base, sep, tail = member.rpartition(SWEEP_SEPARATOR)
        if not sep or base not in present:
            continue
        try:
            fraction = float(tail)
        except ValueError:
            continue
        if sweep_name(base, fraction) == member:
            sweeps.setdefault(base, {})[member] = fraction
    return sweeps


def resolve_budget_sweeps(records: pd.DataFrame, names: Sequence[str]) -> dict[str, float]:
    """The paper's reduction of a budget sweep (paper 002, Section 4: "we sweep the final
    perturbation budget eps' and report the lowest accuracy measured").

    For every sweep ``N`` (see :func:`budget_sweeps`) the member with the lowest accuracy,
    ``f* = argmin_f mean(N_f/correct)`` (the smallest fraction on ties), is a choice made on
    the whole dataset, so it is made here, after all shards are merged: its per-image fields
    ``N_f*/<field>`` are copied into ``N/<field>`` **in place** (new columns of ``records``).
    Hence ``mean(N/correct) = min_f acc(N_f)``: the paper's number, not a per-image union over
    eps'. Returns ``{N: f*}``."""
    chosen: dict[str, float] = {}
    for name, members in budget_sweeps(names).items():
        if not all(f"{m}/correct" in records for m in members):
            continue
        accuracy = {m: float(records[f"{m}/correct"].mean()) for m in members}
        best = min(members, key=lambda m: (accuracy[m], members[m]))
        prefix = f"{best}/"
        columns = [c for c in records.columns if c.startswith(prefix)]
        with warnings.catch_warnings():  # many columns added in place: pandas warns of fragmentation
            warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
            records[[f"{name}/{column[len(prefix) :]}" for column in columns]] = records[columns].to_numpy()
        chosen[name] = members[best]
    return chosen


#: per-image fields whose mean goes into the summary as ``<field>_mean``
MEAN_FIELDS = ("/recon_dist", "/recon_l2", "/recon_linf", "/iterations", "/worst_loss", "/radius", "/queries")


def summarize(
    records: pd.DataFrame, names: Sequence[str], groups: dict[str, list[str]] | None = None
) -> dict[str, float]:
    """Accuracy per evaluation, ``worst_case/acc`` (correct under every evaluation), mean /
    max distances of the evaluated points and, for each grey-box group (robustified images
    and the attacks run on them), ``<name>/safe_spot_rate``: the share of correctly
    classified originals whose robustified image stays correct under every attack (a group
    without attacks has none). For a
    certify evaluation, ``<name>/cert_<r>`` is the certified accuracy at l_2 radius r
    (Cohen et al., 2019) and ``<name>/radius_mean`` the mean certified radius.

    Budget sweeps (the white-box eps' sweep of paper 002, Section 4) are first reduced by
    :func:`resolve_budget_sweeps`, which adds the ``<N>/...`` columns to ``records``; then
    ``<N>/acc`` is the lowest accuracy over the sweep and ``<N>/fraction`` the fraction of
    eps achieving it."""
    chosen = resolve_budget_sweeps(records, names)
    summary: dict[str, float] = {"n_images": len(records)}
    correct = [f"{n}/correct" for n in names]
    for name in names:
        summary[f"{name}/acc"] = float(records[f"{name}/correct"].mean())
        if name != "clean" and f"{name}/dist" in records:
            summary[f"{name}/mean_dist"] = float(records[f"{name}/dist"].mean())
            summary[f"{name}/max_dist"] = float(records[f"{name}/dist"].max())
    summary.update({f"{name}/fraction": fraction for name, fraction in chosen.items()})
    summary["worst_case/acc"] = float(records[correct].all(axis=1).mean())
    for column in records.columns:  # rates and means of the other per-image fields
        if column.endswith(("/invalid", "/early_exit")):
            summary[f"{column}_rate"] = float(records[column].mean())
        elif column.endswith(MEAN_FIELDS):
            summary[f"{column}_mean"] = float(records[column].mean())
        elif "/cert_" in column:  # certified accuracy at a radius (randomised smoothing)
            summary[column] = float(records[column].mean())
    clean_ok = records["clean/correct"].astype(bool) if "clean/correct" in records else None
    for name, attacks in (groups or {}).items():
        if not attacks:  # nothing attacked these images (e.g. a certify-only group): no safe-spot rate
            continue
        survives = records[[f"{n}/correct" for n in (name, *attacks)]].all(axis=1)
        if clean_ok is not None and clean_ok.any():
            summary[f"{name}/safe_spot_rate"] = float(survives[clean_ok].mean())
    return summary


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_results(out: Path, records: pd.DataFrame, summary: dict[str, Any], meta: dict[str, Any]) -> None:
    """``records.csv`` (one row per image) and ``results.json`` (summary + meta), written
    to temporary names first and renamed, so a crash never leaves half a file."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "records.csv.tmp"
    records.to_csv(tmp, index=False)
    tmp.replace(out / "records.csv")
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({**{k: _plain(v) for k, v in summary.items()}, "meta": meta}, indent=2))
    tmp.replace(out / "results.json")


def _without_sweep_choices(records: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """``records`` without the ``<N>/...`` columns :func:`resolve_budget_sweeps` copied from the
    member it chose: a choice made on one piece's images, not the whole run's."""
    derived = [c for base in budget_sweeps(names) for c in records.columns if c.startswith(f"{base}/")]
    return records.drop(columns=derived)


def groups_of(meta: dict[str, Any]) -> dict[str, list[str]]:
    """The grey-box groups (robustified images and the attacks run on them) of an evaluation run,
    as its ``results.json`` meta names them, or as its evaluation config implies them (runs that
    stored no ``groups``: each preemptive evaluation with its attacks)."""
    if "groups" in meta:
        return {k: list(v) for k, v in meta["groups"].items()}
    groups: dict[str, list[str]] = {}
    for name, config in (meta.get("evaluation_config") or {}).items():
        if "robustifier" in config and config.get("attacks"):
            groups[name] = [f"{name}_{attack}" for attack in config["attacks"]]
    return groups


def join_pieces(
    pieces: Sequence[pd.DataFrame], names: Sequence[str], groups: dict[str, list[str]] | None = None
) -> tuple[pd.DataFrame, dict[str, float]]:
    """One evaluation run over all images from the records of its pieces (``data.test_part``
    jobs, each over a contiguous part of the test split): the records concatenated in index order,
    every choice made over the images re-made over all of them (the white-box budget of lowest
    accuracy, :func:`resolve_budget_sweeps`: one minimum for the whole run, not a minimum of the
    pieces' minimums), and the summary computed as one run computes it (:func:`summarize`).
    Images are seeded by their index, so the joined records are the one run's; an image in two
    pieces, or pieces with different fields, is refused."""
    frames = [_without_sweep_choices(piece, names) for piece in pieces if len(piece)]
    if not frames:
        raise ValueError("no records to join")
    if any(set(frame.columns) != set(frames[0].columns) for frame in frames):
        raise ValueError("the pieces hold different fields: not pieces of one evaluation")
    records = pd.concat(frames, ignore_index=True).sort_values("index", kind="stable").reset_index(drop=True)
    shared = records["index"][records["index"].duplicated()]
    if len(shared):
        raise ValueError(f"the pieces share images: {sorted(shared)[:5]}")
    summary = summarize(records, names, groups)
    return records, summary
