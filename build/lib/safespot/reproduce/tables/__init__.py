"""Section kinds of particular reproductions, registered with :func:`safespot.reproduce.sections.section`
when imported (:mod:`safespot.reproduce.engine` imports them all): certified accuracy (randomised
smoothing), OOD detection (paper 000 Table 4), rejection (paper 004) and votes (paper 003)."""

from safespot.reproduce.tables import certified, ood, rejection, votes

SECTION_MODULES = (certified, ood, rejection, votes)
