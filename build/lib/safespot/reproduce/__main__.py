"""``python -m safespot.reproduce``: the same as ``safespot-reproduce``."""

from safespot.reproduce.cli import main

raise SystemExit(main())
