"""The paper 003 reduced-reproduction script: the commands it runs and the report it renders."""

import argparse
import importlib.util
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import fake_subprocess

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reproduce003", ROOT / "scripts" / "reproduce_paper003.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)

NS = [1, 32]


def _fake_records(folder: Path, pgd_rates: dict[int, float], seed: int, n: int = 200) -> Path:
    """Records with the given PGD accuracy per n (prediction smoothing); the other rules and the
    clean sweep a little lower / higher."""
    rng = np.random.default_rng(seed)
    base = rng.random(n)
    table = {"index": np.arange(100, 100 + n)}
    for kind, shift in (("votes", 0.3), ("votes_pgd", 0.0)):
        for rule, penalty in (("majority", 0.0), ("soft", 0.02), ("weighted", 0.04)):
            for k, rate in pgd_rates.items():
                table[f"{kind}_{rule}_n{k}/correct"] = base < rate + shift - penalty
    folder.mkdir(parents=True)
    pd.DataFrame(table).to_csv(folder / "records.csv", index=False)
    return folder


def test_report_gives_intervals_and_verdicts_per_claim(tmp_path):
    evals = {
        "cifar10_adv_resnet20": _fake_records(tmp_path / "adv", {1: 0.40, 32: 0.41}, 0),
        "cifar10_pni_w": _fake_records(tmp_path / "pni", {1: 0.35, 32: 0.55}, 1),
        "cifar10_cni_w": _fake_records(tmp_path / "cni", {1: 0.45, 32: 0.45}, 2),
    }
    args = argparse.Namespace(
        ns=NS, seed=0, sigma=0.12, m_attack=8, noisy_init="adv", finetune_epochs=4, finetune_lr=0.02
    )
    text = reproduce.render(evals, ["python train.py experiment=cifar10_cni_w"], args)
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("| (a) | PNI-W: PGD-20"))
    assert row.endswith("| holds |") and re.search(r"\| \+(1[5-9]|2\d)\.\d pp", row)  # about +20 points
    row = next(line for line in lines if line.startswith("| (a) | CNI-W: PGD-20"))
    assert row.endswith("| inconclusive at this scale |")  # no change, but too few images to exclude a 1 pp gain
    row = next(line for line in lines if line.startswith("| (b) | PGD gain of PNI-W"))
    assert row.endswith("| holds |")
    row = next(line for line in lines if line.startswith("| (c) | PNI-W: PGD-20, prediction minus weighted"))
    assert row.endswith("| holds |")  # 4 points better on a superset of images
    same = {p: d for p, d in evals.items()}
    table = pd.read_csv(evals["cifar10_cni_w"] / "records.csv")
    for rule in ("soft", "weighted"):
        for k in NS:
            table[f"votes_pgd_{rule}_n{k}/correct"] = table[f"votes_pgd_majority_n{k}/correct"]
    same["cifar10_cni_w"] = tmp_path / "cni_same"
    same["cifar10_cni_w"].mkdir()
    table.to_csv(same["cifar10_cni_w"] / "records.csv", index=False)
    lines_same = reproduce.render(same, [], args).splitlines()
    row = next(line for line in lines_same if line.startswith("| (c) | CNI-W: PGD-20, prediction minus soft"))
    # the same vote on every image: the interval reaches just past the -1 pp non-inferiority margin
    assert "+0.0 pp [-1.0, +1.0]" in row and row.endswith("| inconclusive at this scale |")
    assert "| PNI-W | 32 |" in text and "| CNI-W | weighted |" in text and "60.4%" in text
    assert "python train.py experiment=cifar10_cni_w" in text


