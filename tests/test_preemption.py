"""Preempted and killed training runs, as on a cluster: a run killed with SIGKILL mid-epoch and
resumed from ``last.ckpt`` ends where an uninterrupted run ends; a SLURM job told to stop (SIGUSR1,
SLURM's requeue signal, or SIGTERM) saves, and the requeued job resumes in the same run directory."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [
    "data=synthetic",
    "data.n_train=1024",
    "data.batch_size=16",
    "model.backbone.width=8",
    "method=natural",
    "trainer=cpu",
    "trainer.max_epochs=3",
    "logger=none",
    "test=false",
    "extras.print_config=false",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
SLURM = {"SLURM_JOB_ID": "99", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1"}
SLURM |= {"SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_NAME": "train"}
SLURM |= {"SLURM_NODELIST": "localhost"}


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "LOG_DIR": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1", **extra}


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "train.py"), *TRAIN, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    start = time.monotonic()
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path.name} appeared:\n{process.stdout.read()[-3000:]}"
        assert time.monotonic() - start < timeout, f"no {path} after {timeout} s"
        time.sleep(0.05)


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def _weights(ckpt: Path) -> tuple[dict[str, torch.Tensor], int, int]:
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    return state["state_dict"], state["epoch"], state["global_step"]


def _same_weights(a: Path, b: Path) -> None:
    (wa, ea, sa), (wb, eb, sb) = _weights(a), _weights(b)
    assert (ea, sa) == (eb, sb)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    _finish(_start([f"hydra.run.dir={out}"], _env(out.parent)))
    return out / "checkpoints" / "last.ckpt"


def test_a_run_killed_mid_epoch_resumes_from_last_ckpt_to_the_same_weights(uninterrupted, tmp_path):
    run = tmp_path / "killed"
    process = _start([f"hydra.run.dir={run}"], _env(tmp_path))
    _wait_for(run / "checkpoints" / "last.ckpt", process)  # the first epoch is over: kill the second
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL
    _, epoch, _ = _weights(run / "checkpoints" / "last.ckpt")
    assert epoch < 2  # killed before the last epoch ended
    resumed = tmp_path / "resumed"
    _finish(_start([f"hydra.run.dir={resumed}", f"ckpt_path={run}/checkpoints/last.ckpt"], _env(tmp_path)))
    _same_weights(resumed / "checkpoints" / "last.ckpt", uninterrupted)


@pytest.mark.parametrize("into", ["another", "the_same", "the_same_ddp_sim"])
def test_a_resumed_run_keeps_the_best_checkpoint_of_the_epochs_before_the_resume(into, tmp_path):
    """The best checkpoint of a run resumed into a new directory, from a run directory that was moved
    since (as the reproduction engine sets an interrupted run aside and runs it again under the same
    name), is the best of all its epochs, not of those after the resume. The monitor is the epoch,
    minimised, so that the best epoch is the first one, which ends before the kill. Lightning alone
    made the first epoch after the resume the best (in another directory it reloads the best path,
    not its score) or, in a directory of the same name, ended naming a best checkpoint that was not
    there (the test stage then failed)."""
    best_first = ["callbacks.model_checkpoint.monitor=epoch", "callbacks.model_checkpoint.mode=min"]
    run = tmp_path / "killed"
    process = _start([f"hydra.run.dir={run}", *best_first], _env(tmp_path))
    _wait_for(run / "checkpoints" / "last.ckpt", process)
    process.kill()
    process.wait()
    assert [p.name for p in (run / "checkpoints").glob("best-*")] == ["best-epoch000.ckpt"]
    moved = run.rename(tmp_path / "killed.interrupted")
    resumed = tmp_path / "resumed" if into == "another" else run
    ckpt = moved / "checkpoints" / "last.ckpt"
    processes = ["trainer=ddp_sim"] if into.endswith("ddp_sim") else []  # resumed by two processes: rank 0 copies
    _finish(_start([f"hydra.run.dir={resumed}", f"ckpt_path={ckpt}", *best_first, *processes], _env(tmp_path)))
    assert sorted(p.name for p in (resumed / "checkpoints").glob("best-*")) == ["best-epoch000.ckpt"]
    best, first = (
        _weights(resumed / "checkpoints" / "best-epoch000.ckpt"),
        _weights(moved / "checkpoints" / "best-epoch000.ckpt"),
    )
    assert best[1:] == first[1:] == (0, first[2])
    assert all(torch.equal(best[0][k], first[0][k]) for k in first[0])
    state = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    callback = next(v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert Path(callback["best_model_path"]) == resumed / "checkpoints" / "best-epoch000.ckpt"
    assert int(callback["best_model_score"]) == 0 and state["epoch"] == 2


def test_a_run_resumed_after_its_last_epoch_tests_the_carried_best_checkpoint(uninterrupted, tmp_path):
    """Resumed from the last epoch's checkpoint (killed during its test stage), a run trains no epoch
    and tests the best checkpoint carried into its directory, not a path that is not there."""
    moved = shutil.copytree(uninterrupted.parent.parent, tmp_path / "run.interrupted")
    run = tmp_path / "run"
    ckpt = moved / "checkpoints" / "last.ckpt"
    output = _finish(_start([f"hydra.run.dir={run}", f"ckpt_path={ckpt}", "test=true"], _env(tmp_path)))
    best = sorted(p.name for p in (moved / "checkpoints").glob("best-*"))
    assert best and sorted(p.name for p in (run / "checkpoints").glob("best-*")) == best
    assert "test/acc" in output


def _scontrol(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in for SLURM's ``scontrol`` that records its arguments."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    return bin_dir, calls


@pytest.mark.parametrize(
    "stop",
    [pytest.param(signal.SIGUSR1, marks=pytest.mark.slow), signal.SIGTERM],
    ids=["requeue_signal", "sigterm"],
)
def test_a_preempted_slurm_job_saves_and_its_requeued_attempt_resumes(stop, uninterrupted, tmp_path):
    bin_dir, calls = _scontrol(tmp_path)
    env = _env(tmp_path, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **SLURM)
    run = tmp_path / "logs" / "train" / "runs" / "slurm-99"  # named after the job: found again after a requeue
    first = _start([], env)
    _wait_for(run / "checkpoints" / "last.ckpt", first)
    first.send_signal(stop)
    _wait_for(run / "hpc_ckpt_1.ckpt", first)
    if stop == signal.SIGUSR1:  # Lightning saved and asked SLURM to requeue the job
        _wait_for(calls, first)
        assert calls.read_text().split() == ["requeue", "99"]
    first.kill()  # SLURM ends the preempted attempt
    first.wait()
    second = _start([], {**env, "SLURM_RESTART_COUNT": "1"})
    output = _finish(second)
    assert "hpc_ckpt_1.ckpt" in output  # restored from the checkpoint of the preempted attempt
    assert sorted(p.name for p in run.parent.iterdir()) == ["slurm-99"]
    # the run ends where the uninterrupted one ends (same epoch and step). The weights are close, not
    # equal: a checkpoint saved mid-epoch resumes with that epoch's batches from the start (Lightning
    # does not fast-forward a data loader); resuming from last.ckpt (an epoch's end) is exact (above).
    (_, epoch, step), (_, whole_epoch, whole_step) = (
        _weights(run / "checkpoints" / "last.ckpt"),
        _weights(uninterrupted),
    )
    assert (epoch, step) == (whole_epoch, whole_step) == (2, 180)


@pytest.mark.slow
def test_a_second_run_into_a_job_named_directory_is_refused_unless_requeued(tmp_path):
    """Two trainings in one batch job would share ``slurm-<job>``: the second is refused (its
    earlier run is not its own), a requeued attempt (``SLURM_RESTART_COUNT`` > 0) is let in."""
    run = tmp_path / "logs" / "train" / "runs" / "slurm-99"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("earlier: run\n")
    cmd = [sys.executable, str(ROOT / "train.py"), "data=synthetic", "threat.eps=-1", "extras.print_config=false"]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path, **SLURM), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "already holds an earlier run" in done.stderr
    again = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path, **SLURM, SLURM_RESTART_COUNT="1"), capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert again.returncode == 2 and "threat.eps" in again.stderr.strip().splitlines()[-1]  # past the directory check
