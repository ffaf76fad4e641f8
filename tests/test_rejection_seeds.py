"""Seeds of paper 004's rejection evaluation: the FLSS latent draws inside attacks come from each
image's own streams, attacks judge success with the vote that scores their points, and the records
do not depend on the batch or on the number of processes."""

import dataclasses
from typing import Any, ClassVar

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import SYNTHETIC, assert_same_run_files, compose_config, cpu_trainer
from safespot.attacks import GAMA, PGD, MultiTargetedPGD
from safespot.evaluate import evaluate
from safespot.evaluation import EvaluationModule
from safespot.evaluation.rejection import RejectionEvaluation
from safespot.models import SmallCNN, build_stochastic_classifier
from safespot.smoothing import seeded_noise
from safespot.train import train
from safespot.utils.prediction import predict_logits
from safespot.utils.rng import derive

EPS = 0.1


def _flss_net(n_vote: int = 100):
    torch.manual_seed(0)
    net = build_stochastic_classifier(SmallCNN(4, width=4), [0.5] * 3, [0.25] * 3, 4, 16, (16,), n_vote=n_vote)
    return net.eval()


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


def test_flss_latent_draws_inside_seeded_noise_are_each_images_own(images):
    x, _ = images
    net, seeds = _flss_net(), torch.arange(16) * 7 + 3
    with torch.no_grad(), seeded_noise(net, seeds):
        first, second = net(x), net(x)
    with torch.no_grad(), seeded_noise(net, seeds[[5, 1]]):
        alone = net(x[[5, 1]])
    assert torch.allclose(first[[5, 1]], alone, atol=1e-6)  # whatever the batch
    assert not torch.allclose(first, second)  # every forward pass draws afresh
    with torch.no_grad(), net.no_sampling():
        assert not torch.allclose(first, net(x))  # a draw, not the no-sampling output


@dataclasses.dataclass
class VoteSpy:
    """Returns the images unchanged and records the seeds it is given and the vote it would judge by."""

    norm: str = "linf"
    eps: float = EPS
    calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    targeted: ClassVar[bool] = False
    requires_smoothing: ClassVar[bool] = False

    def __call__(self, model, x, y, *, seeds=None, vote_seeds=None):
        vote = None if vote_seeds is None else predict_logits(model, x, vote_seeds).argmax(1)
        self.calls.append({"seeds": seeds, "vote_seeds": vote_seeds, "vote": vote})
        return x.clone()


def test_attacks_judge_success_with_the_vote_that_scores_their_points(images):
    """Point set k is scored with the seeds derive(seeds, "rejection_view", k) and n_samples draws:
    the attack that made it is given those seeds, and its vote (the model's n_vote is another
    number) is the recorded vote view; on C(x, 0) it is the no-sampling prediction."""
    x, y = images
    net, seeds = _flss_net(n_vote=7), torch.arange(16) * 5
    spies = {"a": VoteSpy(), "b": VoteSpy()}
    evaluation = RejectionEvaluation("rej", spies, views=["ns", "vote"], n_samples=20, sd_scale=2.0, attack_ns=["a"])
    fields, _ = evaluation(net, x, y, seeds)
    calls = [("a", spies["a"].calls[0]), ("b", spies["b"].calls[0]), ("a_ns", spies["a"].calls[1])]
    for k, (point, call) in enumerate(calls, start=1):
        assert torch.equal(call["seeds"], derive(seeds, "rejection_attack", k))
        assert torch.equal(call["vote_seeds"], derive(seeds, "rejection_view", k))
        view = "ns" if point.endswith("_ns") else "vote"
        assert torch.equal(call["vote"], fields[f"rej_{point}_{view}/pred"]), point
    assert net.n_vote == 7 and net.sd_scale == 1.0  # restored


def _ensemble() -> dict[str, Any]:
    return {
        "pgd": PGD("linf", EPS, steps=2, mode="eval"),
        "pgd_eot": PGD("linf", EPS, steps=2, eot=2, mode="eval"),
        "gama_pgd": GAMA("linf", EPS, steps=3, mode="eval"),
        "gama_mt": GAMA("linf", EPS, steps=2, n_targets=2, mode="eval"),
        "mt_pgd": MultiTargetedPGD("linf", EPS, steps=2, n_targets=2, mode="eval"),
    }


def _records(net, x, y, batch_size, out):
    evaluation = RejectionEvaluation(
        "rej", _ensemble(), views=["ns", "vote", "mean"], n_samples=10, sd_scale=2.0, attack_ns=["pgd", "gama_mt"]
    )
    module = EvaluationModule(net, [evaluation], output_dir=out)
    loader = DataLoader(TensorDataset(x, y, torch.arange(len(x))), batch_size=batch_size)
    cpu_trainer().test(module, loader, verbose=False)
    return pd.read_csv(out / "records.csv")


def test_rejection_records_of_an_flss_model_do_not_depend_on_the_batch(images, tmp_path):
    x, y = images
    net = _flss_net()
    whole = _records(net, x, y, 16, tmp_path / "whole")
    batched = _records(net, x, y, 5, tmp_path / "batched")
    assert {"rej_gama_mt_ns_vote/score", "rej_mt_pgd_mean/score", "rej_pgd_eot/dist"} <= set(whole.columns)
    pd.testing.assert_frame_equal(whole, batched, check_exact=False, atol=1e-6)


@pytest.mark.slow
def test_rejection_evaluation_of_an_flss_checkpoint_on_two_processes_equals_one(tmp_path):
    """``evaluate.py`` with the rejection_flss preset (the members that draw their own seeds; the
    AutoAttack members draw per batch) on a trained FLSS model: every file of a ``trainer=ddp_sim``
    run equals the one-process run's."""
    train_overrides = [
        *SYNTHETIC,
        "method=flss",
        "model=flss_small_cnn",
        "model.backbone.width=4",
        "model.hidden=[8]",
        "trainer.max_epochs=1",
        "data.n_train=128",
        "threat.steps=1",
        "method.val_attack.steps=1",
        "test=false",
    ]
    _, objs = train(compose_config("train", train_overrides, tmp_path / "train"))
    ckpt = objs["trainer"].checkpoint_callback.last_model_path
    name = "rejection_flss"
    small = [f"~evaluation.{name}.attacks.{a}" for a in ("apgd_ce", "apgd_dlr", "apgd_ce_eot")]
    small += [f"evaluation.{name}.attacks.{a}.steps=2" for a in ("pgd", "pgd_cw", "pgd_eot", "gama_pgd")]
    small += [f"evaluation.{name}.attacks.{a}.steps=1" for a in ("gama_mt", "mt_pgd")]
    small += [f"evaluation.{name}.attacks.{a}.n_targets=2" for a in ("gama_mt", "mt_pgd")]
    small += [f"evaluation.{name}.attacks.pgd_eot.eot=2", f"evaluation.{name}.attack_ns=[pgd,gama_mt]"]
    common = [
        f"ckpt_path={ckpt}",
        f"evaluation=[{name}]",
        *small,
        f"evaluation.{name}.sd_scale=2",
        f"evaluation.{name}.n_samples=8",
        "data.test_subset=10",
        "data.eval_batch_size=4",
        "trainer.enable_progress_bar=false",
    ]
    evaluate(compose_config("evaluate", [*common, "trainer=cpu"], tmp_path / "one"))
    evaluate(compose_config("evaluate", [*common, "trainer=ddp_sim"], tmp_path / "two"))
    assert_same_run_files(tmp_path / "one", tmp_path / "two")
