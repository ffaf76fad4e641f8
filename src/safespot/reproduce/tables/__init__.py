"""Section kinds of particular reproductions, registered with :func:`safespot.reproduce.sections.section`
when imported (:mod:`safespot.reproduce.engine` imports them all): certified accuracy (randomised
smoothing), OOD detection (paper 000 Table 4), reconstruction (paper 002 Figure 3), rejection
(paper 004), the old -> new verdicts of docs/reproduction.md, robustification grids (paper 000
Table 1, paper 002 Tables 1-2), the models' training logs and votes (paper 003)."""

from safespot.reproduce.tables import (
    certified,
    ood,
    reconstruction,
    rejection,
    remeasured,
    robustification,
    training,
    votes,
)

SECTION_MODULES = (certified, ood, reconstruction, rejection, remeasured, robustification, training, votes)
