"""End-to-end training on synthetic data: every method, resume, evaluation, loggers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safespot.errors import ConfigError
from safespot.evaluate import evaluate
from safespot.train import train
from wandb_offline import read_offline_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "method",
    ["natural", "adversarial", "fast_adversarial", "preemptive", "preemptive_fast", "spgd_fast", "trades", "gaussian"],
)
@pytest.mark.parametrize("threat", ["linf_8", "l2_0.5"])
def test_fast_dev_run_each_method(make_cfg, method, threat):
    cfg = make_cfg(f"method={method}", f"threat={threat}", "debug=fast_dev_run", "logger=none")
    metrics, objs = train(cfg)
    assert {"train/loss_step", "val/acc", "test/acc", "test/robust_acc"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert objs["trainer"].global_step == 1


def _fit(make_cfg, tmp_path, name, *overrides):
    cfg = make_cfg("trainer.max_epochs=2", "data.n_train=512", *overrides, out=tmp_path / name)
    return train(cfg)


def test_resume_matches_uninterrupted_run(make_cfg, tmp_path):
    common = ("method=adversarial", "threat.steps=2", "trainer.deterministic=true", "data.train_subset=256")
    full, objs_full = _fit(make_cfg, tmp_path, "full", *common)
    first, objs_first = _fit(make_cfg, tmp_path, "first", *common, "trainer.max_epochs=1", "test=false")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    resumed, objs_resumed = _fit(make_cfg, tmp_path, "resumed", *common, f"ckpt_path={last}")
    a = objs_full["method"].net.state_dict()
    b = objs_resumed["method"].net.state_dict()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key
    assert resumed["val/acc"] == pytest.approx(full["val/acc"], abs=1e-6)
    assert resumed["train/loss_epoch"] == pytest.approx(full["train/loss_epoch"], rel=1e-5)


def test_evaluate_reproduces_train_time_test_accuracy(make_cfg, tmp_path):
    metrics, objs = _fit(make_cfg, tmp_path, "train", "method=adversarial", "threat.steps=2")
    best = objs["best_path"]
    assert best and Path(best).is_file()
    cfg = make_cfg(f"ckpt_path={best}", "trainer.enable_progress_bar=false", name="evaluate", out=tmp_path / "eval")
    results = evaluate(cfg)
    assert results["clean/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["clean/acc"] == results["clean/acc"] and 0 <= saved["pgd/acc"] <= saved["clean/acc"]
    assert saved["n_images"] == 128


def test_adversarial_training_is_more_robust_than_natural(make_cfg, tmp_path):
    common = (
        "trainer.max_epochs=6",
        "threat.eps=0.05",
        "threat.step_size=0.0125",
        "threat.steps=5",
        "optimizer.lr=0.05",
        "callbacks=none",
        "data.n_train=1024",
    )
    natural, _ = _fit(make_cfg, tmp_path, "nat", "method=natural", *common)
    adversarial, _ = _fit(make_cfg, tmp_path, "adv", "method=adversarial", *common)
    assert natural["test/acc"] > 0.9  # the synthetic task is learnable
    assert adversarial["test/robust_acc"] > natural["test/robust_acc"] + 0.5


def test_wandb_offline_run_holds_summary_metrics(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg("debug=limit", "logger=wandb", "method=natural", out=tmp_path / "wb")
    metrics, _ = train(cfg)
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = read_offline_run(runs[0])
    assert run["complete"], "the run file has no exit record"
    summary = run["summary"]
    assert summary["val/acc"] == pytest.approx(metrics["val/acc"])
    assert summary["test/acc"] == pytest.approx(metrics["test/acc"])
    assert run["config"]["threat"]["norm"] == "linf"
    assert run["config"]["data"]["_target_"].endswith("SyntheticDataModule")
    assert len(run["history"]) >= 2
    # a file still being flushed (cut mid-record) reads as incomplete instead of failing
    (run_file,) = runs[0].glob("run-*.wandb")
    cut = tmp_path / "cut" / runs[0].name
    cut.mkdir(parents=True)
    (cut / run_file.name).write_bytes(run_file.read_bytes()[: run_file.stat().st_size // 2 + 3])
    partial = read_offline_run(cut, timeout_s=0)
    assert not partial["complete"] and len(partial["history"]) < len(run["history"])
    import wandb

    assert wandb.run is None  # the task wrapper closed it


@pytest.mark.parametrize(
    "override,match",
    [
        ("threat.norm=l1", "threat.norm must be one of"),
        ("threat.eps=-0.1", "threat.eps must be > 0"),
        ("threat.step_size=0", "threat.step_size must be > 0"),
        ("threat.steps=0", "threat.steps must be an integer >= 1"),
        ("data.batch_size=63 trainer.devices=2", "data.batch_size=63"),
        ("ckpt_path=/nonexistent/last.ckpt", "ckpt_path"),
        ("init_from=/nonexistent/last.ckpt", r"^init_from='/nonexistent/last\.ckpt' does not exist"),
        ("init_from=/tmp", r"^init_from='/tmp' is a directory, not a checkpoint file"),
        ("threat.eps=8", r"threat\.eps=8 is above 1 for norm linf.*threat\.eps=8/255"),
        ("trainer=ddp_sim data.test_subset=1", r"data\.test_subset=1 is fewer images than the 2 processes"),
        ("trainer=ddp_sim data.val_subset=1", r"data\.val_subset=1 is fewer images than the 2 processes"),
        ("trainer=ddp_sim data.val_size=1", r"data\.val_size=1 is fewer images than the 2 processes"),
    ],
)
def test_bad_settings_fail_before_any_work(make_cfg, override, match):
    cfg = make_cfg(*override.split())
    with pytest.raises(ConfigError, match=match):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "splits.json").exists()


def test_cli_reports_bad_input_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "data=synthetic", "threat.norm=l3", "logger=none", f"paths.log_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "error: threat.norm must be one of ['linf', 'l2'], got 'l3'" in proc.stderr
    assert "Traceback" not in proc.stderr
    missing = subprocess.run(
        [
            sys.executable,
            "train.py",
            "data=cifar10",
            "data.download=false",  # the tests reach no network: a missing copy is then one error
            f"paths.data_dir={tmp_path}/none",
            "logger=none",
            f"paths.log_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "data.root=" in missing.stderr and "does not exist" in missing.stderr


def test_default_callbacks_progress_summary_and_learning_rate(make_cfg, tmp_path):
    """What template users expect: a progress bar (plain lines here, where stdout is captured, not a
    terminal) and the Rich model summary, following the trainer's switches, and the learning rate
    logged per epoch (idle without a logger)."""
    from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar

    from safespot.utils.callbacks import LearningRateMonitor
    from safespot.utils.progress import PlainProgressBar

    cfg = make_cfg(
        "debug=limit",
        "method=natural",
        "logger=csv",
        "trainer.enable_progress_bar=true",
        "trainer.enable_model_summary=true",
        out=tmp_path / "rich",
    )
    _, objs = train(cfg)
    kinds = {type(c) for c in objs["trainer"].callbacks}
    assert {PlainProgressBar, RichModelSummary, LearningRateMonitor} <= kinds
    (metrics_file,) = (tmp_path / "rich").rglob("metrics.csv")
    assert any(column.startswith("lr-") for column in metrics_file.read_text().splitlines()[0].split(","))
    quiet = make_cfg("debug=limit", "method=natural", out=tmp_path / "quiet")  # logger none, bar and summary off
    _, objs = train(quiet)
    kinds = {type(c) for c in objs["trainer"].callbacks}
    assert LearningRateMonitor in kinds and not {PlainProgressBar, RichProgressBar, RichModelSummary} & kinds


def test_ranked_logger_speaks_on_rank_zero_only(caplog, monkeypatch):
    from lightning.pytorch.utilities import rank_zero_only

    from safespot.utils.logging import get_logger

    log = get_logger("safespot.test")
    with caplog.at_level("INFO", logger="safespot.test"):
        log.info("from rank zero")
        monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
        log.info("from rank one")
    assert [r.getMessage() for r in caplog.records] == ["from rank zero"]


@pytest.mark.parametrize("mode, offline", [(None, True), ("offline", True), ("online", False), ("disabled", True)])
def test_wandb_mode_comes_from_the_environment(make_cfg, monkeypatch, mode, offline):
    if mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", mode)
    cfg = make_cfg("logger=wandb")
    assert cfg.logger.wandb.offline is offline
