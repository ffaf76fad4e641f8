"""The Table 4 script (paper 000): per-seed trainings in order (the safe-spot OE fine-tune starts
from the preemptive model), ood.py with every detector, mean ± std over seeds, and a paired AUROC
verdict on near outliers."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from conftest import fake_subprocess, write_checkpoints
from safespot.ood.report import IN_DISTRIBUTION, detector_metrics
from safespot.stats import auroc, auroc_difference

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("table4", ROOT / "scripts" / "reproduce_table4.py")
table4 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table4)


def _fake_scores(run: Path, seed: int, safe_spot_edge: float) -> None:
    """scores.csv / results.json as ood.py writes them: the safe-spot score separates the near
    outliers by ``safe_spot_edge`` more than the baselines do."""
    rng = np.random.default_rng(seed)
    sets = [IN_DISTRIBUTION] * 100 + [table4.NEAR] * 60 + ["gaussian"] * 60
    outlier = np.array([s != IN_DISTRIBUTION for s in sets])
    frame = pd.DataFrame({"set": sets, "outlier": outlier})
    for det in table4.DETECTORS:
        shift = 1.0 + (safe_spot_edge if det == "safe_spot" else 0.0)
        frame[det] = rng.normal(size=len(sets)) + shift * outlier
    run.mkdir(parents=True)
    frame.to_csv(run / "scores.csv", index=False)
    (run / "results.json").write_text(json.dumps({"metrics": detector_metrics(frame, table4.DETECTORS)}))


def _fake_training(run: Path, accuracies: list[float]) -> None:
    write_checkpoints(run, ("last.ckpt", f"best-epoch{len(accuracies) - 1:03d}.ckpt"))
    (run / "csv").mkdir()
    pd.DataFrame({"epoch": range(len(accuracies)), "val/acc": accuracies}).to_csv(run / "csv" / "metrics.csv")


def test_trainings_run_in_order_and_the_report_gives_the_verdict(tmp_path, monkeypatch):
    def evaluate(cmd, out):
        _fake_scores(out, int(next(c for c in cmd if c.startswith("seed=")).split("=")[1]), 2.0)

    commands = fake_subprocess(monkeypatch, evaluate, train=lambda cmd, out: _fake_training(out, [0.5, 0.7]))
    out = tmp_path / "new"
    assert table4.main(["--out", str(out), "--seeds", "0,1"]) == 0
    trained = [cmd for cmd in commands if cmd[1] == "train.py"]
    assert [c[2] for c in trained[:4]] == [
        "experiment=reduced_cifar10_natural",
        "experiment=reduced_cifar10_oe",
        "experiment=cifar10_preemptive_linf",
        "experiment=reduced_cifar10_safe_spot_oe",
    ]
    finetune = trained[3]
    assert f"init_from={out / 'train' / 'preemptive_seed0' / 'checkpoints' / 'last.ckpt'}" in finetune
    assert "trainer.max_epochs=2" in finetune and "seed=0" in finetune
    ood = [cmd for cmd in commands if cmd[1] == "ood.py"]
    assert len(ood) == 2 and "detector=[msp,energy,mahalanobis,gram,oe,safe_spot]" in ood[0]
    assert f"detector.oe.ckpt_path={out / 'train' / 'oe_seed0' / 'checkpoints' / 'best-epoch001.ckpt'}" in ood[0]
    report = (out / "report.md").read_text()
    assert "± " in report and "| safe_spot_oe | 1 | 70.0 |" in report
    assert "| msp (not claimed) |" in report and "| mahalanobis |" in report  # per-seed differences too:
    row = next(line for line in report.splitlines() if "(near) | oe |" in line)
    assert len(row.split("|")[4].split(",")) == 2 and row.endswith("| holds |")
    assert "beats Mahalanobis, OE and Gram on near outliers: **holds**" in report
    # the training curves: a table of every epoch and the figure next to the report
    assert "| safe_spot_oe | 0 | val/acc | 50.0 | 70.0 |" in report
    assert "![validation accuracy and AUROC per epoch](training_curves.png)" in report
    assert (out / "training_curves.png").stat().st_size > 0


def test_the_docs_copy_points_to_its_curves_under_docs_figures(tmp_path, monkeypatch):
    fake_subprocess(
        monkeypatch, lambda cmd, out: _fake_scores(out, 0, 1.0), lambda cmd, out: _fake_training(out, [0.4, 0.6])
    )
    docs = tmp_path / "docs" / "table4.md"
    docs.parent.mkdir()
    assert table4.main(["--out", str(tmp_path / "r"), "--seeds", "0", "--docs", str(docs)]) == 0
    assert "](figures/table4_training_curves.png)" in docs.read_text()
    assert (docs.parent / "figures" / "table4_training_curves.png").is_file()
    assert "](training_curves.png)" in (tmp_path / "r" / "report.md").read_text()


def test_a_reused_seed_reports_its_kept_logs_at_the_epochs_its_ood_run_used(tmp_path, monkeypatch, capsys):
    """A seed whose ood.py run is reused trains nothing; with ``--reuse-logs`` its models' kept
    CSV logs (no checkpoints, as in docs/records) give the accuracy table and the curves, each at
    the epoch of the checkpoint the reused results.json names, not the last one."""
    commands = fake_subprocess(
        monkeypatch,
        lambda cmd, out: _fake_scores(out, int(next(c for c in cmd if c.startswith("seed=")).split("=")[1]), 2.0),
        lambda cmd, out: _fake_training(out, [0.5, 0.7]),
    )
    kept, reused = tmp_path / "kept" / "train", tmp_path / "kept" / "eval"
    _fake_scores(reused, 0, 2.0)
    results = json.loads((reused / "results.json").read_text())
    results["ckpt_path"] = "/gone/safe_spot_oe_seed0/checkpoints/best-epoch001.ckpt"
    results["detector_checkpoints"] = {
        "msp": {"ckpt_path": "/gone/natural_seed0/checkpoints/best-epoch002.ckpt"},
        "oe": {"ckpt_path": "/gone/oe_seed0/checkpoints/best-epoch000.ckpt"},
        "safe_spot": {"ckpt_path": results["ckpt_path"]},  # ood.py names the main model too
    }
    (reused / "results.json").write_text(json.dumps(results))
    curves = {"natural": [0.3, 0.4, 0.9, 0.5], "oe": [0.61, 0.2], "safe_spot_oe": [0.1, 0.65, 0.3]}
    for run, accuracies in curves.items():
        (kept / f"{run}_seed0" / "csv").mkdir(parents=True)
        frame = pd.DataFrame({"epoch": range(len(accuracies)), "val/acc": accuracies})
        frame.to_csv(kept / f"{run}_seed0" / "csv" / "metrics.csv")
    (kept / "preemptive_seed0" / "csv").mkdir(parents=True)
    pd.DataFrame({"epoch": [0, 1], "val/acc": [0.2, 0.45]}).to_csv(kept / "preemptive_seed0" / "csv" / "metrics.csv")
    out = tmp_path / "r"
    argv = ["--out", str(out), "--seeds", "0,1", "--reuse-eval", f"0={reused}", "--reuse-logs", f"0={kept}"]
    assert table4.main(argv) == 0
    assert not any("seed=0" in cmd for cmd in commands)  # seed 0 trains and scores nothing
    report = (out / "report.md").read_text()
    selected = (
        "| natural | 0 | 90.0 |",
        "| oe | 0 | 61.0 |",
        "| safe_spot_oe | 0 | 65.0 |",
        "| preemptive | 0 | 45.0 |",
    )
    assert all(row in report for row in selected)
    assert "| safe_spot_oe | 1 | 70.0 |" in report  # the seed trained here as before
    assert "| natural | 0 | val/acc | 30.0 | 40.0 | 90.0 | 50.0 |" in report  # its curve, every epoch
    with pytest.raises(SystemExit):
        table4.main(
            [
                "--out",
                str(tmp_path / "o"),
                "--seeds",
                "0",
                "--reuse-eval",
                f"0={reused}",
                "--reuse-logs",
                f"0={tmp_path}",
            ]
        )
    assert "no <run>_seed0/csv/metrics.csv there" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # logs only for a seed whose evaluation is reused
        table4.main(["--out", str(tmp_path / "o"), "--seeds", "0", "--reuse-logs", f"0={kept}"])
    assert "only for a seed whose ood.py run is reused" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_safe_spot_score_no_better_than_the_baselines_is_not_called_a_win(tmp_path, monkeypatch):
    fake_subprocess(
        monkeypatch, lambda cmd, out: _fake_scores(out, 0, -1.0), lambda cmd, out: _fake_training(out, [0.4])
    )
    assert table4.main(["--out", str(tmp_path / "r"), "--seeds", "0", "--safe-spot-oe", "scratch"]) == 0
    report = (tmp_path / "r" / "report.md").read_text()
    assert "on near outliers: **does not hold**" in report and "trained from scratch" in report


def test_auroc_matches_torchmetrics_and_the_paired_bootstrap_brackets_the_difference():
    rng = np.random.default_rng(0)
    positive = np.arange(300) >= 200
    a = rng.normal(size=300) + 1.5 * positive
    b = rng.normal(size=300) + 0.5 * positive
    expected = binary_auroc(torch.tensor(a), torch.tensor(positive.astype(int))).item()
    assert auroc(a, positive) == pytest.approx(expected, abs=1e-6)
    tied = np.round(a)  # ties count one half, as in torchmetrics
    expected = binary_auroc(torch.tensor(tied), torch.tensor(positive.astype(int))).item()
    assert auroc(tied, positive) == pytest.approx(expected, abs=1e-6)
    diff = auroc_difference([(a, b, positive)], n_boot=500)
    assert diff.low < diff.value < diff.high and diff.low > 0  # a separates far better than b
    same = auroc_difference([(a, a, positive)], n_boot=100)
    assert same.value == same.low == same.high == 0


def test_bad_arguments_fail_before_any_work(tmp_path):
    for bad in (["--seeds", "0,x"], ["--seeds", "1,1"], ["--finetune-epochs", "0"], ["--reuse", "oe@7=/x"]):
        with pytest.raises(SystemExit):
            table4.main([*bad, "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no best checkpoint"):
        table4.main(["--seeds", "0", "--reuse", f"oe@0={tmp_path}", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
