"""The white-box score of paper 002 (Section 4, Algorithm 4): per-eps' accuracies, the lowest of
them (the paper's number) versus the stricter per-image union over eps', and the report; and a
preemptive evaluation that protects the ground-truth label (``protect: label``)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import ClassVar

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import safespot.evaluation.evaluations
from conftest import cpu_trainer
from safespot.defenses import NoRobustification, SafeSpotSearch
from safespot.evaluation import EvaluationModule, PreemptiveEvaluation, summarize
from safespot.evaluation.evaluations import WhiteBox
from safespot.report import load_run, main, preemptive_table

EPS = 0.1


class FirstPixel(torch.nn.Module):
    """Predicts class 1 iff the first pixel exceeds 0.5."""

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        v = inp.flatten(1)[:, :1]
        return torch.cat([0.5 - v, v - 0.5], 1) * 100


@dataclasses.dataclass
class MarkedShift:
    """A stub attack: adds its budget to the first pixel of the images whose second pixel
    equals that budget, i.e. it breaks each image at one chosen eps' only."""

    norm: str
    eps: float
    targeted: ClassVar[bool] = False
    requires_smoothing: ClassVar[bool] = False

    def __call__(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        seeds: torch.Tensor | None = None,
        vote_seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = x.clone()
        flat = out.view(len(x), -1)
        hit = (x.flatten(1)[:, 1] - self.eps).abs() < 1e-6
        flat[hit, 0] += self.eps
        return out


def _identity_reconstruction(robustifier: object):
    """A reconstruction that returns x_r unchanged (x_r = x_o for NoRobustification)."""
    return lambda model, x_r, seeds=None: SimpleNamespace(x_r=x_r)


def _evaluation(fractions: list[float]) -> PreemptiveEvaluation:
    return PreemptiveEvaluation(
        "preempt_sfull",
        NoRobustification("linf", EPS),
        attacks={},
        white_box={"attacks": {"pgd": MarkedShift("linf", EPS)}, "eps_fractions": fractions},
    )


def test_paper_white_box_accuracy_is_the_lowest_over_eps_not_the_union(tmp_path, monkeypatch):
    """Image 0 is broken only at eps' = 0.25 eps, image 1 only at eps' = eps: each eps' has 50%
    accuracy, so the paper's number (lowest over eps') is 50% while the per-image union is 0%.
    Batches of one image: the eps' of lowest accuracy is chosen on the whole dataset."""
    monkeypatch.setattr(safespot.evaluation.evaluations, "reconstruction", _identity_reconstruction)
    x = torch.full((2, 1, 2, 2), 0.49)
    x.view(2, -1)[0, 1] = 0.25 * EPS
    x.view(2, -1)[1, 1] = 1.0 * EPS
    y = torch.zeros(2, dtype=torch.long)
    module = EvaluationModule(FirstPixel(), [_evaluation([0.25, 0.5, 1.0])], output_dir=tmp_path / "run")
    cpu_trainer().test(module, DataLoader(TensorDataset(x, y, torch.arange(2)), batch_size=1), verbose=False)
    summary, records = module.summary, pd.read_csv(tmp_path / "run" / "records.csv")

    white = "preempt_sfull_white_pgd"
    assert summary[f"{white}/acc"] == 0.5  # paper 002: the lowest accuracy over eps', not the union (0)
    members = [f"{white}_f0.25", f"{white}_f0.5", f"{white}_f1"]
    for name in [white, *members, f"{white}_union"]:
        assert {f"{name}/{k}" for k in ("pred", "correct", "loss", "dist", "invalid")} <= set(records)
    assert f"{white}_union_strict/correct" in records and "preempt_sfull_white_union/correct" in records
    assert [summary[f"{n}/acc"] for n in members] == [0.5, 1.0, 0.5]
    assert summary[f"{white}/fraction"] == 0.25  # ties: the smallest fraction
    assert summary[f"{white}_union/acc"] == 0.0  # broken at some eps' for every image
    assert summary[f"{white}_union_strict/acc"] == 0.0  # x_r = x_o: B_eps(x_r) = B_eps(x_o)
    assert summary["preempt_sfull_white_union/acc"] == 0.0
    # per image, <out>/... is the eps' of lowest accuracy
    assert records[f"{white}/correct"].tolist() == [False, True]
    assert records[f"{white}_f0.25/correct"].tolist() == [False, True]
    assert records[f"{white}_f1/correct"].tolist() == [True, False]
    assert records[f"{white}/pred"].tolist() == [1, 0]
    assert records[f"{white}/dist"].tolist() == pytest.approx([0.25 * EPS, 0.0], abs=1e-6)

    # the report shows the paper's number and the union
    row = preemptive_table([load_run(tmp_path / "run")]).iloc[0]
    assert (row["White PGD"], row["White PGD (union)"]) == pytest.approx((50.0, 0.0))
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| White PGD | White AA | White PGD (union) |" in report and "lowest accuracy over eps'" in report


def test_misclassified_x_r_in_the_ball_breaks_every_eps_and_invalid_examples_do_not():
    """Image 0: x_r is misclassified within B_eps(x_o) and the attack fails: broken at every eps'
    (the adversary may output x_r). Image 1: the attack output is misclassified but outside
    B_eps(x_o) at eps' = eps: invalid, still correct. Image 2: never broken."""
    ev = _evaluation([0.5, 1.0])
    x_o = torch.full((3, 1, 2, 2), 0.45)
    x_r = x_o.clone()
    x_r.view(3, -1)[0, 0] = 0.52  # wrong, 0.07 from x_o
    x_hat = x_o.clone()
    x_hat.view(3, -1)[1, 0] = 0.48  # + eps = 0.58: wrong, 0.13 from x_o
    x_hat.view(3, -1)[1, 1] = EPS  # ... broken only by the full budget
    y = torch.zeros(3, dtype=torch.long)
    fields = ev.white_box.attack_reconstruction(ev, FirstPixel(), x_o, x_r, x_hat, y, torch.arange(3))
    white = "preempt_sfull_white_pgd"
    for fraction in ("0.5", "1"):
        name = f"{white}_f{fraction}"
        assert fields[f"{name}/correct"].tolist() == [False, True, True]
        assert fields[f"{name}/pred"][0] == 1  # scored at x_r
        assert fields[f"{name}/dist"][0] == pytest.approx(0.07, abs=1e-6)
    assert fields[f"{white}_f0.5/invalid"].tolist() == [False, False, False]
    assert fields[f"{white}_f1/invalid"].tolist() == [False, True, False]
    assert fields[f"{white}_f1/pred"].tolist() == [1, 1, 0]  # image 1: wrong, yet not broken
    assert fields[f"{white}_union/correct"].tolist() == [False, True, True]
    assert fields[f"{white}_union/invalid"].tolist() == [False, True, False]
    assert fields["preempt_sfull_white_union/correct"].tolist() == [False, True, True]


def test_summary_reduces_a_budget_sweep_to_its_lowest_accuracy():
    from safespot.evaluation.records import budget_sweeps, resolve_budget_sweeps, sweep_name

    names = ["clean", "w", "w_f0.25", "w_f0.5", "w_f1", "w_union"]
    records = pd.DataFrame(
        {
            "clean/correct": [True, True, True, True],
            "w_f0.25/correct": [False, True, True, True],
            "w_f0.5/correct": [False, False, True, True],
            "w_f0.5/dist": [0.1, 0.2, 0.3, 0.4],
            "w_f0.5/invalid": [False, False, True, False],
            "w_f1/correct": [True, False, False, True],
            "w_union/correct": [False, False, False, True],
        }
    )
    assert budget_sweeps(names) == {"w": {"w_f0.25": 0.25, "w_f0.5": 0.5, "w_f1": 1.0}}
    assert sweep_name("w", 1.0) == "w_f1" and sweep_name("w", 0.25) == "w_f0.25"
    summary = summarize(records, names)
    assert summary["w/acc"] == 0.5 == min(summary[f"{n}/acc"] for n in names[2:5])
    assert summary["w/fraction"] == 0.5  # 0.5 and 1 tie at 50%: the smaller fraction
    assert summary["w_union/acc"] == 0.25
    assert summary["w/mean_dist"] == pytest.approx(0.25) and summary["w/invalid_rate"] == 0.25
    assert records["w/correct"].tolist() == records["w_f0.5/correct"].tolist()  # added in place
    assert summary["worst_case/acc"] == 0.25
    assert summarize(records, names) == summary  # idempotent
    assert resolve_budget_sweeps(records, ["clean", "w_union"]) == {}  # no sweep without its members


def test_white_box_settings_refuse_duplicate_fractions_and_the_reserved_union_key():
    with pytest.raises(ValueError, match="distinct"):
        WhiteBox({"pgd": MarkedShift("linf", EPS)}, eps_fractions=[0.5, 0.5])
    with pytest.raises(ValueError, match="reserved"):
        WhiteBox({"union": MarkedShift("linf", EPS)})


def test_preemptive_evaluation_passes_labels_to_a_label_protecting_robustifier(tiny_net, images):
    """``protect: label`` (conf/robustifier/sfull.yaml): the evaluation hands y to the
    robustifier, which protects the ground truth rather than the prediction c(x_o)."""
    x, y = images
    with torch.no_grad():
        pred = tiny_net(x).argmax(1)
    assert (pred != y).any()  # otherwise both rules protect the same labels
    seeds = torch.arange(len(x))
    fields = {}
    for protect in ("label", "prediction"):
        search = SafeSpotSearch("linf", 8 / 255, protect=protect, max_iter=2, inner_steps=2)
        ev = PreemptiveEvaluation(f"p_{protect}", search, attacks={})
        out, x_r = ev(tiny_net, x, y, seeds)
        assert ((x_r - x).abs().amax() <= 8 / 255 + 1e-6) and len(out[f"p_{protect}/worst_loss"]) == len(x)
        fields.update(out)
    assert torch.equal(fields["p_label/protected"], y)
    assert torch.equal(fields["p_prediction/protected"], pred)
