"""Every command as researchers launch it on several processes, through the real command line
with the default logger (wandb offline + CSV): Lightning's script launcher (``trainer=ddp``: the
command re-runs itself for rank 1), spawned workers (``trainer=ddp_sim``), a Hydra multirun, and
two tasks started as ``srun`` starts one SLURM job step. Each must end with exit status 0, one run
directory shared by its ranks, and its results; a timeout turns a hang into a failure."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from safespot.utils.launch import launch_id, process_rank
from safespot.utils.loggers import CSVLogger

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 420
QUIET = ["extras.print_config=false"]
#: a few batches of one epoch, with the default logger (the debug presets switch wandb off)
SHORT = ["method=natural", "model.backbone.width=8", "trainer.max_epochs=1", "++trainer.limit_train_batches=2"]
SHORT += ["++trainer.limit_val_batches=1", "++trainer.limit_test_batches=1", "trainer.enable_progress_bar=false"]
TRAIN = [
    *SHORT,
    "data=synthetic_ood",
    "data.n_train=128",
    "data.n_test=32",
    "data.val_size=32",
    "data.n_outliers=64",
    "data.val_outlier_size=32",
]
OOD = ["detector=[msp,mahalanobis]", "detector.mahalanobis.noise=[0.0]", "fit_subset=32", "tune_subset=16"]
OOD += ["outlier_subset=8", "data.test_subset=16", "histograms=false", "trainer.enable_progress_bar=false"]
#: the processes of each launch: Lightning's script launcher, or spawned workers
TRAINER = {"ddp": ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"], "ddp_sim": ["trainer=ddp_sim"]}


def _env(log_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    return {**env, "LOG_DIR": str(log_dir), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **extra}


def _command(script: str, *args: str, log_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``python <script> args`` from ``cwd`` (not the checkout), as a user runs it."""
    cmd = [sys.executable, str(ROOT / script), *args, *QUIET]
    return subprocess.run(cmd, cwd=cwd, env=_env(log_dir), capture_output=True, text=True, timeout=TIMEOUT)


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, (done.stdout[-1500:], done.stderr[-3000:])


def _one_run(log_dir: Path, task: str) -> Path:
    runs = sorted((log_dir / task / "runs").iterdir())
    assert len(runs) == 1, runs  # every rank of the run in one directory
    return runs[0]


def _images(folder: Path) -> Path:
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (40 * i, 255 - 40 * i, 128)).save(folder / f"im{i}.png")
    return folder


def _every_command(launch: str, tmp_path: Path) -> None:
    """train -> evaluate -> robustify -> ood, each on two processes launched as ``launch`` says."""
    logs = tmp_path / "logs"
    _ok(_command("train.py", *TRAIN, *TRAINER[launch], log_dir=logs, cwd=tmp_path))
    train_run = _one_run(logs, "train")
    metrics = pd.read_csv(train_run / "csv" / "metrics.csv")
    assert {"val/acc", "train/loss_epoch", "test/acc"} <= set(metrics.columns)  # fit's and test's columns
    assert metrics["val/acc"].notna().any() and metrics["test/acc"].notna().any()
    assert list((train_run / "wandb").glob("offline-run-*"))
    ckpt = next((train_run / "checkpoints").glob("best-*.ckpt"))

    _ok(_command("evaluate.py", f"ckpt_path={ckpt}", *TRAINER[launch], "trainer.enable_progress_bar=false",
                 "data.test_subset=16", log_dir=logs, cwd=tmp_path))  # fmt: skip
    results = json.loads((_one_run(logs, "evaluate") / "results.json").read_text())
    assert results["n_images"] == 16 and "clean/acc" in results

    out = tmp_path / "robustified"
    robustify = [f"ckpt_path={ckpt}", f"input={_images(tmp_path / 'in')}", f"output={out}", *TRAINER[launch]]
    robustify += ["robustifier=none", "check_steps=1", "trainer.enable_progress_bar=false"]
    _ok(_command("robustify.py", *robustify, log_dir=logs, cwd=tmp_path))
    _one_run(logs, "robustify")
    report = pd.read_csv(out / "report.csv")
    assert len(report) == 4 and (report["status"] == "ok").all()

    _ok(_command("ood.py", f"ckpt_path={ckpt}", *OOD, *TRAINER[launch], log_dir=logs, cwd=tmp_path))
    ood = json.loads((_one_run(logs, "ood") / "results.json").read_text())
    assert set(ood["metrics"]) == {"msp", "mahalanobis"}


