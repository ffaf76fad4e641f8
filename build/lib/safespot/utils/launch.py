"""The processes of one run.

A multi-process run (DDP) starts its ranks in one of three ways, and every rank must work in the
one run directory of the run:

- Lightning's script launcher (``trainer=ddp``, ``strategy=ddp`` on a machine): rank 0 is the
  command the user started; it re-runs the command for ranks 1..N-1 with ``LOCAL_RANK`` set and
  its own run directory (``hydra.run.dir``) passed on. :func:`install_child_command` makes a rank
  of a Hydra *multirun* job re-run that job only (Lightning re-runs the whole sweep otherwise).
- A cluster launcher that starts every rank as the same command (``srun`` of a job step with
  several tasks, ``torchrun``): no process knows another's start time, so the run directory is
  named after the launch (:func:`launch_id`: the SLURM job and step, torchrun's run id).
- Spawned workers (``ddp_spawn``): one Hydra run in the parent; nothing to agree on.

:func:`process_rank` tells a secondary rank (which must neither refuse its run's directory nor
write the run's ``.hydra`` configs, :mod:`safespot.utils.run_dirs`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_original_cwd, to_absolute_path

#: environment variables Lightning's script launcher sets in the launching process, for its
#: children; they must not outlive the job (a later job of a multirun would take ``LOCAL_RANK``
#: for a sign that its processes were started externally and wait for ranks that never come)
LAUNCHER_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _int_env(name: str, default: int = 0) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def slurm_tasks() -> int:
    """The number of tasks of this SLURM job step (1 outside a step of several tasks)."""
    if not os.environ.get("SLURM_JOB_ID") or "SLURM_STEP_ID" not in os.environ:
        return 1
    return _int_env("SLURM_STEP_NUM_TASKS", _int_env("SLURM_NTASKS", 1))


def process_rank() -> int:
    """This process's rank among the processes a launcher started for one run: ``RANK`` /
    ``LOCAL_RANK`` (torchrun, Lightning's script launcher) or ``SLURM_PROCID`` in a SLURM step of
    several tasks; 0 for a process that runs alone or launches the others itself."""
    ranks = [_int_env("RANK"), _int_env("LOCAL_RANK")]
    if slurm_tasks() > 1:
        ranks.append(_int_env("SLURM_PROCID"))
    return max(ranks)


def slurm_batch_job() -> bool:
    """Whether this process runs in a SLURM job that is not an interactive shell (``salloc``,
    ``srun --pty bash``: job name ``bash`` or ``interactive``, as Lightning tells them apart)."""
    return bool(os.environ.get("SLURM_JOB_ID")) and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def requeued() -> bool:
    """Whether this SLURM job was requeued (preempted or timed out, then started again)."""
    return _int_env("SLURM_RESTART_COUNT") > 0


def launch_id() -> str | None:
    """The name every process of an externally launched run agrees on, for its run directory:
    ``slurm-<job>[.<step>]`` in a SLURM batch job (every task of a step computes it alike, and a
    requeued job finds its earlier attempt's directory, where Lightning resumes from the checkpoint
    it saved on the preemption signal), ``torchrun-<id>`` under torchrun with a run id; ``None``
    elsewhere (then the start time and a per-process suffix name the run)."""
    if slurm_batch_job():
        step = os.environ.get("SLURM_STEP_ID")
        job = f"slurm-{os.environ['SLURM_JOB_ID']}"
        return f"{job}.{step}" if step is not None else job
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id != "none" and _int_env("WORLD_SIZE", 1) > 1:
        return f"torchrun-{run_id}"
    return None


def job_child_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command Lightning's script launcher runs for rank ``local_rank`` of the current Hydra
    job, and the directory to run it in: the command as the user started it for a single run (as
    Lightning does), and for a job of a multirun that job alone, as a single run (its own task
    overrides, ``hydra.mode=RUN``), into the job's directory. ``hydra.output_subdir=null``: only
    rank 0 writes the job's ``.hydra`` configs."""
    import __main__  # at call time: the module that was started (Lightning does the same)

    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    config = HydraConfig.get()
    if config.mode == RunMode.MULTIRUN:
        command += [*config.overrides.task, "hydra.mode=RUN"]
        run_dir = config.runtime.output_dir
    else:
        command += sys.argv[1:]
        run_dir = config.run.dir
    command += [f'hydra.run.dir="{run_dir}"', f"hydra.job.name={config.job.name}_rank{local_rank}"]
    command += ["hydra.output_subdir=null"]
    return command, get_original_cwd()


def install_child_command() -> None:
    """Make Lightning's script launchers (Trainer and Fabric) start their child ranks with
    :func:`job_child_command`."""
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher

    for module in (fabric_launcher, trainer_launcher):
        if hasattr(module, "_hydra_subprocess_cmd"):
            module._hydra_subprocess_cmd = job_child_command
