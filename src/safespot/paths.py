"""Locations inside the project checkout."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: the Hydra config tree: the checkout's ``conf/`` (the package is installed editable from its
#: checkout, as README says), or the directory ``SAFESPOT_CONFIG_DIR`` names
CONFIG_DIR = Path(os.environ.get("SAFESPOT_CONFIG_DIR") or PROJECT_ROOT / "conf").resolve()


def fresh_directory(root: Path, stem: str) -> Path:
    """A new directory ``root/stem``, or ``root/stem-1``, ``root/stem-2``, ... when the name is
    taken (two runs started within one second); never an existing one."""
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(1000):
        path = root / (stem if attempt == 0 else f"{stem}-{attempt}")
        try:
            path.mkdir(exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free directory name for {stem!r} in {root}")