def test_every_command_with_script_launched_ddp(tmp_path):
    """``trainer=ddp`` re-runs the command for rank 1 with its rank 0's run directory; that rank
    must share the directory (not refuse it as an earlier run's and leave rank 0 waiting)."""
    _every_command("ddp", tmp_path)


@pytest.mark.slow
def test_every_command_with_spawned_workers(tmp_path):
    """``trainer=ddp_sim``: fit and test run in freshly spawned workers; the CSV logger of the test
    stage continues the file the fit stage wrote."""
    _every_command("ddp_sim", tmp_path)


@pytest.mark.slow
def test_training_on_spawned_workers_logs_fit_and_test_to_one_csv(tmp_path):
    logs = tmp_path / "logs"
    _ok(_command("train.py", "data=synthetic", *SHORT, *TRAINER["ddp_sim"], log_dir=logs, cwd=tmp_path))
    metrics = pd.read_csv(_one_run(logs, "train") / "csv" / "metrics.csv")
    assert metrics["val/acc"].notna().sum() == 1 and metrics["test/acc"].notna().sum() == 1


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "ddp_sim"])
def test_a_multirun_of_two_jobs(launch, tmp_path):
    """Two jobs, each on two processes: one sweep directory, each job's checkpoints and test
    metrics in its own job directory (script-launched ranks run their job alone)."""
    logs = tmp_path / "logs"
    done = _command(
        "train.py", "-m", "data=synthetic", *SHORT, "seed=0,1", *TRAINER[launch], log_dir=logs, cwd=tmp_path
    )
    _ok(done)
    (sweep,) = (logs / "train" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        assert pd.read_csv(sweep / job / "csv" / "metrics.csv")["test/acc"].notna().sum() == 1
    assert done.stdout.count("[safespot] test/acc") == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_srun_tasks_share_one_run_directory(tmp_path):
    """``srun`` starts both ranks of a 2-task job step as the same command: each names the run
    directory after the job step, so both work in one directory and rank 0 does not refuse it."""
    logs, port = tmp_path / "logs", str(_free_port())
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"}
    slurm |= {"SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "train"}
    slurm |= {"SLURM_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    cmd = [sys.executable, str(ROOT / "train.py"), *QUIET, "data=synthetic", *SHORT, *TRAINER["ddp"]]
    tasks = [
        subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=_env(logs, **slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        outputs = [task.communicate(timeout=TIMEOUT) for task in tasks]
    finally:
        for task in tasks:
            task.kill()
    for task, (stdout, stderr) in zip(tasks, outputs, strict=True):
        assert task.returncode == 0, (stdout[-1500:], stderr[-3000:])
    run = _one_run(logs, "train")
    assert run.name == "slurm-4242.0"
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert pd.read_csv(run / "csv" / "metrics.csv")["test/acc"].notna().sum() == 1
    assert "[safespot] test/acc" in outputs[0][0]


# --- the pieces, in-process -----------------------------------------------------------------
def test_ranks_and_launch_names_from_the_launchers_variables(monkeypatch):
    for name in [k for k in os.environ if k.startswith("SLURM_")] + ["RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"]:
        monkeypatch.delenv(name, raising=False)
    assert process_rank() == 0 and launch_id() is None
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank Lightning's script launcher started
    assert process_rank() == 1 and launch_id() is None
    monkeypatch.delenv("LOCAL_RANK")
    # a batch script's own process (no step) and a one-task step: one process, named after the job
    # (a requeued job finds its directory again)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert process_rank() == 0 and launch_id() == "slurm-7"
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert process_rank() == 0 and launch_id() == "slurm-7.3"
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    assert process_rank() == 1 and launch_id() == "slurm-7.3"
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive allocation: runs are named by time
    assert launch_id() is None


def test_the_csv_writer_of_a_later_stage_keeps_the_earlier_columns_and_rows(tmp_path):
    """A writer that has not seen the file's columns (a copy made before they were written, as
    spawned test workers get) adds its own and keeps every earlier row."""
    logger = CSVLogger(tmp_path, name="csv", version="")
    logger.log_hyperparams({"lr": 0.1})
    before_fit = logger.experiment.__class__.__new__(logger.experiment.__class__)
    before_fit.__dict__.update({**logger.experiment.__dict__, "metrics": [], "metrics_keys": []})
    logger.log_metrics({"val/acc": 0.5}, step=1)
    logger.save()
    logger._experiment = before_fit  # the test stage's copy of the writer
    logger.log_metrics({"test/acc": 0.25}, step=2)
    logger.save()
    rows = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    assert list(rows.columns) == ["step", "test/acc", "val/acc"]
    assert rows["val/acc"].tolist()[0] == 0.5 and rows["test/acc"].tolist()[1] == 0.25
