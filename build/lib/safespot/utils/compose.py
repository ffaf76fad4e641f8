"""Composing a task's Hydra config in-process (the demo, tests): the same config the command line
composes, with its output directory set explicitly instead of by Hydra's run directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import safespot.utils.resolvers  # noqa: F401  (the package registers the config resolvers on import)
from safespot.paths import CONFIG_DIR


def compose_config(name: str, overrides: Sequence[str], output_dir: str | Path) -> DictConfig:
    """The ``name`` config (``train``, ``evaluate``, ...) with ``overrides``, writing into
    ``output_dir``; the config tree is not printed (``extras.print_config=false`` first, so an
    override can switch it back on)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=name, overrides=["extras.print_config=false", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg["hydra"]
    GlobalHydra.instance().clear()
    return cfg
