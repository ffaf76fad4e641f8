"""The claims a reproduction checks, each as its paper states it.

A claim compares two per-image correctness fields measured on the same images (``a`` and ``b``,
``<evaluation>/<field>``, e.g. S-Full against no robustification, or one model against another):
the difference of the accuracies with Newcombe's paired interval and McNemar's exact p
(:func:`safespot.stats.paired_difference`), and a verdict by the claim's ``kind``:

- ``superiority`` (the default): "a beats b". Holds when the interval lies above 0; does not hold
  when it lies below the spec's ``smallest_effect`` (the smallest gain the claim is about, stated
  before the data), else inconclusive.
- ``non_inferiority``: "a is at least as good as b", with the ``margin`` (a fraction, stated before
  the data) by which a may be worse: holds when the interval lies above ``-margin``.
- ``equal``: the two agree within ``margin``.

``paper`` (percentage points) is the difference the paper reports; the size verdict says whether
the interval contains it, or the measured difference is larger or smaller than the paper's.
``certified: {evaluation: <eval>/<certify evaluation>, radius: r}`` marks a claim about certified
accuracy at radius r, which is "not measurable" when the evaluation's n cannot certify r at all.
``restrict`` (fields) keeps only the images where every one of them is true, e.g. the images both
models classify correctly, so that a difference in clean accuracy cannot pass for one in
robustness.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from safespot.reproduce.evidence import Evidence
from safespot.reproduce.spec import SpecError
from safespot.smoothing.certified import max_certifiable_radius
from safespot.stats import PairedDifference, paired_difference, verdict

KINDS = ("superiority", "non_inferiority", "equal")


@dataclass(frozen=True)
class ClaimResult:
    text: str
    difference: PairedDifference
    verdict: str
    paper: float | None
    size: str

    def row(self) -> dict[str, str]:
        return {
            "Claim (same images)": self.text,
            "Difference [95% CI]": self.difference.percent(),
            "Verdict": self.verdict,
            "Paper": "–" if self.paper is None else f"{self.paper:+.2f}",
            "Size vs paper": self.size,
        }


def size_verdict(difference: PairedDifference, paper: float | None) -> str:
    """Whether the paper's difference (percentage points) lies in the interval, or the interval
    lies above it (larger than the paper's) or below it (smaller)."""
    if paper is None or not difference.n:
        return "–"
    low, high = 100 * difference.low, 100 * difference.high
    if low > paper:
        return "larger than the paper's"
    if high < paper:
        return "smaller than the paper's"
    return "of the paper's size"


def claim_verdict(difference: PairedDifference, kind: str, margin: float, smallest: float) -> str:
    if kind == "superiority":
        return verdict(difference, "greater", 0.0, smallest)
    if kind == "non_inferiority":
        return verdict(difference, "greater", -margin, smallest)
    if kind == "equal":
        return verdict(difference, "equal", margin)
    raise SpecError(f"a claim's kind must be one of {KINDS}, got {kind!r}")


def certify_settings(evidence: Evidence, ref: str) -> tuple[float, int, float]:
    """``(sigma, n, alpha)`` of the certify evaluation ``<evaluation>/<name>`` as its run stored them."""
    key, _, name = ref.partition("/")
    meta = evidence.meta(key)
    certify = (meta.get("evaluation_config", {}).get(name) or {}).get("certify")
    if not certify or not meta.get("smoothing"):
        raise SpecError(f"{evidence.spec.name}: {ref} is not a certify evaluation of a smoothed classifier")
    return float(meta["smoothing"]["sigma"]), int(certify["n"]), float(certify["alpha"])


def unmeasurable(evidence: Evidence, ref: str, radius: float) -> str | None:
    """Why certified accuracy at ``radius`` cannot be measured by evaluation ``ref`` (no radius above
    :func:`max_certifiable_radius` can be certified with its n), or ``None``."""
    sigma, n, alpha = certify_settings(evidence, ref)
    bound = max_certifiable_radius(sigma, n, alpha)
    return f"not measurable at n = {n:,} (largest radius {bound:.3f})" if bound < radius else None


def evaluate_claim(evidence: Evidence, claim: dict[str, Any]) -> ClaimResult:
    """One claim of a spec (``text``, ``a``, ``b``, optional ``kind``, ``margin``, ``paper``,
    ``restrict``) on the evidence."""
    a, b = evidence.field(claim["a"]), evidence.field(claim["b"])
    if not a.index.equals(b.index):
        raise SpecError(f"claim {claim['text']!r}: {claim['a']} and {claim['b']} are not on the same images")
    keep = np.ones(len(a), dtype=bool)
    for ref in claim.get("restrict") or ():
        condition = evidence.field(ref)
        if not condition.index.equals(a.index):
            raise SpecError(f"claim {claim['text']!r}: {ref} is not on the same images")
        keep &= condition.to_numpy().astype(bool)
    difference = paired_difference(a.to_numpy().astype(bool)[keep], b.to_numpy().astype(bool)[keep])
    kind = str(claim.get("kind", "superiority"))
    margin = float(claim.get("margin", 0.0))
    paper = claim.get("paper")
    paper = None if paper is None else float(paper)
    word = claim_verdict(difference, kind, margin, evidence.spec.smallest_effect)
    if claim.get("certified"):  # certified accuracy at a radius the evaluation's n cannot reach
        word = unmeasurable(evidence, claim["certified"]["evaluation"], float(claim["certified"]["radius"])) or word
    return ClaimResult(
        text=str(claim["text"]),
        difference=difference,
        verdict=word,
        paper=paper,
        size=size_verdict(difference, paper),
    )
