"""Locations inside the project checkout."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: the configs an installed package carries (``safespot/conf``, copied from the checkout's ``conf/``
#: when the package is built; setup.py)
PACKAGED_CONFIG_DIR = Path(__file__).resolve().parent / "conf"


def _config_dir() -> Path:
    """The Hydra config tree: the directory ``SAFESPOT_CONFIG_DIR`` names, else the checkout's
    ``conf/`` (an editable install, or running from the checkout), else the configs the installed
    package carries (``pip install .``, a wheel)."""
    if os.environ.get("SAFESPOT_CONFIG_DIR"):
        return Path(os.environ["SAFESPOT_CONFIG_DIR"]).resolve()
    checkout = PROJECT_ROOT / "conf"
    return checkout.resolve() if (checkout / "train.yaml").is_file() else PACKAGED_CONFIG_DIR


CONFIG_DIR = _config_dir()


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
