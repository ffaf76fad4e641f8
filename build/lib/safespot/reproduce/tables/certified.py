"""Sections of certified-accuracy reproductions (randomised smoothing, Cohen et al. 2019)."""

from __future__ import annotations

from typing import Any

from safespot.reproduce.claims import certify_settings
from safespot.reproduce.evidence import Evidence
from safespot.reproduce.sections import section
from safespot.smoothing.certified import max_certifiable_radius

#: the draws of CERTIFY in the papers (Cohen et al.; paper 002, Table 7)
PAPER_N = 100_000


@section("certify_note")
def certify_note(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """CERTIFY's settings as the run stored them and the largest radius they can certify."""
    sigma, n, alpha = certify_settings(evidence, spec_section["evaluation"])
    bound, paper = max_certifiable_radius(sigma, n, alpha), max_certifiable_radius(sigma, PAPER_N, alpha)
    return [
        f"CERTIFY with n0 = 100, n = {n:,}, alpha = {alpha:g}: no radius above sigma Phi^-1(alpha^(1/n)) = "
        f'{bound:.3f} can be certified (paper: n = {PAPER_N:,}, up to {paper:.3f}). "Clean" is the accuracy '
        "of the smoothed vote over `smoothing.n_vote` draws on the (robustified) images; r = 0 is CERTIFY's "
        "(abstentions count as wrong).",
        "",
    ]
