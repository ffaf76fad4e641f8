"""The demo (make demo) and the statistics every report uses."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from safespot.demo import ROBUSTIFIED, main, new_directory, run_demo
from safespot.stats import SMALLEST_EFFECT, accuracy, paired_difference, verdict

QUICK = [
    "data=synthetic",
    "data.val_size=64",
    "data.train_subset=null",
    "data.val_subset=null",
    "data.test_subset=null",
    "data.num_workers=0",
    "model.backbone.width=8",
    "logger=none",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "extras.print_config=false",
]
QUICK_EVAL = [
    "trainer.enable_progress_bar=false",
    "evaluation.preempt_sfull_fast.robustifier.max_iter=2",
    "evaluation.preempt_sfull_fast.robustifier.inner_steps=2",
    "evaluation.preempt_sfull_fast.attacks.pgd.steps=2",
]


def test_wilson_interval_matches_the_formula_and_stays_in_the_unit_interval():
    acc = accuracy([True] * 29 + [False] * 71)
    z, n, p = 1.959963984540054, 100, 0.29
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert acc.value == pytest.approx(0.29)
    assert (acc.low, acc.high) == pytest.approx((centre - half, centre + half), abs=1e-9)
    everything = accuracy(np.ones(10, dtype=bool))
    assert everything.high == pytest.approx(1.0) and 0.6 < everything.low < 1.0
    assert accuracy(np.zeros(10, dtype=bool)).low == pytest.approx(0.0)
    assert accuracy([True, False]).percent() == "50.0 [9.5, 90.5]"
    with pytest.raises(ValueError, match="booleans or 0/1"):
        accuracy([0, 2])


def test_paired_difference_counts_discordant_images_and_gives_a_verdict():
    rng = np.random.default_rng(0)
    original = rng.random(400) < 0.3
    robustified = original | (rng.random(400) < 0.3)  # robustification only ever helps here
    diff = paired_difference(robustified, original)
    assert diff.b_only == 0 and diff.a_only == int((robustified & ~original).sum())
    assert diff.value == pytest.approx(robustified.mean() - original.mean())
    assert diff.low < diff.value < diff.high and diff.p_value < 1e-6
    assert verdict(diff) == "holds" and verdict(paired_difference(original, robustified)) == "does not hold"
    same = paired_difference(original, original)
    assert same.value == 0 and same.p_value == 1.0 and same.low < 0 < same.high  # no collapse to [0, 0]
    assert verdict(same) == "inconclusive at this scale"  # no smallest effect declared: an interval around 0
    assert verdict(same, smallest=SMALLEST_EFFECT) == "does not hold"  # excludes every gain of 1 pp
    noisy = paired_difference([True, False, True, False], [False, True, True, False])
    assert verdict(noisy) == "inconclusive at this scale"
    assert verdict(same, "equal", margin=0.05) == "holds"
    with pytest.raises(ValueError, match="same images"):
        paired_difference([True], [True, False])


def test_the_demo_trains_evaluates_robustifies_and_reports_the_headline(tmp_path, capsys):
    run = run_demo(QUICK, QUICK_EVAL, images=12, log_dir=tmp_path)
    assert run.directory.parent == (tmp_path / "demo" / "runs").resolve() and run.checkpoint.is_file()
    records = pd.read_csv(run.evaluation / "records.csv")
    results = json.loads((run.evaluation / "results.json").read_text())
    assert len(records) == 12 and run.figure.is_file()
    row = run.table.iloc[0]
    # the table's accuracies are the evaluation's, with intervals around them
    for column, key in [
        ("Clean", "clean/acc"),
        ("PGD-20 (originals)", "pgd/acc"),
        ("Grey-box PGD-20 (S-Full)", f"{ROBUSTIFIED}_pgd/acc"),
    ]:
        value, interval = row[column].split(" [")
        low, high = (float(t) for t in interval.rstrip("]").split(", "))
        assert float(value) == pytest.approx(100 * results[key], abs=0.05) and low <= float(value) <= high
    assert "same 12 images" in run.comparison
    # a second demo never reuses the first one's directory
    again = main([*QUICK, "--images", "4", "--log-dir", str(tmp_path), *[f"--eval={o}" for o in QUICK_EVAL]])
    out = capsys.readouterr().out
    assert again == 0 and "| Model | Norm | ε | Images | Clean |" in out and "figure:" in out
    assert len(list((tmp_path / "demo" / "runs").iterdir())) == 2


def test_the_demo_without_data_stops_with_one_error_naming_the_fix(tmp_path):
    from safespot.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.download=true"):
        main(["--log-dir", str(tmp_path), f"data.root={tmp_path / 'nowhere'}", "logger=none"])


def test_two_demo_directories_started_in_the_same_second_differ(tmp_path, monkeypatch):
    # one process, one frozen clock: the second directory must not collide with the first
    monkeypatch.setattr("safespot.demo.time.strftime", lambda fmt: "2026-01-01_00-00-00")
    first, second = new_directory(tmp_path), new_directory(tmp_path)
    assert first != second and first.is_dir() and second.is_dir()
    assert sorted(p.name for p in (tmp_path / "demo" / "runs").iterdir()) == sorted([first.name, second.name])
