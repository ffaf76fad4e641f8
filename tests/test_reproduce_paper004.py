"""The paper 004 Table 1 script: four rows on the same images with the clean image in every attack
set, bootstrap intervals per cell and paired verdicts on the paper's claims."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import fake_subprocess
from safespot.evaluation.rejection_metrics import load_row, rejection_metrics

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("paper004", ROOT / "scripts" / "reproduce_paper004.py")
paper004 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paper004)

ATTACKS = ["pgd", "apgd_ce"]


def _fake_eval(run: Path, name: str, views: list[str], robust: float, n: int = 120, seed: int = 0) -> None:
    """records.csv / results.json as a rejection evaluation writes them: clean correct on 80% of the
    images, every attack correct on the first ``robust`` share, confidence scores in (0, 1)."""
    rng = np.random.default_rng(seed)
    position = np.arange(n) / n
    table = {"index": np.arange(n)[::-1]}  # stored out of order: the script sorts by index
    for view in views:
        for point in ["clean", *ATTACKS]:
            correct = position < (0.8 if point == "clean" else robust)
            table[f"{name}_{point}_{view}/correct"] = correct
            table[f"{name}_{point}_{view}/score"] = rng.uniform(0.5, 1.0, n) * np.where(correct, 1.0, 0.7)
    run.mkdir(parents=True)
    pd.DataFrame(table).to_csv(run / "records.csv", index=False)
    config = {"_target_": "safespot.evaluation.rejection.RejectionEvaluation", "name": name, "views": views}
    config["attacks"] = {a: {} for a in ATTACKS}
    (run / "results.json").write_text(json.dumps({"meta": {"evaluation_config": {name: config}}}))


def test_the_script_trains_each_model_once_and_evaluates_four_rows(tmp_path, monkeypatch):
    robust = {"pgd_at": 0.4, "trades": 0.42, "flss_sd1": 0.6, "flss_sd2": 0.62}

    def evaluate(cmd, out):
        if "evaluation=[rejection_conf]" in cmd:
            _fake_eval(out, "rejection_conf", ["ns"], robust[out.name])
        else:
            _fake_eval(out, "rejection_flss", ["ns", "vote"], robust[out.name])

    commands = fake_subprocess(monkeypatch, evaluate)
    out = tmp_path / "new"
    args = ["--out", str(out), "--bootstrap", "200", "--train-override", "trainer.max_epochs=12"]
    args += ["--flss-override", "method/kl_weights=authors"]
    assert paper004.main([*args, "--drop-attack", "apgd_ce_eot"]) == 0
    trained = [c for c in commands if c[1] == "train.py"]
    assert [c[2] for c in trained] == [f"experiment=reduced_cifar10_{m}" for m in ("adv_linf", "trades_linf", "flss")]
    assert all("trainer.max_epochs=12" in c for c in trained)
    # the FLSS-only override reaches the FLSS training alone, and the report names the departure
    assert ["method/kl_weights=authors" in c for c in trained] == [False, False, True]
    flss = [c for c in commands if "evaluation=[rejection_flss]" in c]
    assert len(flss) == 2 and all("~evaluation.rejection_flss.attacks.apgd_ce_eot" in c for c in flss)
    assert "evaluation.rejection_flss.sd_scale=2" in flss[1]
    report = (out / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| FLSS (SD=1) vs PGD-AT: Acc_adv,10%"))
    assert row.endswith("| holds |")
    assert "| PGD-AT | Confidence | 80.0 [" in report  # Acc_nat,NS with its interval
    assert "| FLSS (SD=2) vs FLSS (SD=1): Acc_adv,10%: SD=2 higher |" in report
    assert "(this report's tolerance)" in report
    # each model's training as its run stored it; FLSS alone with the authors' weights, named
    assert "trained with: PGD-AT `seed=0 trainer.max_epochs=12`; TRADES `seed=0 trainer.max_epochs=12`; " in report
    assert "FLSS `seed=0 trainer.max_epochs=12 method/kl_weights=authors` (`method/kl_weights=authors`: " in report
    # a reused evaluation reports the training its checkpoint came from, not this call's flags
    again = tmp_path / "again"
    reuse = [f"--reuse-eval={r}={out / 'eval' / r}" for r in robust]
    assert paper004.main(["--out", str(again), "--bootstrap", "20", *reuse]) == 0
    assert "FLSS `seed=0 trainer.max_epochs=12 method/kl_weights=authors`" in (again / "report.md").read_text()
    assert "| FLSS (SD=2) | Maj. Vote |" in report and "83.80" in report  # the published rows


def test_the_bootstrap_is_paired_and_brackets_the_point_estimate(tmp_path):
    for row, robust in (("pgd_at", 0.4), ("flss_sd1", 0.6)):
        _fake_eval(tmp_path / row, "rejection_conf" if row == "pgd_at" else "rejection_flss",
                   ["ns"] if row == "pgd_at" else ["ns", "vote"], robust)  # fmt: skip
    rows = paper004._rows({r: tmp_path / r for r in ("pgd_at", "flss_sd1")})
    samples = paper004.bootstrap(rows, 300, seed=0)
    j = paper004.KEYS.index("acc_nat_0")
    point = rejection_metrics(rows["pgd_at"].records, rows["pgd_at"].name, rows["pgd_at"].view)["acc_nat_0"]
    low, high = np.quantile(samples["pgd_at"][:, j], [0.025, 0.975])
    assert low < point < high
    # both rows have the same clean correctness per image: paired resamples give a zero difference
    assert np.allclose(samples["pgd_at"][:, j], samples["flss_sd1"][:, j])
    assert load_row("x", tmp_path / "flss_sd1", "ns").view == "ns"


def test_bad_arguments_fail_before_any_work(tmp_path):
    for bad in (
        ["--test-images", "0"],
        ["--bootstrap", "3"],
        ["--train-override", "nokey"],
        ["--flss-override", "x"],
        ["--reuse", "gan=/x"],
    ):
        with pytest.raises(SystemExit):
            paper004.main([*bad, "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no best checkpoint"):
        paper004.main(["--reuse", f"flss={tmp_path}", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
