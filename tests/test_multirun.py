"""Hydra multirun with DDP strategies, through the command line (real ``ddp`` re-launches
the script, so it can only be tested in a subprocess). CPU, 2 processes per job."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _sweep(strategy: str, log_dir: Path) -> tuple[list[Path], list[str]]:
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "data=synthetic",
        f"trainer={strategy}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "seed=0,1",
        "debug=limit",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "extras.print_config=false",
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "LOG_DIR": str(log_dir)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweeps = sorted((log_dir / "debug" / "multiruns").iterdir())
    return sweeps, re.findall(r"\[safespot\] (test/acc .*)", proc.stdout)


@pytest.mark.slow
def test_multirun_with_ddp_spawn_and_plain_ddp(tmp_path):
    spawn_sweeps, spawn_results = _sweep("ddp_spawn", tmp_path / "spawn")
    assert len(spawn_sweeps) == 1
    for job in ("0", "1"):
        assert (spawn_sweeps[0] / job / "checkpoints" / "last.ckpt").is_file()
    ddp_sweeps, ddp_results = _sweep("ddp", tmp_path / "ddp")
    # same training results, and one sweep directory: each job's rank 1 runs that job alone
    assert ddp_results == spawn_results and len(ddp_results) == 2
    assert len(ddp_sweeps) == 1
    for job in ("0", "1"):
        assert (ddp_sweeps[0] / job / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_optuna_hparams_search_runs_trials_and_reports_the_best(tmp_path):
    """hparams_search=adv_lr: the Optuna sweeper maximises the value train.py returns."""
    cmd = [sys.executable, "train.py", "hparams_search=adv_lr", "data=synthetic", "debug=fast_dev_run"]
    cmd += ["logger=none", "trainer.enable_progress_bar=false", "extras.print_config=false"]
    cmd += ["hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2"]
    cmd += [f"hydra.sweeper.storage=sqlite:///{tmp_path}/study.db"]  # a study that can be shared or resumed
    env = {**__import__("os").environ, "LOG_DIR": str(tmp_path)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (sweep,) = (tmp_path / "debug" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    results = (sweep / "optimization_results.yaml").read_text()
    assert "scheduler.max_lr" in results and "optimizer.weight_decay" in results and "best_value" in results
    import optuna

    study = optuna.load_study(study_name="adv_lr", storage=f"sqlite:///{tmp_path}/study.db")
    assert len(study.trials) == 2


def test_the_optuna_sweepers_sqlite_storage_records_trials(tmp_path):
    """``hydra.sweeper.storage=sqlite:///...`` (the documented way to share or resume a study): the
    pinned optuna 2.10 keeps its trials in SQLite (it failed on SQLAlchemy 2)."""
    import optuna

    storage = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(storage=storage, study_name="adv_lr", direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("lr", 0.0, 1.0), n_trials=2)
    assert len(optuna.load_study(study_name="adv_lr", storage=storage).trials) == 2
