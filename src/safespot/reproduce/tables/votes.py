"""Sections of smoothed-inference reproductions (paper 003): accuracy against the number of
samples of the vote, the vote rules side by side, gains compared between models, and the learned
noise of noise-injected models.

The evaluations ran ``evaluation=[votes,votes_pgd]`` (:class:`safespot.evaluation.VoteSweep`):
per image, ``<sweep>_<rule>_n<n>/correct`` for every vote rule and number of draws, ``votes`` on
the clean images and ``votes_pgd`` on the PGD examples. ``models: {EVALUATION: label}`` names
the rows of a section.

- ``vote_sweep``: accuracy (Wilson interval) of ``rule`` (default ``majority``, paper 003's
  prediction smoothing) for every ``n`` the evaluations swept.
- ``vote_rules``: every rule at the largest ``n``.
- ``gain_claims``: claims that one model's gain (``a: [field at n, field at n']``) exceeds
  another's (``b``): the mean of the per-image difference of the two paired gains with its Wald
  interval (:func:`safespot.stats.mean_interval`), verdicts as :mod:`safespot.reproduce.claims`.
- ``noise_levels``: the learned noise of each run's evaluated checkpoint
  (:func:`safespot.models.noise_injection.noise_levels`), when the records keep it.
- ``noise_draws``: how each evaluated noise-injected model drew its weight noise (one draw per
  forward pass, paper 003, or per image), as its records state it.

``gain_claims`` and ``noise_levels`` take a ``missing_note`` as the general ``claims`` does
(:mod:`safespot.reproduce.sections`): what waits for evaluations without records is named as not
measured, followed by the note.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from safespot.models.noise_injection import noise_levels
from safespot.reproduce.claims import ClaimResult, claim_verdict
from safespot.reproduce.evidence import Evidence
from safespot.reproduce.sections import measured_claims, not_measured, section, unmeasured, unmeasured_claims
from safespot.reproduce.spec import SpecError
from safespot.stats import accuracy, mean_interval
from safespot.utils.checkpoint import load_checkpoint
from safespot.utils.tables import markdown_table


def sweep_config(evidence: Evidence, evaluation: str, sweep: str) -> dict[str, Any]:
    """The vote sweep ``sweep``'s config as evaluation ``evaluation`` stored it."""
    config = (evidence.meta(evaluation).get("evaluation_config") or {}).get(sweep)
    if not config or "ns" not in config:
        raise SpecError(f"{evidence.spec.name}: evaluation {evaluation!r} ran no vote sweep {sweep!r}")
    return config


def _acc(evidence: Evidence, evaluation: str, sweep: str, rule: str, n: int) -> str:
    return accuracy(evidence.field(f"{evaluation}/{sweep}_{rule}_n{n}/correct").to_numpy().astype(bool)).percent()


def _sweeps(spec_section: dict[str, Any]) -> tuple[str, str]:
    return str(spec_section.get("clean", "votes")), str(spec_section.get("attacked", "votes_pgd"))


def _title(spec_section: dict[str, Any]) -> list[str]:
    lines = [str(spec_section["title"]).strip(), ""] if spec_section.get("title") else []
    return [
        *lines,
        *(str(n).strip() for n in spec_section.get("notes") or ()),
        *([""] if spec_section.get("notes") else []),
    ]


@section("vote_sweep")
def vote_sweep_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    clean, attacked = _sweeps(spec_section)
    rule = str(spec_section.get("rule", "majority"))
    heading = str(spec_section.get("attack_label", "PGD"))
    rows = []
    for evaluation, label in spec_section["models"].items():
        for n in sorted(sweep_config(evidence, evaluation, clean)["ns"]):
            rows.append(
                {
                    "Model": label,
                    "n": str(n),
                    "Clean": _acc(evidence, evaluation, clean, rule, n),
                    heading: _acc(evidence, evaluation, attacked, rule, n),
                }
            )
    return [*_title(spec_section), markdown_table(pd.DataFrame(rows)), ""]


@section("vote_rules")
def vote_rules_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    clean, attacked = _sweeps(spec_section)
    heading = str(spec_section.get("attack_label", "PGD"))
    rows = []
    for evaluation, label in spec_section["models"].items():
        config = sweep_config(evidence, evaluation, clean)
        n = max(config["ns"])
        for rule in config.get("votes") or ("majority", "soft", "weighted"):
            rows.append(
                {
                    "Model": label,
                    "Vote": f"{rule} (n = {n})",
                    "Clean": _acc(evidence, evaluation, clean, rule, n),
                    heading: _acc(evidence, evaluation, attacked, rule, n),
                }
            )
    return [*_title(spec_section), markdown_table(pd.DataFrame(rows)), ""]


