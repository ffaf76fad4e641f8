"""The SLURM path on one machine: Hydra's submitit launcher in its local mode pickles each job and
runs it in a process of its own, as submitit_slurm does on a cluster (conf/hydra/launcher/slurm.yaml
is that launcher with SLURM's resources). A 2-job multirun of training, then of evaluation on the
two checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["data=synthetic", "model.backbone.width=8", "method=natural", "trainer=cpu", "trainer.max_epochs=1"]
TRAIN += ["logger=csv", "trainer.enable_progress_bar=false", "extras.print_config=false"]


def _multirun(script: str, args: list[str], tmp_path: Path) -> Path:
    env = {**os.environ, "LOG_DIR": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / script), "-m", "hydra/launcher=submitit_local", *args]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (tmp_path / "logs" / script.removesuffix(".py") / "multiruns").iterdir()
    return sweep


@pytest.mark.slow
def test_a_submitit_multirun_trains_two_jobs_and_evaluates_both(tmp_path):
    sweep = _multirun("train.py", [*TRAIN, "seed=0,1"], tmp_path)
    ckpts = [sweep / job / "checkpoints" / "last.ckpt" for job in ("0", "1")]
    assert all(ckpt.is_file() for ckpt in ckpts)
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # each job pickled and run apart
    evaluations = _multirun(
        "evaluate.py",
        [f"ckpt_path={ckpts[0]},{ckpts[1]}", "evaluation=[clean]", "trainer=cpu", "data.test_subset=16",
         "trainer.enable_progress_bar=false", "extras.print_config=false"],
        tmp_path,
    )  # fmt: skip
    for job in ("0", "1"):
        assert (evaluations / job / "records.csv").is_file() and (evaluations / job / "results.json").is_file()
