"""The smoothed-tables script (paper 002, Tables 5 and 7): None and S-Full in one evaluation on
the same images, intervals, paired verdicts and the largest certifiable radius."""

import importlib.util
from pathlib import Path

import pandas as pd
import pytest
from scipy.stats import norm

from conftest import SYNTHETIC, compose_config
from safespot.train import train

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("smoothed", ROOT / "scripts" / "reproduce_smoothed.py")
smoothed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(smoothed)

FAST_SEARCH = ["max_iter=2", "inner_steps=2", "beta=0.05"]
TABLE5 = [
    "smoothing.n_vote=8",
    "smoothing.m=2",
    *[f"evaluation.preempt_smooth_sfull.robustifier.{o}" for o in FAST_SEARCH],
    *[f"evaluation.preempt_smooth_{r}.attacks.{a}.steps=2" for r in ("none", "sfull") for a in ("pgd", "pgd10")],
    *[f"evaluation.preempt_smooth_{r}.attacks.pgd10.restarts=2" for r in ("none", "sfull")],
    "evaluation.preempt_smooth_sfull.white_box.attacks.pgd.steps=2",
    "evaluation.preempt_smooth_sfull.white_box.attacks.pgd10.steps=2",
    "evaluation.preempt_smooth_sfull.white_box.attacks.pgd10.restarts=2",
    "evaluation.preempt_smooth_sfull.white_box.eps_fractions=[1.0]",
    "trainer.enable_progress_bar=false",
]
TABLE7 = [
    "smoothing.m=2",
    *[f"evaluation.preempt_certify_sfull.robustifier.{o}" for o in FAST_SEARCH],
    *[f"evaluation.preempt_certify_{r}.certify.n0=8" for r in ("none", "sfull")],
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def gaussian_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gauss") / "run"
    overrides = [*SYNTHETIC, "method=gaussian", "threat=l2_0.5", "trainer.max_epochs=1", "test=false"]
    train(compose_config("train", overrides, out))
    return out


@pytest.mark.parametrize("table, overrides", [("5", TABLE5), ("7", TABLE7)])
def test_each_table_evaluates_none_and_sfull_on_the_same_images(gaussian_run, tmp_path, table, overrides):
    out = tmp_path / "report"
    run = smoothed.TABLES[table][0]
    args = ["--tables", table, "--test-images", "6", "--n-certify", "32", "--out", str(out)]
    args += [f"--reuse={run}={gaussian_run}", *[f"--override={o}" for o in overrides]]
    assert smoothed.main(args) == 0
    report = (out / "report.md").read_text()
    records = pd.read_csv(out / "eval" / f"table{table}" / "records.csv")
    assert len(records) == 6
    none, sfull = smoothed.TABLES[table][2]
    assert (records[f"{sfull}/dist"] <= 0.5 + 1e-5).all()  # x_r inside B_delta(x_o), l_2 0.5
    assert "| None |" in report and "| Ours (S-Full) |" in report
    assert any(word in report for word in ("| holds |", "| does not hold |", "| inconclusive at this scale |"))
    if table == "5":
        assert "92.14 | 56.02" in report and f"{sfull}_white_pgd/correct" in records
        none_row = next(line for line in report.splitlines() if line.startswith("| None | ") and "[" in line)
        cells = [c.strip() for c in none_row.strip("|").split("|")]
        assert cells[2] == cells[4] and cells[3] == cells[5]  # None: white-box = grey-box (footnote 2)
    else:
        assert "82.84 | 55.58" in report and f"{sfull}_certify/cert_0.5" in records
        assert "n = 32, alpha = 0.001: no radius above sigma Phi^-1(alpha^(1/n)) = 0.216" in report
        assert "not measurable at n = 32 (largest radius 0.216)" in report  # r = 0.5 is out of reach


def test_a_table_run_in_pieces_reports_what_one_run_reports(gaussian_run, tmp_path):
    """``--override data.test_part=[k,K]`` pieces joined by ``--reuse-eval 7=DIR0,DIR1``: the same
    tables as one run on all the images, and the pieces' commands listed as reused."""
    run = smoothed.TABLES["7"][0]
    common = ["--tables", "7", "--test-images", "5", "--n-certify", "32", f"--reuse={run}={gaussian_run}"]
    common += [f"--override={o}" for o in TABLE7]
    assert smoothed.main([*common, "--out", str(tmp_path / "whole")]) == 0
    pieces = []
    for k in range(2):
        assert smoothed.main([*common, "--out", str(tmp_path / f"p{k}"), f"--override=data.test_part=[{k},2]"]) == 0
        pieces.append(str(tmp_path / f"p{k}" / "eval" / "table7"))
    joined = ["--reuse-eval", "7=" + ",".join(pieces), "--out", str(tmp_path / "j")]
    assert smoothed.main(["--tables", "7", "--n-certify", "32", *joined]) == 0

    def tables(report: Path) -> list[str]:
        body = report.read_text().split("## Commands")
        return [line for line in body[0].splitlines() if line.startswith("|")]

    assert tables(tmp_path / "j" / "report.md") == tables(tmp_path / "whole" / "report.md")
    commands = (tmp_path / "j" / "report.md").read_text().split("## Commands")[1]
    assert commands.count("python evaluate.py") == 2 and commands.count("# reused") == 2
    assert "data.test_part=[1,2]" in commands


def test_the_largest_certifiable_radius_is_the_bound_with_every_draw_correct():
    # n = 5,000 at sigma 0.25: 0.748 (docs/evaluation.md); n = 100,000: 0.951
    assert smoothed.max_certifiable_radius(0.25, 5000) == pytest.approx(0.748, abs=1e-3)
    assert smoothed.max_certifiable_radius(0.25, 100_000) == pytest.approx(0.25 * norm.ppf(0.001**1e-5))


def test_bad_arguments_fail_before_any_work(tmp_path):
    for bad in (["--tables", "6"], ["--test-images", "0"], ["--robustifier", "sideways"], ["--reuse-eval", "9=/x"]):
        with pytest.raises(SystemExit):
            smoothed.main([*bad, "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no best checkpoint"):
        smoothed.main([f"--reuse=reduced_cifar10_gaussian_0.1={tmp_path}", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
