"""Section kinds of particular reproductions, registered with :func:`safespot.reproduce.sections.section`
when imported (:mod:`safespot.reproduce.engine` imports them all): certified accuracy (randomised
smoothing)."""

from safespot.reproduce.tables import certified, reconstruction, robustification

SECTION_MODULES = (certified, reconstruction, robustification)