def test_models_train_at_the_reduced_resnet20_scale_and_share_the_test_images(tmp_path, monkeypatch):
    commands = fake_subprocess(
        monkeypatch, lambda cmd, out: _fake_records(out, {1: 0.4, 4: 0.42, 8: 0.43, 16: 0.44, 32: 0.45}, 0)
    )
    assert reproduce.main(["--out", str(tmp_path / "new"), "--test-images", "200"]) == 0
    trained = [cmd for cmd in commands if cmd[1] == "train.py"]
    assert [cmd[2:4] for cmd in trained] == [[f"experiment={p}", "scale=reduced_resnet20"] for p in reproduce.MODELS]
    # paper 003, Section 4: the noise-injected models are fine-tuned from the plain model's best checkpoint
    plain = next(tmp_path.glob("new/train/cifar10_adv_resnet20/checkpoints/best-*.ckpt"))
    assert not any(c.startswith("init_from=") for c in trained[0])
    for cmd in trained[1:]:
        assert f"init_from={plain}" in cmd and "trainer.max_epochs=4" in cmd and "scheduler.max_lr=0.02" in cmd
    evaluated = [cmd for cmd in commands if cmd[1] == "evaluate.py"]
    assert all("evaluation=[votes,votes_pgd]" in cmd and "data.test_subset=200" in cmd for cmd in evaluated)
    assert (tmp_path / "new" / "report.md").is_file()


def test_noisy_models_from_scratch_or_after_a_reused_plain_evaluation(tmp_path, monkeypatch):
    """``--noisy-init scratch`` trains every model from scratch; with the plain model's evaluation
    reused, the fine-tune starts from the checkpoint that evaluation ran on."""
    import json

    commands = fake_subprocess(monkeypatch, lambda cmd, out: _fake_records(out, {1: 0.4, 32: 0.45}, 0))
    assert reproduce.main(["--out", str(tmp_path / "a"), "--ns", "1,32", "--noisy-init", "scratch"]) == 0
    assert not any(c.startswith("init_from=") for cmd in commands for c in cmd)
    reused = _fake_records(tmp_path / "adv_eval", {1: 0.4, 32: 0.45}, 0)
    ckpt = tmp_path / "adv.ckpt"
    ckpt.write_bytes(b"")
    (reused / "results.json").write_text(json.dumps({"meta": {"ckpt_path": str(ckpt)}}))
    commands.clear()
    argv = ["--out", str(tmp_path / "b"), "--ns", "1,32", "--reuse-eval", f"cifar10_adv_resnet20={reused}"]
    assert reproduce.main(argv) == 0
    trained = [cmd for cmd in commands if cmd[1] == "train.py"]
    assert len(trained) == 2 and all(f"init_from={ckpt}" in cmd for cmd in trained)


def test_bad_arguments_fail_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("LOG_DIR", str(tmp_path))
    bad = (["--ns", "0,4"], ["--ns", "a"], ["--test-images", "0"], ["--reuse", "cifar10_unknown=/x"],
           ["--finetune-epochs", "0"], ["--finetune-lr", "0"], ["--noisy-init", "pni"])  # fmt: skip
    for argv in bad:
        with pytest.raises(SystemExit):
            reproduce.main(argv)
    with pytest.raises(SystemExit, match="no best checkpoint"):
        reproduce.main(["--reuse", f"cifar10_cni_w={tmp_path}"])
    assert not (tmp_path / "reproduce_paper003").exists()


def test_learned_noise_levels_are_read_from_the_checkpoint(tmp_path):
    """PNI-W: |alpha|; CNI-W: the root mean variance of the colored noise over std(W)."""
    import torch

    from safespot.models.noise_injection import NoisyConv2d

    torch.manual_seed(0)
    pni = NoisyConv2d(3, 4, 3, noise="pni_w", alpha=-0.1)
    cni = NoisyConv2d(3, 4, 3, noise="cni_w", rank=2)
    state = {f"a.{k}": v for k, v in pni.state_dict().items()} | {f"b.{k}": v for k, v in cni.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "m.ckpt")
    levels = reproduce.noise_levels(tmp_path / "m.ckpt")
    draws = cni.weight_noise(20000)  # the empirical spread of CNI-W's noise, relative to std(W)
    empirical = float(draws.pow(2).mean().sqrt() / cni.weight.std())
    assert levels[0] == pytest.approx(0.1) and levels[1] == pytest.approx(empirical, rel=0.02)
