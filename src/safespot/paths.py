"""Locations inside the project checkout."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: the Hydra config tree: the checkout's ``conf/`` (the package is installed editable from its
#: checkout, as README says), or the directory ``SAFESPOT_CONFIG_DIR`` names
CONFIG_DIR = Path(os.environ.get("SAFESPOT_CONFIG_DIR") or PROJECT_ROOT / "conf").resolve()
