"""Hydra callbacks that keep every run in a directory of its own and every rank of a run in it.

Default run directories carry the start time and a per-process suffix (conf/hydra/default.yaml,
``${run_id:}``), so they never collide; under a launcher that starts every rank as the same command
(``srun``, ``torchrun``) they are named after the launch (:func:`safespot.utils.launch.launch_id`),
so that every rank lands in the same one. An explicit ``hydra.run.dir=DIR`` (or
``hydra.sweep.dir``) can name the directory of an earlier run, e.g. when a command from a report is
pasted again, or a folder of copied results. Hydra would then rewrite that run's ``.hydra/``
configs and the task its records, results and checkpoints. :class:`RefuseUsedRunDir` refuses a
directory that holds anything but log files, before Hydra writes anything, with one line and exit
status 2 (as :func:`safespot.utils.task.report_config_errors` prints setting errors). A resumed
training run (``ckpt_path=<run>/checkpoints/last.ckpt``) writes into a new directory as well.

The secondary ranks of a run (:func:`safespot.utils.launch.process_rank` > 0) share the directory
their rank 0 checked: they skip the check and write no ``.hydra`` configs. A requeued SLURM job
(``SLURM_RESTART_COUNT`` > 0) goes back into its earlier attempt's directory, where Lightning finds
the checkpoint it saved when the job was preempted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from safespot.errors import ConfigError
from safespot.utils.launch import LAUNCHER_VARIABLES, install_child_command, launch_id, process_rank, requeued


class RunDirectoryInUse(ConfigError):
    """The run (or sweep) directory already holds an earlier run or other files."""


def _held(directory: Path) -> list[str]:
    """What ``directory`` holds besides log files (which every rank of a run appends to)."""
    if not directory.is_dir():
        return [directory.name] if directory.exists() else []
    return sorted(p.name for p in directory.iterdir() if not (p.is_file() and p.suffix == ".log"))


def check_unused(directory: str | Path, key: str, marker: str) -> None:
    """Raise :class:`RunDirectoryInUse` when ``directory`` holds an earlier run (``marker``: the
    ``.hydra`` of a run, the ``multirun.yaml`` of a sweep) or any other file but logs, e.g. the
    ``records.csv`` and ``results.json`` of a copied results folder."""
    directory = Path(directory)
    held = _held(directory)
    if not held:
        return
    advice = "outputs never overwrite an earlier run: choose a new directory (or leave the default, which is unique)"
    if marker in held:
        raise RunDirectoryInUse(f"{key}={directory} already holds an earlier run ({marker}); {advice}")
    if not directory.is_dir():
        raise RunDirectoryInUse(f"{key}={directory} is a file, not a directory; {advice}")
    shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
    raise RunDirectoryInUse(f"{key}={directory} already holds files ({shown}); {advice}")


def _refuse(config: DictConfig, key: str, marker: str) -> None:
    directory = str(OmegaConf.select(config, key))
    if Path(directory).name == launch_id() and requeued():  # the job's earlier attempt: resume there
        return
    try:
        check_unused(directory, key, marker)
    except RunDirectoryInUse as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _secondary(config: DictConfig) -> bool:
    """On a secondary rank: write no ``.hydra`` configs (rank 0 writes them) and say so."""
    if process_rank() == 0:
        return False
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.output_subdir = None
    return True


class RefuseUsedRunDir(Callback):
    """Refuse a run or sweep directory that holds an earlier run or other files, before any work
    (on rank 0 of the run; its other ranks share the directory)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _secondary(config):
            _refuse(config, "hydra.run.dir", ".hydra")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _secondary(config):
            _refuse(config, "hydra.sweep.dir", "multirun.yaml")


class JobProcesses(Callback):
    """Each job of a run (and of a multirun) with its own processes.

    Lightning's script launcher (``strategy=ddp``) starts the other ranks of a job as child
    commands (:func:`safespot.utils.launch.job_child_command`: the job alone, also in a multirun)
    and leaves its process group and its launcher variables behind. At the end of every job all
    ranks meet and leave the group, and the launching process forgets the variables, so the next
    job of a multirun starts its own ranks."""

    def __init__(self) -> None:
        self._environment: dict[str, str | None] = {}

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        install_child_command()
        self._environment = {name: os.environ.get(name) for name in LAUNCHER_VARIABLES}

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if job_return.status == JobStatus.COMPLETED:  # a failed rank's peers were stopped already
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        for name, value in self._environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
