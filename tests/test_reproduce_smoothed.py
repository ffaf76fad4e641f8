"""Paper 002's smoothed tables as a spec (conf/reproduce/smoothed.yaml): None and S-Full in one
evaluation on the same images, pieces joined as one run, the largest certifiable radius."""

from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf
from scipy.stats import norm

from conftest import SYNTHETIC, InProcessCommands
from safespot.paths import CONFIG_DIR
from safespot.reproduce.engine import check_spec, keep, run_spec
from safespot.reproduce.evidence import Evidence
from safespot.reproduce.spec import parse_spec
from safespot.smoothing.certified import max_certifiable_radius

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
    "evaluation.preempt_smooth_sfull.white_box.eps_fractions=[0.5,1.0]",
    "trainer.enable_progress_bar=false",
    "data.test_subset=6",
]
TABLE7 = [
    "smoothing.m=2",
    *[f"evaluation.preempt_certify_sfull.robustifier.{o}" for o in FAST_SEARCH],
    *[f"evaluation.preempt_certify_{r}.certify.n0=8" for r in ("none", "sfull")],
    *[f"evaluation.preempt_certify_{r}.certify.n=32" for r in ("none", "sfull")],
    "trainer.enable_progress_bar=false",
    "data.test_subset=6",
]
TRAIN = [*SYNTHETIC, "method=gaussian", "threat=l2_0.5", "trainer.max_epochs=1", "test=false", "seed=0"]


def small_spec(tmp_path: Path):
    """The project's spec on a synthetic Gaussian model, fast settings after the spec's own."""
    data = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "reproduce" / "smoothed.yaml"))
    data["report"], data["records"] = str(tmp_path / "report.md"), str(tmp_path / "records")
    for run in data["runs"].values():
        run["overrides"] = TRAIN
    data["evaluations"]["table5"]["overrides"] += TABLE5
    data["evaluations"]["table5"]["pieces"] = 2
    data["evaluations"]["table7"]["overrides"] += TABLE7
    return parse_spec("smoothed", data)


def test_the_smoothed_spec_runs_joins_its_pieces_and_renders_from_records(tmp_path):
    spec = small_spec(tmp_path)
    runner = InProcessCommands()
    report = run_spec(spec, tmp_path / "out", runner=runner).read_text()
    assert [c[1] for c in runner.calls] == ["train.py", "evaluate.py", "evaluate.py", "train.py", "evaluate.py"]
    evidence = Evidence(spec, tmp_path / "out")
    table5 = evidence.records("table5")
    assert len(table5) == 6 and (table5["preempt_smooth_sfull/dist"] <= 0.5 + 1e-5).all()  # x_r in B_delta(x_o)
    fractions = {f: table5[f"preempt_smooth_sfull_white_pgd_f{f}/correct"].mean() for f in ("0.5", "1")}
    assert evidence.summary("table5")["preempt_smooth_sfull_white_pgd/acc"] == min(fractions.values())
    none_row = next(line for line in report.splitlines() if line.startswith("| None | ") and "[" in line)
    cells = [c.strip() for c in none_row.strip("|").split("|")]
    assert cells[2] == cells[4] and cells[3] == cells[5]  # None: white-box = grey-box (footnote 2)
    assert "92.14 | 56.02" in report and "82.84 | 55.58" in report
    assert "n = 32, alpha = 0.001: no radius above sigma Phi^-1(alpha^(1/n)) = 0.216" in report
    assert "not measurable at n = 32 (largest radius 0.216)" in report  # r = 0.5 is out of reach
    assert report.count("python evaluate.py") == 3 and "'data.test_part=[1,2]'" in report
    keep(spec, tmp_path / "out")
    assert check_spec(spec) == []
    assert pd.read_csv(tmp_path / "records" / "eval" / "table5" / "part1_of_2" / "records.csv")["index"].min() >= 3


def test_the_largest_certifiable_radius_is_the_bound_with_every_draw_correct():
    # n = 5,000 at sigma 0.25: 0.748 (docs/evaluation.md); n = 100,000: 0.951
    assert max_certifiable_radius(0.25, 5000) == pytest.approx(0.748, abs=1e-3)
    assert max_certifiable_radius(0.25, 100_000) == pytest.approx(0.25 * norm.ppf(0.001**1e-5))
