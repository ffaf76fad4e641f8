"""Sections of the white-box reconstruction (paper 002, Section 3.7 and Figure 3; Algorithms 3-4).

The adaptive white-box attack reconstructs x_o from the robustified x_r by running the search in
reverse, then attacks the reconstruction; an output counts only inside B_eps(x_o). Its records
(:class:`safespot.evaluation.evaluations.WhiteBox`) hold the reconstruction error
(``<name>/recon_dist`` in the threat norm, ``recon_l2`` and ``recon_linf``) and, per budget eps',
the output's distance to x_o (``dist``) and whether it was misclassified but outside B_eps(x_o)
(``invalid``).

- ``white_box_reconstruction``: per model, the mean reconstruction error, the share of white-box
  outputs outside B_eps(x_o) and the share of images misclassified only outside it
  (:func:`outside_shares`).
- ``reconstruction_starts``: Figure 3, the search started at x_o against a random start on the
  same images: reconstruction errors in both norms, the shares reconstructed and left near the
  boundary of B_eps(x_o), the paper's claim with a verdict, and the histograms as a figure drawn
  next to the records.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from safespot.evaluation.records import sweep_name
from safespot.reproduce.evidence import Evidence
from safespot.reproduce.sections import context, section
from safespot.reproduce.spec import SpecError
from safespot.stats import SMALLEST_EFFECT, accuracy, paired_difference
from safespot.utils.tables import markdown_table

#: a reconstruction this close to x_o (a fraction of eps, threat norm) counts as successful; one at
#: least this far is near the boundary of the eps-ball (paper 002, Section 3.7: "about 80% of the
#: reconstructed images locate near the boundaries of eps-balls")
SUCCESS_FRACTION, BOUNDARY_FRACTION = 0.5, 0.8
NORM_NAMES = {"linf": "l_inf", "l2": "l_2"}


def _title(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """The section's title, with the placeholders of a ``text`` section filled."""
    title = spec_section.get("title")
    return [str(title).strip().format_map(context(evidence)), ""] if title else []


def column(records: pd.DataFrame, name: str, evaluation: str) -> pd.Series:
    """Field ``name`` of an evaluation's records; its absence is one clear error."""
    if name not in records:
        raise SpecError(f"evaluation {evaluation!r} has no field {name!r}: no white-box reconstruction in its records")
    return records[name]


def white_box_settings(evidence: Evidence, name: str, evaluation: str) -> tuple[float, float, float]:
    """``(eps, tolerance, largest eps' fraction)`` of robustifier ``name``'s white-box attack in
    ``evaluation`` (its composed config, kept in the records' meta)."""
    meta = evidence.meta(evaluation)
    white = (meta.get("evaluation_config", {}).get(name) or {}).get("white_box") or {}
    if not white.get("eps_fractions"):
        raise SpecError(f"evaluation {evaluation!r}: {name} ran no white-box attack")
    return float(meta["eps"]), float(white.get("tolerance", 0.0)), max(map(float, white["eps_fractions"]))


def outside_shares(
    records: pd.DataFrame, name: str, out: str, evaluation: str, settings: tuple[float, float, float]
) -> tuple[str, str]:
    """Paper 002, Section 3.7: "most of the resulting white-box attack examples generated from the
    reconstructed images lie outside B_eps(x_o)". On the images whose robustified x_r the model
    classifies correctly (``<name>/correct``: those the white-box attack has to break), each in %
    with its Wilson interval:

    - the share whose white-box output at the largest budget eps' (``<out>_f<largest>/dist``, its
      distance to x_o) lies outside B_eps(x_o), up to the attack's tolerance, misclassified or not;
    - among the images the attack misclassified at some eps' (``<out>_union``), the share it
      misclassified only outside B_eps(x_o): the attack failed there for validity alone.

    Neither reads the eps' of the white-box accuracy: when no eps' breaks an image that choice is a
    tie, settled by the smallest fraction, whose outputs stay closest to x^_o."""
    eps, tolerance, largest = settings
    kept = flag(records, f"{name}/correct", evaluation)
    outside = (column(records, f"{sweep_name(out, largest)}/dist", evaluation).to_numpy() > eps + tolerance)[kept]
    invalid = flag(records, f"{out}_union/invalid", evaluation)[kept]
    valid = ~flag(records, f"{out}_union/correct", evaluation)[kept]
    return accuracy(outside).percent(), accuracy((invalid & ~valid)[invalid | valid]).percent()


#: the columns of :func:`outside_shares`, and what they count
OUTSIDE = (
    "White-box outputs outside B_eps(x_o) at eps' = eps, % of images with x_r correct",
    "Misclassified only outside B_eps(x_o), % of images with x_r correct and a misclassified white-box output",
)
OUTSIDE_NOTE = (
    "White-box outputs: the white-box PGD outputs on the images whose robustified x_r the model classifies "
    "correctly (those the attack has to break); a misclassified output outside B_eps(x_o) does not count as "
    "adversarial. The first share is at the full budget eps' = eps, the second over every eps' of the sweep."
)


