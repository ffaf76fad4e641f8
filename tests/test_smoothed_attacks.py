"""Attacks on smoothed classifiers (paper 002, Appendix C.2; paper 003): per-image seeded noise
in the soft and noisy forward passes, success judged by the vote (PGD restarts, AutoAttack),
separate draws for robustification and attacks, paper 003's weighted vote, and the noisy-model
PGD preset."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import compose_config
from safespot.attacks import PGD, AutoAttack, NoisyViewAttack
from safespot.attacks.noisy_view import VotingNoisyView
from safespot.smoothing import (
    NoisyClassifier,
    SmoothedClassifier,
    SoftSmoothed,
    seeded_noise,
    smoothing_draws,
    unseeded_noise,
)
from safespot.smoothing.smoothed import check_rank_weights
from safespot.threat import LpBall, ThreatConfigError
from safespot.utils.instantiate import instantiate
from safespot.utils.prediction import predict_logits
from safespot.utils.rng import derive, seeded_normal, seeded_normal_at

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny forward passes: one thread is fastest


class Threshold(nn.Module):
    """Two classes split by the first input coordinate at ``at``: logits ``(at - x_0, x_0 - at)``."""

    def __init__(self, at: float = 0.5) -> None:
        super().__init__()
        self.at = at
        self.num_classes = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1)[:, :1] - self.at
        return torch.cat([-z, z], 1)


# --- 1. per-image seeded noise ----------------------------------------------------------------
def test_seeded_normal_at_continues_the_streams_of_seeded_normal():
    seeds = torch.tensor([3, -5, 2**62])
    whole = seeded_normal(seeds, 20, stream=7)
    parts = seeded_normal_at(seeds, torch.tensor([0, 5, 12]), 8, stream=7)
    assert torch.equal(parts[0], whole[0, :8]) and torch.equal(parts[1], whole[1, 5:13])
    assert torch.equal(parts[2], whole[2, 12:20])
    assert torch.equal(seeded_normal_at(seeds, 0, 20, stream=7), whole)


def test_seeded_noise_depends_on_the_image_seed_and_the_call_only(tiny_net, images):
    x = images[0][:6]
    seeds = torch.arange(6) * 11 + 2
    for model in (SoftSmoothed(tiny_net, 0.25, m=3), NoisyClassifier(tiny_net, 0.25)):
        with torch.no_grad(), seeded_noise(model, seeds):
            first, second = model(x), model(x)  # calls 0 and 1: different draws (steps, EOT passes)
        with torch.no_grad(), seeded_noise(model, seeds.flip(0)):
            flipped = model(x.flip(0)).flip(0)
        with torch.no_grad(), seeded_noise(model, seeds[2:4]):
            part = model(x[2:4])
        assert not torch.allclose(first, second)
        assert torch.allclose(flipped, first, atol=1e-6) and torch.allclose(part, first[2:4], atol=1e-6)
        with torch.no_grad(), seeded_noise(model, seeds + 1):
            assert not torch.allclose(model(x), first)  # another seed (another DDP rank's image)
        with torch.no_grad(), seeded_noise(model, seeds, salt=1):
            assert not torch.allclose(model(x), first)
        torch.manual_seed(3)
        with torch.no_grad():
            a = model(x)
        torch.manual_seed(3)
        with torch.no_grad():
            assert torch.equal(model(x), a)  # outside the context: the global RNG, as before


def test_seeded_noise_nests_restores_and_refuses_a_foreign_batch(tiny_net, images):
    x = images[0][:4]
    model = SoftSmoothed(tiny_net, 0.25, m=2)
    seeds = torch.arange(4)
    with torch.no_grad():
        with seeded_noise(model, seeds):
            outer_first = model(x)
        with seeded_noise(model, seeds):
            with seeded_noise(model, seeds + 100):
                model(x)
                model(x)
            assert torch.equal(model(x), outer_first)  # the outer counter and seeds are restored
            with unseeded_noise(model):
                assert not model.noise_seeding.active
            with pytest.raises(ValueError, match="per-image seeds"):
                model(x[:3])
        assert not model.noise_seeding.active
        with seeded_noise(model, None):  # no seeds: nothing changes
            assert not model.noise_seeding.active


def test_fixed_noise_still_reuses_its_draws_inside_seeded_noise(tiny_net, images):
    x = images[0][:4]
    model = SoftSmoothed(tiny_net, 0.25, m=3)
    with torch.no_grad(), seeded_noise(model, torch.arange(4)), model.fixed_noise():
        assert torch.equal(model(x), model(x))
    with torch.no_grad(), seeded_noise(model, torch.arange(4)):
        assert not torch.equal(model(x), model(x))


def test_smoothed_noise_is_copies_of_the_seeded_images(tiny_net, images, monkeypatch):
    """The soft forward's m draws of image i are the first m blocks of image i's stream, so the
    first draws do not depend on m; a base-level noise source sees m copies of the batch."""
    x = images[0][:3]
    seeds = torch.tensor([5, 6, 7])
    small, large = SoftSmoothed(tiny_net, 0.5, m=2), SoftSmoothed(tiny_net, 0.5, m=4)
    with seeded_noise(small, seeds):
        a = small.noise(x)
    with seeded_noise(large, seeds):
        b = large.noise(x)
    assert torch.equal(a, b[:2])
    monkeypatch.setattr("safespot.smoothing.soft._MAX_WORDS", 50)  # generated in row chunks: same numbers
    with seeded_noise(large, seeds):
        assert torch.equal(large.noise(x), b)
    inner = NoisyClassifier(nn.Flatten(), 1.0)
    outer = SoftSmoothed(inner, 0.5, m=3)
    with torch.no_grad(), seeded_noise(outer, seeds):
        assert outer(x).shape == (3, x[0].numel())  # 3 * 3 rows through the inner source: accepted


@pytest.mark.parametrize("norm,eps,dtype", [("l2", 0.5, torch.float32), ("linf", 8 / 255, torch.float64)])
def test_seeded_pgd_on_a_smoothed_classifier_does_not_depend_on_the_batch(tiny_net, images, norm, eps, dtype):
    x, y = images[0][:8].to(dtype), images[1][:8]
    model = SmoothedClassifier(tiny_net.to(dtype), 0.25, m=4, n_vote=16)
    seeds = torch.arange(8) * 1009 + 17
    for attack in (
        PGD(norm, eps, steps=4, mode="eval"),
        PGD(norm, eps, steps=3, restarts=2, eot=2, mode="eval"),
        NoisyViewAttack(PGD(norm, eps, steps=3, eot=3, mode="eval")),  # EPGD
    ):
        batch = attack(model, x, y, seeds=seeds)
        assert LpBall(norm, eps).contains(batch, x, tol=1e-5).all()
        alone = torch.cat([attack(model, x[i : i + 1], y[i : i + 1], seeds=seeds[i : i + 1]) for i in (0, 5)])
        assert torch.allclose(alone, batch[[0, 5]], atol=1e-6, rtol=0)
        reverse = attack(model, x.flip(0), y.flip(0), seeds=seeds.flip(0)).flip(0)
        assert torch.allclose(reverse, batch, atol=1e-6, rtol=0)
        assert torch.allclose(attack(model, x, y, seeds=seeds), batch, atol=0, rtol=0)  # reproducible
    tiny_net.float()


# --- 2. success judged by the vote ------------------------------------------------------------
def _vote_wrong(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    return predict_logits(model, x, seeds).argmax(1) != y


def test_pgd_restart_selection_agrees_with_the_vote():
    """With m = 1 the soft estimate of one forward pass is a single noisy draw; restarts are
    judged by the vote that scores the points (paper 002, Appendix C.2), with the image seeds."""
    n = 24
    model = SmoothedClassifier(Threshold(0.5), sigma=0.5, m=1, n_vote=101)
    x = torch.rand(n, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x[:, 0, 0, 0] = torch.linspace(0.36, 0.56, n)  # near the vote's boundary: restarts disagree
    y = torch.zeros(n, dtype=torch.long)
    seeds = torch.arange(n) * 31 + 4
    restarts = 6
    attack = PGD("linf", 0.1, steps=1, step_size=1e-3, restarts=restarts, mode="eval")
    chosen = attack(model, x, y, seeds=seeds)
    # each restart alone (restart r uses the seeds + r * stride), judged by the seeded vote
    single = PGD("linf", 0.1, steps=1, step_size=1e-3, mode="eval")
    runs = [single(model, x, y, seeds=derive(seeds, "restart", r)) for r in range(restarts)]
    wrong = torch.stack([_vote_wrong(model, p, y, seeds) for p in runs])  # (restarts, n)
    ce = nn.functional.cross_entropy
    loss = torch.stack([ce(predict_logits(model, p, seeds), y, reduction="none") for p in runs])
    expected = x.clone()
    for i in range(n):
        best, best_loss, done = None, -float("inf"), False
        for r in range(restarts):
            if done:
                break
            if wrong[r, i] or loss[r, i] > best_loss:
                best, best_loss, done = r, float(loss[r, i]), bool(wrong[r, i])
        expected[i] = runs[best][i]
    assert torch.equal(chosen, expected)
    assert torch.equal(_vote_wrong(model, chosen, y, seeds), wrong.any(0))  # broken iff some restart broke it
    first = wrong.float().argmax(0)
    assert (wrong.any(0) & (first > 0)).any() and (~wrong.any(0)).any()  # the case is not trivial
    # scored with other seeds than the attack's (e.g. the white-box sweep): judged by those
    other = seeds + 5
    judged = attack(model, x, y, seeds=seeds, vote_seeds=other)
    wrong_other = torch.stack([_vote_wrong(model, p, y, other) for p in runs])
    assert torch.equal(_vote_wrong(model, judged, y, other), wrong_other.any(0))


def test_autoattack_success_is_judged_by_the_vote(tiny_net, images):
    """A single soft estimate (m = 1, large sigma) often "succeeds" on noise; an image the vote
    still classifies correctly must stay unchanged (and remain a target of later members)."""
    x, y = images
    model = SmoothedClassifier(tiny_net, 0.5, m=1, n_vote=32)
    seeds = torch.arange(len(x)) + 100
    with torch.no_grad():
        y = predict_logits(model, x, seeds).argmax(1)  # every image starts correct under the vote
    for attack in (
        AutoAttack("l2", 0.5, attacks=["apgd-ce", "apgd-t"], n_iter=3),
        AutoAttack("l2", 0.5, version="rand", n_iter=3, eot_iter=2),
    ):
        x_adv = attack(model, x, y, seeds=seeds)
        changed = (x_adv != x).flatten(1).any(1)
        assert changed.any()
        assert (_vote_wrong(model, x_adv, y, seeds) == changed).all()
        assert torch.equal(attack(model, x, y, seeds=seeds), x_adv)


def test_autoattack_is_judged_by_the_vote_seeds_it_is_given(tiny_net, images):
    """As PGD's restarts: with ``vote_seeds`` (the seeds the caller scores the points with, e.g.
    the white-box sweep, whose attack seeds differ) success is judged by the vote with them."""
    x, y = images
    model = SmoothedClassifier(tiny_net, 0.5, m=1, n_vote=32)
    seeds = torch.arange(len(x)) + 100
    with torch.no_grad():
        y = predict_logits(model, x, seeds).argmax(1)  # every image starts correct under that vote
    attack = AutoAttack("l2", 0.5, attacks=["apgd-ce", "apgd-t"], n_iter=3)
    x_adv = attack(model, x, y, seeds=seeds + 7, vote_seeds=seeds)
    changed = (x_adv != x).flatten(1).any(1)
    assert changed.any()
    assert (_vote_wrong(model, x_adv, y, seeds) == changed).all()


def test_noisy_view_votes_like_the_smoothed_model(tiny_net, images):
    x = images[0][:4]
    model = SmoothedClassifier(tiny_net, 0.25, m=2, n_vote=8)
    view = NoisyViewAttack(PGD("l2", 0.5, steps=1)).noisy_view(model)
    assert isinstance(view, VotingNoisyView) and view.sigma == 0.25
    assert torch.equal(predict_logits(view, x, torch.arange(4)), model.vote_logits(x, seed=torch.arange(4)))
    assert type(NoisyViewAttack(PGD("l2", 0.5), sigma=0.1).noisy_view(tiny_net)) is NoisyClassifier
    assert list(view.modules())[1:] == list(tiny_net.modules())  # the smoothed model is no submodule


# --- 3. draws for robustification and for attacks ----------------------------------------------
class CountRows(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(len(x))
        return x.flatten(1)[:, :3]


def test_draws_for_robustification_and_attacks():
    base = CountRows()
    model = SmoothedClassifier(base, 0.25)
    assert (model.m, model.m_robustify, model.m_attack) == (50, 5, 50)  # paper 002, Appendix C.2
    x = torch.rand(2, 1, 2, 2)
    model(x)
    with smoothing_draws(model, "robustify"):
        assert model.m == 5
        model(x)
        with smoothing_draws(model, "attack"):
            model(x)
        assert model.m == 5
    assert model.m == 50 and base.rows == [100, 10, 100]
    same = SmoothedClassifier(base, 0.25, m=3)
    assert (same.m, same.m_robustify, same.m_attack) == (3, 3, 3)
    with smoothing_draws(nn.Linear(2, 2), "robustify"):  # a plain model is left alone
        pass
    with pytest.raises(ThreatConfigError, match="draw role"), smoothing_draws(model, "train"):  # type: ignore[arg-type]
        pass
    with pytest.raises(ThreatConfigError, match="m_robustify"):
        SmoothedClassifier(base, 0.25, m_robustify=0)


def test_smoothing_config_keys(tmp_path):
    cfg = compose_config("evaluate", ["ckpt_path=x", "smoothing.sigma=0.25"], tmp_path)
    assert cfg.smoothing.m is None and cfg.smoothing.m_robustify == 5 and cfg.smoothing.m_attack == 50
    assert cfg.smoothing.rank_weights is None
    model = instantiate(cfg.smoothing, base=nn.Identity())
    assert (model.m, model.m_robustify, model.m_attack, model.rank_weights) == (50, 5, 50, None)
    cfg = compose_config(
        "evaluate", ["ckpt_path=x", "smoothing.sigma=0.25", "smoothing.m=2", "smoothing.rank_weights=top2"], tmp_path
    )
    model = instantiate(cfg.smoothing, base=nn.Identity())
    assert (model.m, model.m_robustify, model.m_attack, model.rank_weights) == (2, 2, 2, (1.0, 0.5))


# --- 4. paper 003's weighted vote --------------------------------------------------------------
def test_weighted_vote_weights_every_rank_geometrically():
    class Ranking(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0]).expand(len(x), 5)  # ranks: 1 -> 1, 3 -> 2, ...

    x = torch.rand(3, 1, 2, 2)
    model = SmoothedClassifier(Ranking(), 0.1, n_vote=5, vote="weighted")
    weights = torch.tensor([1 / 8, 1.0, 1 / 4, 1 / 2, 1 / 16])  # class c gets 2^-(rank(c) - 1)
    assert model.vote_logits(x, seed=0).exp()[0] == pytest.approx(weights / weights.sum(), abs=1e-6)
    assert torch.equal(model.rank_weight_vector(5, torch.float32, torch.device("cpu")), 2.0 ** -torch.arange(5.0))
    assert check_rank_weights("geometric") is None and check_rank_weights("top2") == (1.0, 0.5)
    with pytest.raises(ThreatConfigError, match="rank_weights must be one of"):
        check_rank_weights("top3")


# --- 5. paper 003's PGD on the noisy model -------------------------------------------------------
def test_noisy_model_pgd_and_epgd_presets(tmp_path, tiny_net, images):
    cfg = compose_config(
        "evaluate",
        ["ckpt_path=x", "threat.norm=l2", "threat.eps=0.5", "smoothing.sigma=0.25", "evaluation=[pgd_noisy,epgd]"],
        tmp_path,
    )
    noisy, epgd = (instantiate(cfg.evaluation[name]) for name in ("pgd_noisy", "epgd"))
    model = SmoothedClassifier(tiny_net, 0.25, m_attack=7, n_vote=8)
    assert noisy.name == "pgd_noisy" and noisy.attack.inner_attack(model).eot == 1
    assert epgd.attack.inner_attack(model).eot == 7  # EPGD averages m_attack single-draw gradients
    assert noisy.attack.inner_attack(model).steps == 20 and noisy.attack.eps == 0.5
    x, y = images[0][:4], images[1][:4]
    fast = NoisyViewAttack(PGD("l2", 0.5, steps=2, mode="eval"), eot=None)
    x_adv = fast(model, x, y, seeds=torch.arange(4))
    assert LpBall("l2", 0.5).contains(x_adv, x, tol=1e-5).all()
    assert torch.equal(fast(model, x, y, seeds=torch.arange(4)), x_adv)
    with pytest.raises(ThreatConfigError, match="eot"):
        NoisyViewAttack(lambda model, x, y: x, eot=3)