def _gain(evidence: Evidence, fields: list[str], where: str) -> pd.Series:
    if len(fields) != 2:
        raise SpecError(f"{where} must name two fields (the accuracy at n and at n'), got {fields!r}")
    high, low = (evidence.field(f).astype(int) for f in fields)
    if not high.index.equals(low.index):
        raise SpecError(f"{where}: {fields} are not on the same images")
    return high - low


def gain_claim(evidence: Evidence, claim: dict[str, Any]) -> ClaimResult:
    """``a``'s per-image gain minus ``b``'s on the same images (values in {-2, ..., 2}), with a
    Wald interval of its mean; a superiority claim unless ``kind`` says otherwise."""
    a, b = (
        _gain(evidence, list(claim["a"]), f"claim {claim['text']!r}: a"),
        _gain(evidence, list(claim["b"]), f"claim {claim['text']!r}: b"),
    )
    if not a.index.equals(b.index):
        raise SpecError(f"claim {claim['text']!r}: the two gains are not on the same images")
    difference = mean_interval((a - b).to_numpy(dtype=float))
    kind, margin = str(claim.get("kind", "superiority")), float(claim.get("margin", 0.0))
    word = claim_verdict(difference, kind, margin, evidence.spec.smallest_effect)  # type: ignore[arg-type]
    return ClaimResult(str(claim["text"]), difference, word, None, "–")  # type: ignore[arg-type]


@section("gain_claims")
def gain_claims_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    measured, missing = measured_claims(evidence, spec_section)
    lines = _title(spec_section)
    if measured:
        table = pd.DataFrame([gain_claim(evidence, c).row() for c in measured])
        lines += [markdown_table(table.drop(columns=["Paper", "Size vs paper"])), ""]
    return [*lines, *unmeasured_claims(spec_section, missing)]


def scored_checkpoint(evidence: Evidence, evaluation: str) -> Path | None:
    """The checkpoint evaluation ``evaluation`` scored, as its training run's records keep it
    (``None`` when they do not)."""
    run = evidence.spec.evaluations[evaluation].run
    name = Path(str(evidence.meta(evaluation).get("ckpt_path", ""))).name
    kept = evidence.train_dir(run) / "checkpoints" / name if run and name else None
    return kept if kept is not None and kept.is_file() else None


@section("noise_levels")
def noise_levels_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """``models: {EVALUATION: label}``: the median, least and largest learned noise level over
    the noisy layers of the checkpoint each evaluation scored; models whose checkpoint the records
    do not keep are named instead."""
    rows, absent = [], []
    note = spec_section.get("missing_note")
    missing = unmeasured(evidence, spec_section["models"]) if note else []
    for evaluation, label in spec_section["models"].items():
        if evaluation in missing:
            continue
        ckpt = scored_checkpoint(evidence, evaluation)
        if ckpt is None:
            absent.append(label)
            continue
        levels = noise_levels(load_checkpoint(ckpt)["state_dict"])
        if not levels:
            raise SpecError(f"{evidence.spec.name}: {ckpt.name} of {evaluation!r} has no noisy layers")
        rows.append(
            {
                "Model": label,
                "Noisy layers": str(len(levels)),
                "Median": f"{float(np.median(levels)):.3f}",
                "Least": f"{min(levels):.3f}",
                "Largest": f"{max(levels):.3f}",
            }
        )
    lines = _title(spec_section)
    if rows:
        lines += [markdown_table(pd.DataFrame(rows)), ""]
    if absent:
        lines += [f"Not in the records (the evaluated checkpoints were not kept): {', '.join(absent)}.", ""]
    return [*lines, *not_measured(missing, str(note or "").strip())]


#: how a noise-injected model drew its weight noise (results.json's ``noise_per``), in words
NOISE_DRAWS = {
    "forward": "one weight draw per forward pass, shared by its images (paper 003)",
    "image": "one weight draw per image",
    None: (
        "one weight draw per image (records made before `model.backbone.noise_per` existed, when every "
        "seeded evaluation drew per image)"
    ),
}


@section("noise_draws")
def noise_draws_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """``models: {EVALUATION: label}`` (noise-injected models): how each evaluation's model drew its
    weight noise, from its records (``noise_per`` of results.json; absent in records made before
    the setting); evaluations without records are left out."""
    described: dict[str, list[str]] = {}
    for evaluation, label in spec_section["models"].items():
        if not evidence.has(evaluation):
            continue
        meta = evidence.meta(evaluation)
        per = meta.get("noise_per")
        if "noise_per" in meta and per is None:
            raise SpecError(f"{evidence.spec.name}: evaluation {evaluation!r} scored a model without weight noise")
        described.setdefault(NOISE_DRAWS.get(per, f"noise_per={per}"), []).append(f"{label} (`{evaluation}`)")
    parts = [f"{', '.join(labels)}: {text}" for text, labels in described.items()]
    if not parts:
        return []
    return [
        f"{str(spec_section.get('lead', 'Weight noise, as the records state it')).strip()}: {'; '.join(parts)}.",
        "",
    ]