@section("white_box_reconstruction")
def white_box_reconstruction(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """Per model of ``models`` ({label: evaluation}): the mean reconstruction error of robustifier
    ``name`` (default ``preempt_sfull``) in the threat norm, the white-box ``attack``'s (default
    ``pgd``) misclassified examples outside B_eps(x_o) (:func:`outside_shares`) and its accuracy."""
    name, attack = spec_section.get("name", "preempt_sfull"), spec_section.get("attack", "pgd")
    out = f"{name}_white_{attack}"
    rows, unbroken = [], []
    for label, evaluation in spec_section["models"].items():
        records, norm = evidence.records(evaluation), str(evidence.meta(evaluation).get("norm"))
        settings = white_box_settings(evidence, name, evaluation)
        of_kept, of_misclassified = outside_shares(records, name, out, evaluation, settings)
        if changes_nothing(records, name, out, evaluation):
            unbroken.append(label)
        rows.append(
            {
                "Model": label,
                f"Mean {NORM_NAMES.get(norm, norm)} distance of x^_o to x_o": (
                    f"{column(records, f'{name}/recon_dist', evaluation).mean():.4f}"
                ),
                OUTSIDE[0]: of_kept,
                OUTSIDE[1]: of_misclassified,
                f"White {attack.upper()} accuracy": accuracy(flag(records, f"{out}/correct", evaluation)).percent(),
            }
        )
    lines = [*_title(evidence, spec_section), OUTSIDE_NOTE, "", markdown_table(pd.DataFrame(rows)), ""]
    if unbroken:  # the attack changed no image's outcome: its accuracy is x_r's clean accuracy
        lines += [
            f"{_joined(unbroken)}: the white-box {attack.upper()} outcome equals x_r's on every image (no "
            "misclassified output counts inside B_eps(x_o)), so the white-box accuracy is the clean accuracy of "
            "the robustified images and a claim about it repeats the claim about that clean accuracy.",
            "",
        ]
    return lines


def changes_nothing(records: pd.DataFrame, name: str, out: str, evaluation: str) -> bool:
    """Whether the white-box attack ``out`` left every image's outcome as robustifier ``name``'s x_r
    had it (paper 002, Section 4.1: at l_inf its white-box accuracy is the clean accuracy)."""
    return bool((flag(records, f"{out}/correct", evaluation) == flag(records, f"{name}/correct", evaluation)).all())


def _joined(labels: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def flag(records: pd.DataFrame, name: str, evaluation: str) -> np.ndarray:
    """Field ``name`` as per-image booleans."""
    return column(records, name, evaluation).to_numpy().astype(bool)


def _starts(evidence: Evidence, spec_section: dict[str, Any]) -> dict[str, str]:
    starts = dict(spec_section["starts"])
    if set(starts) != {"original", "random"}:
        raise SpecError(f"{evidence.spec.name}: reconstruction_starts needs starts original and random, got {starts}")
    index = [evidence.records(e).index for e in starts.values()]
    if not index[0].equals(index[1]):
        raise SpecError(f"{evidence.spec.name}: {list(starts.values())} are not on the same images")
    return starts


def start_row(
    records: pd.DataFrame, name: str, evaluation: str, settings: tuple[float, float, float]
) -> tuple[dict[str, str], dict]:
    """One search start's row of the Figure 3 table, and its per-image success and boundary flags
    (``settings``: :func:`white_box_settings`)."""
    eps = settings[0]
    error = column(records, f"{name}/recon_dist", evaluation)
    linf, l2 = column(records, f"{name}/recon_linf", evaluation), column(records, f"{name}/recon_l2", evaluation)
    success, near = (error <= SUCCESS_FRACTION * eps).to_numpy(), (error >= BOUNDARY_FRACTION * eps).to_numpy()
    of_kept, of_misclassified = outside_shares(records, name, f"{name}_white_pgd", evaluation, settings)
    linf = linf * 255  # in units of 1/255
    row = {
        "l_inf error, median / 90th percentile (x 1/255)": f"{linf.median():.2f} / {linf.quantile(0.9):.2f}",
        "l_2 error, median / 90th percentile": f"{l2.median():.3f} / {l2.quantile(0.9):.3f}",
        f"Reconstructed (error <= {SUCCESS_FRACTION:g} eps), % of images": accuracy(success).percent(),
        f"Near the boundary (error >= {BOUNDARY_FRACTION:g} eps), % of images": accuracy(near).percent(),
        OUTSIDE[0]: of_kept,
        OUTSIDE[1]: of_misclassified,
        "Grey PGD": accuracy(flag(records, f"{name}_pgd/correct", evaluation)).percent(),
        "White PGD": accuracy(flag(records, f"{name}_white_pgd/correct", evaluation)).percent(),
    }
    return row, {"success": success, "near": near, "error": error.to_numpy()}


def figure3_verdict(success_o: np.ndarray, success_r: np.ndarray, near_r: np.ndarray) -> str:
    """Paper 002, Section 3.7: reconstruction succeeds from x_o and fails from a random start. Holds
    when the paired difference of the reconstructed shares (x_o minus random start) lies above 0,
    more than half the images are reconstructed from x_o and more than half end near the boundary
    from a random start (interval lower bounds); does not hold when at most half are reconstructed
    from x_o, more than half from a random start, or the difference excludes every gain of
    :data:`SMALLEST_EFFECT`; else inconclusive."""
    diff = paired_difference(success_o, success_r)
    rate_o, rate_r, near = accuracy(success_o), accuracy(success_r), accuracy(near_r)
    if diff.low > 0 and rate_o.low > 0.5 and near.low > 0.5:
        return "holds"
    if rate_o.high < 0.5 or rate_r.low > 0.5 or diff.high < SMALLEST_EFFECT:
        return "does not hold"
    return "inconclusive at this scale"


@section("reconstruction_starts")
def reconstruction_starts(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """Figure 3 of paper 002 from two evaluations on the same images, ``starts: {original: <eval>,
    random: <eval>}`` (the search of robustifier ``name``, default ``preempt_sfull``, started at x_o
    and at a uniform point of B_delta(x_o)); ``figure``: the file name of the histograms, drawn next
    to the records and linked relative to the report."""
    starts, name = _starts(evidence, spec_section), spec_section.get("name", "preempt_sfull")
    labels = {"original": "x_o", "random": "random in B_delta(x_o)"}
    rows, per_image = [], {}
    for start, evaluation in starts.items():
        settings = white_box_settings(evidence, name, evaluation)
        row, per_image[start] = start_row(evidence.records(evaluation), name, evaluation, settings)
        rows.append({"Search start": labels[start], **row})
    closer = per_image["original"]["error"] < per_image["random"]["error"]
    diff = paired_difference(per_image["original"]["success"], per_image["random"]["success"])
    word = figure3_verdict(
        per_image["original"]["success"], per_image["random"]["success"], per_image["random"]["near"]
    )
    lines = [
        *_title(evidence, spec_section),
        f"Percentages with 95% Wilson intervals. {OUTSIDE_NOTE}",
        "",
        markdown_table(pd.DataFrame(rows)),
        f"Images reconstructed closer to x_o from x_o than from a random start (% of images): "
        f"{accuracy(closer).percent()}.",
        f"Reconstructed share, start at x_o minus random start (same images): {diff.percent()}.",
        "",
        f"Claim (paper 002, Section 3.7): reconstruction succeeds from x_o and fails from a random start: **{word}**.",
        "",
    ]
    if spec_section.get("figure"):
        link = draw_histograms(evidence, {labels[s]: evidence.records(e) for s, e in starts.items()}, spec_section)
        lines += [f"![reconstruction errors from both starts]({link})", ""]
    return lines


def figure_link(evidence: Evidence, path: Path) -> str:
    """``path`` relative to the report rendered from ``evidence``: the spec's report for its kept
    records, else ``report.md`` in the records' root (as the engine's run writes it)."""
    spec, root = evidence.spec, evidence.root.resolve()
    kept = spec.records is not None and spec.report is not None and root == spec.records.resolve()
    base = spec.report.parent if kept else root
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def draw_histograms(evidence: Evidence, records: dict[str, pd.DataFrame], spec_section: dict[str, Any]) -> str:
    """The reconstruction errors of both starts in l_inf and l_2 as histograms, written to
    ``figure`` in the records' root (only when its bytes change); returns its link."""
    name = spec_section.get("name", "preempt_sfull")
    fig = Figure(figsize=(9, 3.2))
    for ax, (norm, scale, unit) in zip(
        fig.subplots(1, 2), (("linf", 255.0, " (x 1/255)"), ("l2", 1.0, "")), strict=True
    ):
        for label, frame in records.items():
            ax.hist(frame[f"{name}/recon_{norm}"] * scale, bins=30, alpha=0.6, label=f"start: {label}")
        ax.set(xlabel=f"||x^_o - x_o||, {NORM_NAMES[norm]}{unit}", ylabel="images")
        ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, metadata={"Software": None})
    path = evidence.root / str(spec_section["figure"])
    if not path.is_file() or path.read_bytes() != buffer.getvalue():
        path.write_bytes(buffer.getvalue())
    return figure_link(evidence, path)
