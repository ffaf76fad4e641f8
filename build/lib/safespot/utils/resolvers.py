"""OmegaConf resolvers used by the configs."""

from __future__ import annotations

import os
import secrets
from datetime import datetime

from omegaconf import OmegaConf

from safespot.utils.launch import launch_id

# One value per process: every job of a multirun (and every re-resolution of the run
# directory) sees the same suffix, while two runs started in the same second differ.
_RUN_SUFFIX = f"{os.getpid() % 100000:05d}{secrets.token_hex(2)}"


def unique_suffix() -> str:
    """This process's run suffix (the ``${unique:}`` of run directory names)."""
    return _RUN_SUFFIX


def run_id() -> str:
    """The name of this run's (or sweep's) directory: the start time and this process's suffix, or
    under a launcher that starts every rank as the same command (``srun``, ``torchrun``) the name
    of the launch, which every rank computes alike (:func:`safespot.utils.launch.launch_id`)."""
    return launch_id() or f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{_RUN_SUFFIX}"


def sweep_name() -> str | None:
    """In a Hydra multirun, the sweep directory's name (used as the wandb group, so a
    sweep's runs appear together); ``None`` otherwise."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        config = HydraConfig.get()
        if config.mode == RunMode.MULTIRUN:
            return os.path.basename(str(config.sweep.dir).rstrip("/"))
    except (ValueError, ImportError, AttributeError):
        pass
    return None


def run_name() -> str:
    """A name no other run has: the run directory's name (start time and per-process suffix), and
    in a multirun the sweep directory's name with the job number (wandb run names)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        config = HydraConfig.get()
        sweep = sweep_name()
        if sweep is not None:
            return f"{sweep}-{config.job.num}"
        return os.path.basename(str(config.runtime.output_dir).rstrip("/"))
    except Exception:  # outside a Hydra run (e.g. a composed config): the process's suffix
        return _RUN_SUFFIX


def wandb_offline() -> bool:
    """wandb runs offline (no server needed; ``wandb sync`` later) unless ``WANDB_MODE`` says
    ``online`` (or ``run``)."""
    return os.environ.get("WANDB_MODE", "offline").strip().lower() not in ("online", "run")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("unique"):
        OmegaConf.register_new_resolver("unique", unique_suffix, use_cache=True)
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", run_id, use_cache=True)
    if not OmegaConf.has_resolver("sweep_name"):
        OmegaConf.register_new_resolver("sweep_name", sweep_name)
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name, use_cache=True)
