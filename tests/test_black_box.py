"""Black-box attacks of paper 003 (Section 5): NAttack (Li et al., 2019) and the transfer attack."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import SYNTHETIC, TinyNet, compose_config
from safespot.attacks import NAttack
from safespot.errors import ConfigError
from safespot.evaluate import evaluate
from safespot.evaluation import AttackEvaluation
from safespot.smoothing import SmoothedClassifier
from safespot.threat import LpBall
from safespot.train import train

SMALL = ["data.n_train=256", "data.val_size=32", "method=natural", "trainer.max_epochs=1", "test=false"]


@pytest.fixture(scope="module")
def victim() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A small network and images it classifies as ``y`` (its own predictions): clean accuracy 100%."""
    torch.manual_seed(0)
    net = TinyNet(4).eval()
    x = torch.rand(16, 3, 16, 16)
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 3.0)])
def test_nattack_stays_in_its_ball_and_beats_random_noise(victim, norm, eps):
    net, x, y = victim
    attack = NAttack(norm, eps, iterations=40, npop=30, check_every=5)
    x_adv = attack(net, x, y, seeds=torch.arange(16))
    ball = LpBall(norm, eps)
    assert ball.contains(x_adv, x, tol=1e-5).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        fooled = (net(x_adv).argmax(1) != y).float().mean()
        # random points of the same ball (5 draws per image): the best of them
        random_fooled = max((net(ball.random_init(x)).argmax(1) != y).float().mean() for _ in range(5))
    assert fooled >= 0.25 and fooled > random_fooled + 0.2


def test_nattack_counts_its_queries_and_stops_fooled_images(victim):
    net, x, y = victim
    attack = NAttack("linf", 0.1, iterations=40, npop=30, check_every=5)
    x_adv = attack(net, x, y, seeds=torch.arange(16))
    queries = attack.last_queries
    checks = 40 // 5
    budget = 40 * 30 + checks
    with torch.no_grad():
        fooled = net(x_adv).argmax(1) != y
    assert (queries <= budget).all() and (queries[~fooled] == budget).all()
    assert (queries[fooled] < budget).all()  # a fooled image stopped at a check
    # the evaluation records them per image
    fields, _ = AttackEvaluation("nattack", attack)(net, x, y, torch.arange(16))
    assert torch.equal(fields["nattack/queries"], queries)


def test_nattack_results_do_not_depend_on_the_batch(victim):
    net, x, y = victim
    attack = NAttack("linf", 0.05, iterations=12, npop=8, check_every=4)
    seeds = torch.arange(100, 116)
    together = attack(net, x, y, seeds=seeds)
    apart = attack(net, x[[2, 9]], y[[2, 9]], seeds=seeds[[2, 9]])
    torch.testing.assert_close(apart, together[[2, 9]], rtol=0, atol=1e-6)
    # also on a randomised (smoothed) model: its noise comes from the images' streams too
    smoothed = SmoothedClassifier(net, sigma=0.1, m=2).eval()
    together = attack(smoothed, x, y, seeds=seeds)
    apart = attack(smoothed, x[[2, 9]], y[[2, 9]], seeds=seeds[[2, 9]])
    torch.testing.assert_close(apart, together[[2, 9]], rtol=0, atol=1e-5)


def _train(out: Path, *overrides: str) -> Path:
    cfg = compose_config("train", [*SYNTHETIC, *SMALL, *overrides], out)
    _, objects = train(cfg)
    return Path(objects["trainer"].checkpoint_callback.last_model_path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("transfer")
    return {
        "target": _train(root / "target", "seed=0"),
        "other_target": _train(root / "other_target", "seed=0", "trainer.max_epochs=2"),  # same test subset
        "source": _train(root / "source", "seed=1"),
        "three_classes": _train(root / "three", "seed=1", "data.num_classes=3"),
    }


def _evaluate(target: Path, source: Path, out: Path, *extra: str) -> pd.DataFrame:
    overrides = [
        f"ckpt_path={target}",
        "evaluation=[clean,transfer]",
        f"evaluation.transfer.source_ckpt_path={source}",
        "evaluation.transfer.attack.steps=5",
        "data.test_subset=32",
        "trainer.enable_progress_bar=false",
        *extra,
    ]
    evaluate(compose_config("evaluate", overrides, out))
    return pd.read_csv(out / "records.csv").set_index("index").sort_index()


def test_transfer_examples_come_from_the_source_and_stay_in_the_ball(runs, tmp_path):
    a = _evaluate(runs["target"], runs["source"], tmp_path / "a")
    b = _evaluate(runs["other_target"], runs["source"], tmp_path / "b")
    eps = json.loads((tmp_path / "a" / "results.json").read_text())["meta"]["eps"]
    assert (a["transfer/dist"] <= eps + 1e-6).all() and (a["transfer/dist"] > 0).any()
    # the examples are the source's: the same for two targets (the target is never queried) ...
    pd.testing.assert_series_equal(a["transfer_source/loss"], b["transfer_source/loss"])
    pd.testing.assert_series_equal(a["transfer_source/pred"], b["transfer_source/pred"])
    # a smoothed source attacks its soft smoothed loss: other examples
    c = _evaluate(runs["target"], runs["source"], tmp_path / "c", "evaluation.transfer.source_sigma=0.25")
    assert not c["transfer/loss"].equals(a["transfer/loss"])


def test_a_transfer_source_that_does_not_fit_the_target_is_refused_before_any_work(runs, tmp_path):
    with pytest.raises(ConfigError, match=r"transfer source .* 3 classes"):
        _evaluate(runs["target"], runs["three_classes"], tmp_path / "a")
    assert not (tmp_path / "a" / "records.csv").exists()
    with pytest.raises(Exception, match=r"missing\.ckpt"):
        _evaluate(runs["target"], tmp_path / "missing.ckpt", tmp_path / "b")


@pytest.mark.slow
def test_the_new_evaluations_write_the_same_files_with_two_processes(runs, tmp_path):
    """Transfer, NAttack (queries included) and the vote sweep on a smoothed model: every output
    file of a ``trainer=ddp_sim`` run equals the one-process run's."""
    from conftest import assert_same_run_files

    small = ["data.test_subset=12", "data.eval_batch_size=4", "trainer.enable_progress_bar=false"]
    cases = {
        "plain": [
            "evaluation=[clean,transfer,nattack]",
            f"evaluation.transfer.source_ckpt_path={runs['source']}",
            "evaluation.transfer.attack.steps=2",
            "evaluation.nattack.attack.iterations=4",
            "evaluation.nattack.attack.npop=6",
            "evaluation.nattack.attack.check_every=2",
        ],
        "smoothed": [
            "smoothing.sigma=0.25",
            "smoothing.m_attack=2",
            "evaluation=[clean,votes_pgd]",
            "evaluation.votes_pgd.attack.steps=2",
            "evaluation.votes_pgd.ns=[1,4]",
        ],
    }
    for name, overrides in cases.items():
        one, two = tmp_path / f"{name}_one", tmp_path / f"{name}_two"
        common = [f"ckpt_path={runs['target']}", *small, *overrides]
        evaluate(compose_config("evaluate", [*common, "trainer=cpu"], one))
        evaluate(compose_config("evaluate", [*common, "trainer=ddp_sim"], two))
        assert_same_run_files(one, two)
    assert "nattack/queries" in pd.read_csv(tmp_path / "plain_two" / "records.csv")
