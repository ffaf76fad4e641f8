"""Every entry point end to end on the test device (CUDA by default; ``SAFESPOT_TEST_DEVICE=cpu``
for a dry run): training in fp32 and bf16, evaluation with AutoAttack and the white-box
preemptive evaluation, CERTIFY, robustify.py on PNG files, ood.py with the safe-spot score, the
FLSS rejection evaluation, and the same evaluation on the CPU and on the device agreeing.

Tiny data and settings throughout: the point is the device paths, not the numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import SYNTHETIC, compose_config
from safespot.evaluate import evaluate
from safespot.evaluation.rejection_metrics import rejection_metrics
from safespot.ood.evaluate import evaluate_ood
from safespot.train import train
from safespot.utils.checkpoint import load_checkpoint

# one intra-op thread: the CPU work here is many tiny passes (and a CPU dry run shares its cores)
pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[2]
EPS = 8 / 255  # linf_8, the training threat of the checkpoints below
TOL = 1e-5
SIZE = 16  # the synthetic data's image size
TINY_DATA = ["data.n_train=256", "data.val_size=32", "data.n_test=64", "data.batch_size=64", "data.eval_batch_size=64"]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
# AutoAttack (all four members of the standard version) at a tiny budget
AA_SMALL = ("n_iter=3", "square_queries=20")
# the safe-spot search at a tiny schedule
SEARCH_SMALL = ("max_iter=4", "inner_steps=3", "beta=0.05")


def accelerator(device: torch.device) -> list[str]:
    """Trainer overrides that put train.py / evaluate.py / robustify.py on ``device``."""
    if device.type == "cpu":
        return ["trainer.accelerator=cpu", "trainer.devices=1"]
    return ["trainer.accelerator=gpu", f"trainer.devices={[device.index] if device.index is not None else 1}"]


def accuracies(results: dict) -> dict[str, float]:
    return {k: v for k, v in results.items() if k.endswith("/acc")}


def assert_accuracies_in_unit_interval(results: dict) -> None:
    accs = accuracies(results)
    assert accs, "no accuracies in the results"
    bad = {k: v for k, v in accs.items() if not (isinstance(v, float | int) and 0 <= v <= 1)}
    assert not bad, f"accuracies outside [0, 1]: {bad}"


def evaluate_on(device: torch.device, ckpt: Path, out: Path, *overrides: str) -> tuple[dict, pd.DataFrame]:
    cfg = compose_config("evaluate", [f"ckpt_path={ckpt}", *accelerator(device), *QUIET, *overrides], out)
    results = evaluate(cfg)
    assert (out / "results.json").is_file() and (out / "records.csv").is_file()
    return results, pd.read_csv(out / "records.csv")


# --- checkpoints trained on the device ------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, device):
    """``trained(precision)``: ``(metrics, objects, run_dir)`` of one epoch of PGD-2 adversarial
    training of the small CNN on synthetic data on the device (each precision trained once)."""
    runs: dict[str, tuple] = {}

    def run(precision: str) -> tuple:
        if precision not in runs:
            out = tmp_path_factory.mktemp(f"train_{precision}")
            overrides = [*SYNTHETIC, *accelerator(device), *TINY_DATA, "method=adversarial", "threat.steps=2"]
            overrides += ["method.val_attack.steps=2", "method.test_attack.steps=2"]
            overrides += ["trainer.max_epochs=1", f"trainer.precision={precision}"]
            metrics, objs = train(compose_config("train", overrides, out))
            runs[precision] = (metrics, objs, out)
        return runs[precision]

    return run


@pytest.fixture(scope="module")
def ckpt(trained) -> Path:
    _, _, out = trained("32-true")
    return out / "checkpoints" / "last.ckpt"  # (trainer.test restores the callback's state from the best one)


@pytest.fixture(scope="module")
def flss_ckpt(tmp_path_factory, device) -> Path:
    out = tmp_path_factory.mktemp("flss")
    overrides = [*SYNTHETIC, *accelerator(device), *TINY_DATA, "method=flss", "model=flss_small_cnn"]
    overrides += ["model.backbone.width=4", "trainer.max_epochs=1", "threat.steps=1", "method.val_attack.steps=1"]
    _, objs = train(compose_config("train", [*overrides, "test=false"], out))
    assert objs["trainer"].strategy.root_device.type == device.type
    return out / "checkpoints" / "last.ckpt"


# --- train.py --------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_train_one_epoch(trained, device, precision):
    metrics, objs, out = trained(precision)
    trainer = objs["trainer"]
    assert trainer.strategy.root_device.type == device.type
    assert str(trainer.precision) == precision
    assert trainer.current_epoch == 1 and trainer.global_step == trainer.num_training_batches > 0
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    for key in ("val/acc", "test/acc", "test/robust_acc"):
        assert 0 <= metrics[key] <= 1, (key, metrics[key])
    assert metrics["test/robust_acc"] <= metrics["test/acc"] + 1 / 64
    assert (out / "splits.json").is_file() and Path(objs["best_path"]).is_file()
    checkpoint = load_checkpoint(out / "checkpoints" / "last.ckpt")
    weights = [v for k, v in checkpoint["state_dict"].items() if k.startswith("net.") and v.is_floating_point()]
    assert weights and all(torch.isfinite(w).all() for w in weights)
    assert checkpoint["safespot_config"]["trainer"]["precision"] == precision


# --- evaluate.py -----------------------------------------------------------------------------
def test_evaluate_clean_pgd_autoattack_and_white_box_preemptive(ckpt, device, tmp_path):
    out = tmp_path / "eval"
    aa = [f"++evaluation.autoattack.attack.{o}" for o in AA_SMALL]
    aa += [f"++evaluation.preempt_sfull.attacks.autoattack.{o}" for o in AA_SMALL]
    aa += [f"++evaluation.preempt_sfull.white_box.attacks.autoattack.{o}" for o in AA_SMALL]
    results, records = evaluate_on(
        device,
        ckpt,
        out,
        "evaluation=[clean,pgd,autoattack,preempt_sfull]",
        "data.test_subset=8",
        "evaluation.pgd.attack.steps=5",
        *aa,
        *[f"evaluation.preempt_sfull.robustifier.{o}" for o in SEARCH_SMALL],
        "evaluation.preempt_sfull.attacks.pgd.steps=5",
        "evaluation.preempt_sfull.white_box.eps_fractions=[0.5,1.0]",
        "evaluation.preempt_sfull.white_box.attacks.pgd.steps=5",
    )
    assert len(records) == 8 == results["n_images"] and records["index"].is_unique
    assert_accuracies_in_unit_interval(results)
    assert {"clean", "pgd", "autoattack", "preempt_sfull", "preempt_sfull_pgd"} <= set(results["meta"]["evaluations"])
    assert results["meta"]["precision"] == "32-true"
    assert results["clean/acc"] == pytest.approx(records["clean/correct"].mean())
    assert results["autoattack/acc"] == pytest.approx(records["autoattack/correct"].mean())
    # AutoAttack leaves misclassified images alone: it never repairs one
    assert (records["autoattack/correct"].astype(bool) <= records["clean/correct"].astype(bool)).all()
    assert results["worst_case/acc"] <= min(results["pgd/acc"], results["autoattack/acc"]) + 1e-9
    for name in ("pgd", "autoattack", "preempt_sfull", "preempt_sfull_pgd"):
        assert records[f"{name}/dist"].max() <= EPS + TOL, name  # inside the ball (x_o resp. x_r)
    # the white-box attack (reconstruction, then PGD and AutoAttack at eps' = f eps) ran on the device
    white = {k: v for k, v in results.items() if k.startswith("preempt_sfull_white") and k.endswith("/acc")}
    assert any("_pgd" in k for k in white) and any("_autoattack" in k for k in white), sorted(white)
    assert records["preempt_sfull/recon_dist"].max() <= 2 * EPS + TOL  # x_hat in B_delta(x_r), x_r in B_delta(x_o)
    for column in [c for c in records if c.startswith("preempt_sfull_white") and c.endswith("/correct")]:
        dist = column.replace("/correct", "/dist")
        if dist in records:  # a counted (broken) white-box example lies within B_eps(x_o)
            broken = ~records[column].astype(bool)
            assert (records.loc[broken, dist] <= EPS + TOL).all(), column
    for key in [k for k in white if k.endswith("_strict/acc")]:  # the strict rule can only count fewer
        base = key.replace("_strict/acc", "/acc")
        if base in results:
            assert results[key] >= results[base], key
    assert all(0 <= v <= 1 for k, v in results.items() if k.endswith(("/invalid_rate", "/safe_spot_rate")))
    assert records["preempt_sfull_8bit/dist"].max() <= EPS + 0.5 / 255 + TOL
    assert (out / "images" / "pgd.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "results.json").read_text())["autoattack/acc"] == results["autoattack/acc"]


def test_certify_with_smoothing(ckpt, device, tmp_path):
    out = tmp_path / "certify"
    results, records = evaluate_on(
        device,
        ckpt,
        out,
        "smoothing.sigma=0.25",
        "smoothing.n_vote=32",
        "smoothing.m=2",
        "smoothing.max_batch=128",  # several chunks per image
        "evaluation=[clean,certify]",
        "evaluation.certify.n0=16",
        "evaluation.certify.n=512",
        "evaluation.certify.alpha=0.05",
        "data.test_subset=12",
    )
    assert len(records) == 12 == results["n_images"]
    assert_accuracies_in_unit_interval(results)
    assert results["meta"]["smoothing"]["sigma"] == 0.25
    certified = [results[f"certify/cert_{r}"] for r in ("0", "0.25", "0.5", "0.75", "1")]
    assert certified == sorted(certified, reverse=True) and certified[0] == pytest.approx(results["certify/acc"])
    assert records["certify/pA_lower"].between(0, 1).all()
    correct = records["certify/correct"].astype(bool)
    assert (records.loc[correct, "certify/radius"] >= 0).all()
    table = pd.read_csv(out / "certified_accuracy.csv")
    assert table["radius"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert table["certify"].tolist() == pytest.approx(certified)
    assert (out / "certified_accuracy.png").read_bytes()[:4] == b"\x89PNG"


# --- robustify.py ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def png_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_robustify_cli_on_png_folder(ckpt, png_folder, device, tmp_path, precision):
    out = tmp_path / "robust"
    cmd = [sys.executable, "robustify.py", f"ckpt_path={ckpt}", f"input={png_folder}", f"output={out}"]
    cmd += [
        *accelerator(device),
        f"trainer.precision={precision}",
        "robustifier.max_iter=3",
        "robustifier.inner_steps=2",
    ]
    cmd += ["check_steps=2", *QUIET, "batch_size=3", f"paths.log_dir={tmp_path / 'logs'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 ok, 0 failed, 0 skipped" in proc.stdout, proc.stdout[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert torch.device(report["meta"]["device"]).type == device.type and report["meta"]["precision"] == precision
    assert len(report["files"]) == 4 and report["summary"]["ok"] == 4
    assert sorted(p.name for p in out.glob("*.png")) == [f"img{i}.png" for i in range(4)]
    for record in report["files"]:
        saved = Image.open(record["output"])
        assert saved.format == "PNG" and saved.size == (SIZE, SIZE)
        x_r = np.asarray(saved.convert("RGB"), dtype=np.int16)
        x_o = np.asarray(Image.open(record["input"]).convert("RGB"), dtype=np.int16)
        gap = int(np.abs(x_r - x_o).max())
        assert gap <= round(EPS * 255)  # inside B_delta(x_o) on the 8-bit grid
        assert record["distance"] == pytest.approx(gap / 255, abs=1e-6) and record["distance"] <= EPS + 1e-6
        assert record["protected"] == record["pred"] and record["iterations"] == 3


# --- ood.py ----------------------------------------------------------------------------------
def test_ood_safe_spot_score(ckpt, device, tmp_path):
    out = tmp_path / "ood"
    cfg = compose_config(
        "ood",
        [
            f"ckpt_path={ckpt}",
            *accelerator(device),
            *QUIET,
            "detector=[msp,safe_spot]",
            "detector.safe_spot.robustifier.max_iter=2",
            "detector.safe_spot.robustifier.inner_steps=2",
            "detector.safe_spot.attack.steps=2",
            "+outliers.noise={kind: uniform, n: 16}",
            "tune_outliers={kind: gaussian, n: 16}",
            "fit_subset=32",
            "tune_subset=16",
            "data.test_subset=16",
            "batch_size=8",
        ],
        out,
    )
    results = evaluate_ood(cfg)
    scores = pd.read_csv(out / "scores.csv")
    assert scores["set"].value_counts().to_dict() == {"in_distribution": 16, "noise": 16}
    assert {"msp", "safe_spot", "safe_spot/msp_adv", "safe_spot/dist"} <= set(scores.columns)
    assert np.isfinite(scores[["msp", "safe_spot", "safe_spot/msp_adv"]].to_numpy()).all()
    assert scores["safe_spot/dist"].max() <= EPS + TOL  # x_s* inside B_delta(x)
    assert scores["safe_spot"].between(-1, 0).all()  # -(mu MSP + (1 - mu) MSP_adv)
    saved = json.loads((out / "results.json").read_text())
    assert saved["tuned"]["safe_spot"]["mu"] in [i / 10 for i in range(11)]
    for detector in ("msp", "safe_spot"):
        metrics = saved["metrics"][detector]["noise"]
        assert 0 <= metrics["auroc"] <= 100 and 0 <= metrics["fpr95"] <= 100
        assert (out / "histograms" / f"{detector}.png").is_file()
    assert (out / "figure3.png").is_file() and results["metrics"]["safe_spot"] == saved["metrics"]["safe_spot"]


# --- the FLSS rejection evaluation -------------------------------------------------------------
def test_flss_rejection_evaluation(flss_ckpt, device, tmp_path):
    prefix = "evaluation.rejection_flss"
    small = [f"{prefix}.attacks.{a}.steps=2" for a in ("pgd", "pgd_cw", "pgd_eot")]
    small += [f"{prefix}.attacks.{a}.n_iter=2" for a in ("apgd_ce", "apgd_dlr", "apgd_ce_eot")]
    small += [f"{prefix}.attacks.pgd_eot.eot=2", f"{prefix}.attacks.apgd_ce_eot.eot_iter=2", f"{prefix}.n_samples=10"]
    small += [f"{prefix}.attacks.{a}.steps=2" for a in ("gama_pgd", "gama_mt", "mt_pgd")]
    small += [f"{prefix}.attacks.{a}.n_targets=2" for a in ("gama_mt", "mt_pgd")]
    results, records = evaluate_on(
        device, flss_ckpt, tmp_path / "rejection", "evaluation=[rejection_flss]", "data.test_subset=16", *small
    )
    assert len(records) == 16 == results["n_images"] and records["index"].is_unique
    assert_accuracies_in_unit_interval(results)
    score_columns = [c for c in records if c.endswith("/score")]
    assert any(c.endswith("_vote/score") for c in score_columns) and any("_pgd_ns" in c for c in score_columns)
    for column in score_columns:
        assert records[column].between(0, 1).all() and (records[column] > 0).all(), column
    for column in [c for c in records if c.endswith("/dist")]:
        assert records[column].max() <= EPS + TOL, column
    metrics = rejection_metrics(records, "rejection_flss", "vote")
    assert math.isfinite(metrics["fc"]) and 0 <= metrics["clean_rejected"] <= 100


# --- the same evaluation on the CPU and on the device -------------------------------------------
def test_cpu_and_device_evaluations_agree(ckpt, device, tmp_path):
    common = (
        "evaluation=[clean,pgd,preempt_sfull]",
        "data.test_subset=64",
        "evaluation.pgd.attack.steps=5",
        "~evaluation.preempt_sfull.attacks.autoattack",
        "evaluation.preempt_sfull.white_box=null",
        "evaluation.preempt_sfull.eight_bit=false",
        "evaluation.preempt_sfull.attacks.pgd.steps=5",
        *[f"evaluation.preempt_sfull.robustifier.{o}" for o in SEARCH_SMALL],
    )
    cpu_results, cpu_records = evaluate_on(torch.device("cpu"), ckpt, tmp_path / "cpu", *common)
    dev_results, dev_records = evaluate_on(device, ckpt, tmp_path / "device", *common)
    assert len(cpu_records) == len(dev_records) == 64
    assert cpu_records["index"].tolist() == dev_records["index"].tolist()
    pred_columns = [c for c in cpu_records if c.endswith("/pred")]
    assert {"clean/pred", "pgd/pred"} <= set(pred_columns) and set(pred_columns) <= set(dev_records)
    agreement = {c: float((cpu_records[c] == dev_records[c]).mean()) for c in pred_columns}
    assert all(a >= 0.95 for a in agreement.values()), agreement
    for key, value in accuracies(cpu_results).items():
        assert abs(dev_results[key] - value) <= 0.05 + 1e-9, (key, value, dev_results[key])
