"""Paper 002, Figure 3 as specs (conf/reproduce/figure3.yaml, figure3_adv.yaml): the search started
at x_o and at a random point on the same images, both with the fixed schedule the reconstruction
reverses; reconstruction errors in both norms, shares with what they are shares of, a verdict, the
histograms drawn next to the records and linked from the report."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import InProcessCommands
from safespot.reproduce.engine import check_spec, keep, run_spec
from safespot.reproduce.evidence import Evidence
from safespot.reproduce.tables.reconstruction import figure3_verdict
from safespot.stats import accuracy
from test_reproduce import IMAGES, row, small_spec

# many tiny forward passes: one intra-op thread (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def figure3(one_thread, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("figure3")
    spec = small_spec("figure3", tmp)
    runner = InProcessCommands()
    report = run_spec(spec, tmp / "out", runner=runner).read_text()
    return spec, tmp, runner, report


def test_both_starts_run_on_the_same_images_with_the_fixed_schedule(figure3):
    spec, tmp, runner, _ = figure3
    assert [c[1] for c in runner.calls] == ["train.py", *["evaluate.py"] * 4]
    evidence = Evidence(spec, tmp / "out")
    for norm in ("l2", "linf"):
        original, random = evidence.records(f"{norm}_original"), evidence.records(f"{norm}_random")
        assert original.index.equals(random.index) and len(original) == IMAGES
        for start in ("original", "random"):
            meta = evidence.meta(f"{norm}_{start}")
            search = meta["evaluation_config"]["preempt_sfull"]["robustifier"]
            assert search["init"] == start and search["early_exit"] is None  # the schedule the reverse assumes
            assert meta["norm"] == norm
        # the reconstruction error is recorded in both norms (l_2 >= l_inf)
        assert (original["preempt_sfull/recon_l2"] >= original["preempt_sfull/recon_linf"] - 1e-6).all()


def test_the_report_gives_shares_of_what_they_are_of_and_links_the_figure(figure3):
    spec, tmp, _, report = figure3
    evidence = Evidence(spec, tmp / "out")
    l2 = report.split("## l_2")[1].split("## l_inf")[0]
    random = evidence.records("l2_random")
    error = random["preempt_sfull/recon_dist"].to_numpy()
    cells = row(l2, "random in B_delta(x_o)")
    assert cells[3] == accuracy(error <= 0.25).percent() and cells[4] == accuracy(error >= 0.4).percent()
    kept = random["preempt_sfull/correct"].astype(bool).to_numpy()
    outside = random["preempt_sfull_white_pgd_f1/dist"].to_numpy()[kept] > 0.5 + 1e-6
    assert cells[5] == accuracy(outside).percent()
    assert "| White-box outputs outside B_eps(x_o) at eps' = eps, % of images with x_r correct | Misclassified" in l2
    assert sum(word in l2 for word in ("**holds**", "**does not hold**", "**inconclusive at this scale**")) == 1
    assert "l_inf, random start: white PGD accuracy minus grey PGD accuracy" in report
    assert "![reconstruction errors from both starts](figure3_l2.png)" in report
    assert (tmp / "out" / "figure3_l2.png").is_file() and (tmp / "out" / "figure3_linf.png").is_file()
    assert str(tmp) not in report and "hydra.run.dir" not in report
    # kept: the figure is drawn next to the kept records and linked relative to the kept report
    keep(spec, tmp / "out")
    kept_report = spec.report.read_text()
    assert "](records/figure3_l2.png)" in kept_report and (spec.records / "figure3_l2.png").is_file()
    assert check_spec(spec) == []


def test_the_figure3_verdict_follows_the_papers_statement():
    """Holds: reconstruction from x_o beats a random start and most random starts end near the boundary;
    does not hold: the start makes no difference or x_o itself is not reconstructed."""
    n = 100
    all_, none = np.ones(n, bool), np.zeros(n, bool)
    assert figure3_verdict(all_, none, all_) == "holds"
    assert figure3_verdict(none, none, all_) == "does not hold"
    assert figure3_verdict(all_, all_, none) == "does not hold"
    half = np.arange(n) < 55
    assert figure3_verdict(half, none, half) == "inconclusive at this scale"  # near the boundary: not clearly most


def test_figure3_adv_uses_the_reduced_adv_model_at_l2(tmp_path):
    """The reduced ADV model of the CIFAR-10 reproductions, best checkpoint, evaluated at l_2 0.5."""
    from safespot.reproduce.spec import load_spec

    spec = load_spec("figure3_adv")
    assert spec.runs["adv"].overrides == load_spec("cifar10_linf").runs["adv"].overrides  # the same run
    for start in ("original", "random"):
        evaluation = spec.evaluations[start]
        assert evaluation.checkpoint == "best" and evaluation.run == "adv"
        overrides = set(evaluation.overrides)
        assert {"threat.norm=l2", "threat.eps=0.5", f"evaluation.preempt_sfull.robustifier.init={start}"} <= overrides
        assert "robustifier@evaluation.preempt_sfull.robustifier=sfull_paper" in overrides


def test_outside_shares_read_the_full_budget_and_every_eps_not_the_tied_choice():
    """The white-box accuracy's eps' is a tie (smallest fraction) when no eps' breaks an image; the
    outside shares must not read it. Four images, x_r correct on the first three (eps 0.5)."""
    import pandas as pd

    from safespot.reproduce.tables.reconstruction import outside_shares

    out = "s_white_pgd"
    records = pd.DataFrame(
        {
            "s/correct": [1, 1, 1, 0],
            f"{out}/correct": [1, 1, 1, 0],  # the tied eps' (0.25): nothing misclassified there
            f"{out}/invalid": [0, 0, 0, 0],
            f"{out}_f1/dist": [0.6, 0.4, 0.5 + 5e-7, 0.7],  # the third is inside up to the tolerance
            f"{out}_union/invalid": [1, 1, 0, 1],  # misclassified outside B_eps(x_o) at some eps'
            f"{out}_union/correct": [1, 0, 1, 0],  # the second also validly broken at another eps'
        }
    )
    of_kept, only_outside = outside_shares(records, "s", out, "e", (0.5, 1e-6, 1.0))
    assert of_kept == accuracy(np.array([True, False, False])).percent()
    assert only_outside == accuracy(np.array([True, False])).percent()
    assert of_kept.startswith("33.3") and only_outside.startswith("50.0")


def test_a_white_box_attack_that_changed_no_outcome_is_named():
    """Paper 002 at l_inf: the white-box accuracy is x_r's clean accuracy when no output counts;
    the report says so only when the outcomes agree on every image."""
    import pandas as pd

    from safespot.reproduce.tables.reconstruction import changes_nothing

    records = pd.DataFrame({"s/correct": [1, 1, 0, 1], "s_white_pgd/correct": [1, 1, 0, 1]})
    assert changes_nothing(records, "s", "s_white_pgd", "e")
    records.loc[3, "s_white_pgd/correct"] = 0  # one image broken
    assert not changes_nothing(records, "s", "s_white_pgd", "e")
