"""OmegaConf resolvers used by the configs."""

from __future__ import annotations

import os
import secrets
import time

from omegaconf import OmegaConf

# One value per process: every job of a multirun (and every re-resolution of the run
# directory) sees the same suffix, while two runs started in the same second differ.
_RUN_SUFFIX = f"{os.getpid() % 100000:05d}{secrets.token_hex(2)}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("unique"):
        OmegaConf.register_new_resolver("unique", lambda: _RUN_SUFFIX, use_cache=True)
    if not OmegaConf.has_resolver("epoch_time"):
        OmegaConf.register_new_resolver("epoch_time", lambda: str(int(time.time())), use_cache=True)
