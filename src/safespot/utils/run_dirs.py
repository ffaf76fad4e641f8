"""A Hydra callback that keeps every run in a directory of its own.

Default run directories carry the start time and a per-process suffix (conf/hydra/default.yaml),
so they never collide; an explicit ``hydra.run.dir=DIR`` (or ``hydra.sweep.dir``) can name the
directory of an earlier run, e.g. when a command from a report is pasted again. Hydra would then
rewrite that run's ``.hydra/`` configs and the task its records, results and checkpoints. The
callback refuses such a directory before Hydra writes anything, with one line and exit status 2
(as :func:`safespot.utils.task.report_config_errors` prints setting errors). A resumed training
run (``ckpt_path=<run>/checkpoints/last.ckpt``) writes into a new directory as well.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from safespot.errors import ConfigError


class RunDirectoryInUse(ConfigError):
    """The run (or sweep) directory already holds an earlier run."""


def check_unused(directory: str | Path, key: str, marker: str) -> None:
    """Raise :class:`RunDirectoryInUse` when ``directory`` holds ``marker``, the trace Hydra
    leaves in a run (``.hydra``) or a sweep (``multirun.yaml``) directory."""
    if (Path(directory) / marker).exists():
        raise RunDirectoryInUse(
            f"{key}={directory} already holds an earlier run ({marker}); outputs never overwrite "
            "an earlier run: choose a new directory (or leave the default, which is unique)"
        )


class RefuseUsedRunDir(Callback):
    """Refuse a run or sweep directory that already holds an earlier run, before any work."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir", ".hydra")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir", "multirun.yaml")

    @staticmethod
    def _check(config: DictConfig, key: str, marker: str) -> None:
        try:
            check_unused(str(OmegaConf.select(config, key)), key, marker)
        except RunDirectoryInUse as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
