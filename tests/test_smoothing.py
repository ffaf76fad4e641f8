"""Randomised smoothing: Cohen et al.'s CERTIFY against analytically known probabilities,
PREDICT's abstention, votes, seeded and chunk-independent sampling, randomised PGD and EPGD
on the smoothed loss, the evaluation engine's scoring and an end-to-end evaluate.py run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from scipy import stats
from torch import nn

from conftest import SYNTHETIC, assert_same_run_files, compose_config
from safespot.attacks import PGD, NoisyViewAttack
from safespot.errors import ConfigError
from safespot.evaluate import evaluate
from safespot.evaluation import CertifyEvaluation, Clean
from safespot.smoothing import (
    NoisyClassifier,
    SmoothedClassifier,
    SoftSmoothed,
    certified_accuracy,
    certified_curve,
    clopper_pearson_lower,
)
from safespot.smoothing.certified import certified_table
from safespot.smoothing.smoothed import Certificate
from safespot.threat import LpBall, ThreatConfigError
from safespot.utils.plain import to_plain

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny forward passes: one thread is fastest


class LinearTwoClass(nn.Module):
    """``c(x) = 1[w.x + b > 0]`` on flattened inputs: ``P(c(x + xi) = 1) = Phi((w.x + b) / (sigma ||w||))``."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.register_buffer("w", w)
        self.b = b
        self.num_classes = 2

    def margin(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w + self.b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.margin(x)
        return torch.stack([-z, z], 1)


class FirstCoordinate(nn.Module):
    """Class 1 iff the first input coordinate is positive: a fair coin around x_0 = 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1)[:, 0]
        return torch.stack([-z, z], 1)


class FixedRanking(nn.Module):
    """The same logits for every input: class 0 first, then 1, 2, 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([3.0, 2.0, 1.0, 0.0]).expand(len(x), 4)


def _linear_case(sigma: float, probabilities: list[float]) -> tuple[LinearTwoClass, torch.Tensor]:
    """A linear classifier and inputs whose top-class probability under noise is each of ``probabilities``
    (alternating between the classes)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, generator=g)
    base = LinearTwoClass(w, b=0.1)
    x = []
    for k, p in enumerate(probabilities):
        margin = stats.norm.ppf(p) * sigma * float(w.norm()) * (1 if k % 2 == 0 else -1)
        direction = torch.rand(16, generator=g)
        t = (margin - 0.1 - float(direction @ w)) / float(w @ w)
        x.append((direction + t * w).view(1, 4, 4))
    return base, torch.stack(x)


# --- CERTIFY and PREDICT ----------------------------------------------------------------
def test_certify_bounds_the_known_probability_and_recovers_the_radius():
    sigma, n, alpha = 0.5, 20_000, 0.001
    base, x = _linear_case(sigma, [0.6, 0.75, 0.9, 0.97, 0.995])
    model = SmoothedClassifier(base, sigma, max_batch=8192)
    cert = model.certify(x, n0=100, n=n, alpha=alpha, seed=3)
    margin = base.margin(x).double()
    true_p = torch.tensor(stats.norm.cdf((margin.abs() / (sigma * base.w.norm())).numpy()))
    true_radius = (margin.abs() / base.w.norm()).float()
    assert cert.pred.tolist() == (margin > 0).long().tolist()
    assert cert.counts.sum(1).tolist() == [n] * len(x)
    rows = zip(true_p.tolist(), cert.pA_lower.tolist(), cert.radius.tolist(), true_radius.tolist(), strict=True)
    for p, p_low, r, r_true in rows:
        slack = 6 * math.sqrt(p * (1 - p) / n) + 1e-4
        assert p - slack <= p_low <= p + 1e-6  # the lower bound holds and is tight up to Clopper-Pearson slack
        assert r == pytest.approx(sigma * stats.norm.ppf(p_low), rel=1e-5, abs=1e-6)
        r_loose = sigma * stats.norm.ppf(max(p - slack, 0.5))
        assert r_loose - 1e-4 <= r <= r_true + 1e-4
    n_a = cert.counts.gather(1, cert.pred[:, None]).squeeze(1).numpy()
    assert cert.pA_lower.numpy() == pytest.approx(stats.beta.ppf(alpha, n_a, n - n_a + 1), rel=1e-5)


def test_clopper_pearson_edges():
    assert clopper_pearson_lower([0], 10, 0.01).tolist() == [0.0]
    assert clopper_pearson_lower([10], 10, 0.01)[0] == pytest.approx(0.01 ** (1 / 10))


def test_predict_and_certify_abstain_on_a_tie():
    model = SmoothedClassifier(FirstCoordinate(), sigma=1.0, max_batch=4096)
    x = torch.zeros(6, 1, 2, 2)
    x[3:, 0, 0, 0] = 5.0  # far on the class-1 side: no abstention
    pred = model.predict(x, n=2000, alpha=0.001, seed=0)
    assert pred.tolist() == [-1, -1, -1, 1, 1, 1]
    cert = model.certify(x, n0=50, n=2000, seed=0)
    assert cert.pred[:3].tolist() == [-1] * 3 and cert.radius[:3].tolist() == [0.0] * 3
    assert (cert.pred[3:] == 1).all() and (cert.radius[3:] > 2.0).all()


# --- votes, seeds and chunks --------------------------------------------------------------
def test_votes_follow_their_definitions():
    x = torch.rand(2, 1, 2, 2)
    probs = {
        "majority": [1.0, 0.0, 0.0, 0.0],
        "soft": torch.softmax(torch.tensor([3.0, 2.0, 1.0, 0.0]), 0).tolist(),
        # default rank weights 2^-(r-1) on every rank (paper 003's reference code), normalised
        "weighted": [8 / 15, 4 / 15, 2 / 15, 1 / 15],
    }
    for vote, expected in probs.items():
        scores = SmoothedClassifier(FixedRanking(), 0.1, n_vote=7, vote=vote).vote_logits(x, seed=0).exp()
        assert scores == pytest.approx(torch.tensor([expected, expected]).clamp_min(1e-12), abs=1e-6)
    top2 = SmoothedClassifier(FixedRanking(), 0.1, n_vote=7, vote="weighted", rank_weights="top2")
    assert top2.vote_logits(x, seed=0).exp()[0].tolist() == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0], abs=1e-6)
    top3 = SmoothedClassifier(FixedRanking(), 0.1, vote="weighted", rank_weights=[1, 1, 1]).vote_logits(x, seed=0)
    assert top3.exp()[0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0], abs=1e-6)


def test_sampling_is_seeded_and_independent_of_chunking_and_batching(tiny_net, images):
    x = images[0][:6]
    one = SmoothedClassifier(tiny_net, 0.25, max_batch=10_000)
    many = SmoothedClassifier(tiny_net, 0.25, max_batch=7)
    seeds = torch.arange(6) * 101 + 5
    counts = one.sample_counts(x, 90, seed=seeds)
    assert counts.sum(1).tolist() == [90] * 6
    assert torch.equal(many.sample_counts(x, 90, seed=seeds), counts)
    assert torch.equal(one.sample_counts(x[2:4], 90, seed=seeds[2:4]), counts[2:4])  # batch composition
    assert not torch.equal(one.sample_counts(x, 90, seed=seeds + 1), counts)
    soft_one = SmoothedClassifier(tiny_net, 0.25, vote="soft", max_batch=10_000).vote_logits(x, seed=seeds)
    soft_many = SmoothedClassifier(tiny_net, 0.25, vote="soft", max_batch=5).vote_logits(x, seed=seeds)
    assert torch.allclose(soft_one, soft_many, atol=1e-5)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(one.sample_counts(x, 40, generator=g1), many.sample_counts(x, 40, generator=g2))


def test_fixed_seeds_give_identical_certificates(tiny_net, images):
    x = images[0][:4]
    model = SmoothedClassifier(tiny_net, 0.25, max_batch=64)
    a = model.certify(x, n0=20, n=300, alpha=0.01, seed=11)
    model.max_batch = 1000
    b = model.certify(x, n0=20, n=300, alpha=0.01, seed=11)
    c = model.certify(x, n0=20, n=300, alpha=0.01, seed=12)
    assert torch.equal(a.pred, b.pred) and torch.equal(a.radius, b.radius) and torch.equal(a.counts, b.counts)
    assert not torch.equal(a.counts, c.counts)
    assert torch.equal(model.predict(x, n=200, seed=11), model.predict(x, n=200, seed=11))


class RecordingBase(nn.Module):
    """Records the noisy inputs it is given; class 1 iff the first coordinate is positive."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        first = x.flatten(1)[:, :1]
        return torch.cat([-first, first], 1)


#: The per-image seeds of ``seed=7`` for a batch of four (an integer seed is expanded this way).
SEED_7_IMAGES = [-4873906296908388014, -4105697605423906230, -8017417250391388015, -3349638618623693864]


def _monte_carlo_noise(x: torch.Tensor, seeds: torch.Tensor, n: int, estimate: int, sigma: float) -> torch.Tensor:
    """Draw j of image i: elements ``j d .. (j + 1) d - 1`` of its ``monte_carlo_noise`` stream
    for ``estimate``, rows in draw-major order, shape ``(n * B, *x.shape[1:])``."""
    from safespot.utils.rng import derive, seeded_normal_at

    d = x[0].numel()
    keys = derive(seeds, "monte_carlo_noise", estimate).repeat(n)
    draws = torch.arange(n).repeat_interleave(len(x))
    return sigma * seeded_normal_at(keys, draws * d, d).view(len(x) * n, *x.shape[1:])


def test_monte_carlo_noise_is_the_named_stream_of_each_estimate():
    """The draws of every estimate (counts, CERTIFY's selection and estimation, PREDICT, the
    vote) are the pinned streams of the image seeds: the same noise for the same seeds."""
    from safespot.smoothing.smoothed import image_seed_tensor

    x = torch.linspace(-0.5, 0.5, 4 * 3 * 2 * 2).view(4, 3, 2, 2)
    seeds = torch.tensor([3, 5, -9, 2**40 + 1])
    assert image_seed_tensor(4, seed=7).tolist() == SEED_7_IMAGES
    base = RecordingBase()
    model = SmoothedClassifier(base, 0.25, n_vote=6, max_batch=1000)
    calls = [
        (lambda: model.sample_counts(x, 5, seed=seeds), seeds, 5, 0),
        (lambda: model.predict(x, n=6, seed=seeds), seeds, 6, 3),
        (lambda: model.vote_logits(x, seed=7), torch.tensor(SEED_7_IMAGES), 6, 4),
    ]
    for call, used, n, estimate in calls:
        base.inputs.clear()
        call()
        noise = torch.cat(base.inputs) - x.repeat(n, 1, 1, 1)
        assert torch.allclose(noise, _monte_carlo_noise(x, used, n, estimate, 0.25), atol=1e-6)
    base.inputs.clear()
    model.certify(x, n0=3, n=5, alpha=0.01, seed=seeds)
    select, count = torch.cat(base.inputs).split([4 * 3, 4 * 5])
    assert torch.allclose(select - x.repeat(3, 1, 1, 1), _monte_carlo_noise(x, seeds, 3, 1, 0.25), atol=1e-6)
    assert torch.allclose(count - x.repeat(5, 1, 1, 1), _monte_carlo_noise(x, seeds, 5, 2, 0.25), atol=1e-6)


# --- attacks on the smoothed classifier ---------------------------------------------------
def _soft_loss(model: SmoothedClassifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The soft smoothed loss estimated with many draws under a fixed seed."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        logp = SoftSmoothed(model.base, model.sigma, m=128)(x)
    return nn.functional.nll_loss(logp, y, reduction="none")


def test_randomised_pgd_raises_the_soft_smoothed_loss_and_stays_in_the_ball(tiny_net, images):
    x, _ = images
    model = SmoothedClassifier(tiny_net, 0.1, m=8)
    y = model.vote_logits(x, seed=0).argmax(1)
    x_adv = PGD("l2", 0.5, steps=8, mode="eval")(model, x, y, seeds=torch.arange(len(x)))
    assert LpBall("l2", 0.5).contains(x_adv, x, tol=1e-5).all()
    clean_loss = _soft_loss(model, x, y)
    assert (_soft_loss(model, x_adv, y) > clean_loss).all()
    # EPGD: the mean of single-draw gradients on the noisy view of the same smoothed classifier
    epgd = NoisyViewAttack(PGD("l2", 0.5, steps=8, eot=8, mode="eval"))
    assert isinstance(epgd.noisy_view(model), NoisyClassifier) and epgd.noisy_view(model).sigma == 0.1
    x_e = epgd(model, x, y, seeds=torch.arange(len(x)))
    assert LpBall("l2", 0.5).contains(x_e, x, tol=1e-5).all()
    assert (_soft_loss(model, x_e, y) > clean_loss).all()
    with pytest.raises(ValueError, match="smoothed model"):
        epgd(tiny_net, x, y)


def test_autoattack_rand_runs_on_the_smoothed_classifier(tiny_net, images):
    from safespot.attacks import AutoAttack

    x = images[0][:8]
    model = SmoothedClassifier(tiny_net, 0.1, m=2)
    with torch.no_grad():
        y = model(x).argmax(1)
    x_adv = AutoAttack("l2", 0.5, version="rand", n_iter=3, eot_iter=2)(model, x, y)
    assert LpBall("l2", 0.5).contains(x_adv, x, tol=1e-5).all() and not torch.equal(x_adv, x)


# --- the evaluation engine ------------------------------------------------------------------
def test_score_uses_the_vote_for_smoothed_models(tiny_net):
    sigma = 0.5
    base, x = _linear_case(sigma, [0.75])
    x = x.expand(64, -1, -1, -1).contiguous()
    y = torch.ones(64, dtype=torch.long) if base.margin(x[:1]) > 0 else torch.zeros(64, dtype=torch.long)
    model = SmoothedClassifier(base, sigma, n_vote=200)
    calls = []
    vote = model.vote_logits
    model.vote_logits = lambda inp, seed=None: calls.append(seed) or vote(inp, seed=seed)
    fields = Clean().score(model, x, x, y, seeds=torch.arange(64))
    assert len(calls) == 1 and torch.equal(calls[0], torch.arange(64))
    assert fields["clean/correct"].all()  # the vote is right on every copy ...
    torch.manual_seed(0)
    with torch.no_grad():
        single = NoisyClassifier(base, sigma)(x).argmax(1)
    assert (single != y).any()  # ... where single noisy passes are not
    images = torch.rand(5, 3, 8, 8)
    plain = Clean().score(tiny_net, images, images, torch.zeros(5, dtype=torch.long))
    assert torch.equal(plain["clean/pred"], tiny_net(images).argmax(1))  # ordinary models: unchanged


def test_certify_evaluation_fields_and_certified_accuracy():
    sigma = 0.5
    base, x = _linear_case(sigma, [0.6, 0.9, 0.99, 0.999])
    y = (base.margin(x) > 0).long()
    y[0] = 1 - y[0]  # a wrong label: never certified correct
    model = SmoothedClassifier(base, sigma, max_batch=2048)
    evaluation = CertifyEvaluation(n0=50, n=4000, alpha=0.001, radii=[0, 0.25, 1.0], max_batch=512)
    fields, points = evaluation(model, x, y, torch.arange(4) + 7)
    assert points is x and model.max_batch == 2048
    assert fields["certify/correct"].tolist() == [False, True, True, True]
    for r, key in ((0.0, "certify/cert_0"), (0.25, "certify/cert_0.25"), (1.0, "certify/cert_1")):
        assert torch.equal(fields[key], fields["certify/correct"] & (fields["certify/radius"] >= r))
    radius, correct = fields["certify/radius"].numpy(), fields["certify/correct"].numpy()
    assert certified_accuracy(radius, correct, 0.0) == 0.75
    assert certified_accuracy(radius, correct, [0.0, 100.0]).tolist() == [0.75, 0.0]
    curve = certified_curve(radius, correct)
    assert curve["certified_accuracy"].is_monotonic_decreasing and curve["certified_accuracy"].iloc[-1] == 0
    halves = [evaluation(model, x[s], y[s], (torch.arange(4) + 7)[s])[0] for s in (slice(0, 1), slice(1, 4))]
    for key, value in fields.items():  # per-image seeds: independent of batching
        assert torch.equal(torch.cat([h[key] for h in halves]), value)
    with pytest.raises(ValueError, match="smoothed classifier"):
        evaluation(base, x, y, torch.arange(4))


def test_a_radius_equal_to_the_query_radius_counts_as_certified(monkeypatch):
    """Cohen et al. (2019): certified accuracy at r counts the correct images with radius >= r,
    so a radius exactly r is certified at r. Radii on the papers' grid (exact in float32), one
    just below 0.25 and one correct only at radius 0 (pA_lower = 1/2 exactly certifies a radius 0)."""
    radius = [0.25, 0.5, 0.0, 0.2499, 0.75, 1.0]
    correct = [True, True, True, True, False, True]
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    expected = [5 / 6, 3 / 6, 2 / 6, 1 / 6, 1 / 6]  # by hand: images {0,1,2,3,5}, {0,1,5}, {1,5}, {5}, {5}
    assert certified_accuracy(radius, correct, grid).tolist() == pytest.approx(expected)
    assert certified_accuracy(radius, correct, 0.5) == pytest.approx(2 / 6)
    records = pd.DataFrame({"c/radius": radius, "c/correct": correct})
    assert certified_table(records, ["c"], grid)["c"].tolist() == pytest.approx(expected)
    # the evaluation's per-image fields (whose means are the summary's cert_<r>) agree
    model = SmoothedClassifier(LinearTwoClass(torch.ones(1), 0.0), 0.25)
    y = torch.tensor([1, 1, 1, 1, 0, 1])
    pred = torch.tensor([1, 1, 1, 1, 1, 1])
    certificate = Certificate(pred, torch.tensor(radius), torch.full((6,), 0.9), torch.zeros(6, 2))
    monkeypatch.setattr(model, "certify", lambda *args, **kwargs: certificate)
    fields, _ = CertifyEvaluation("c", radii=grid)(model, torch.zeros(6, 1), y, torch.arange(6))
    assert fields["c/correct"].tolist() == correct
    means = [fields[f"c/cert_{r:g}"].float().mean().item() for r in grid]
    assert means == pytest.approx(expected)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: SmoothedClassifier(nn.Identity(), 0.0), "sigma must be > 0"),
        (lambda: SmoothedClassifier(nn.Identity(), -1), "sigma must be > 0"),
        (lambda: SmoothedClassifier(nn.Identity(), 0.25, vote="median"), "vote must be one of"),
        (lambda: SmoothedClassifier(nn.Identity(), 0.25, n_vote=0), "n_vote must be an integer >= 1"),
        (lambda: SmoothedClassifier(nn.Identity(), 0.25, max_batch=0), "max_batch must be an integer >= 1"),
        (lambda: SmoothedClassifier(nn.Identity(), 0.25, rank_weights=[]), "rank_weights"),
        (lambda: SmoothedClassifier(FirstCoordinate(), 0.25).predict(torch.zeros(1, 2), alpha=0), "alpha must lie"),
        (lambda: SmoothedClassifier(FirstCoordinate(), 0.25).certify(torch.zeros(1, 2), alpha=1.5), "alpha must lie"),
        (lambda: SmoothedClassifier(FirstCoordinate(), 0.25).certify(torch.zeros(1, 2), n=0), "n must be"),
        (lambda: SmoothedClassifier(FirstCoordinate(), 0.25).certify(torch.zeros(1, 2), n0=0), "n0 must be"),
        (lambda: CertifyEvaluation(radii=[-1.0]), "radii must be >= 0"),
        (lambda: CertifyEvaluation(alpha=2), "alpha must lie"),
    ],
)
def test_bad_settings_raise_one_clear_error(build, match):
    with pytest.raises(ThreatConfigError, match=match):
        build()


# --- end to end ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """A briefly fitted small CNN on the synthetic data, saved like train.py saves it."""
    root = tmp_path_factory.mktemp("smooth_ckpt")
    cfg = compose_config("train", [*SYNTHETIC, "threat=l2_0.5", "data.n_train=256"], root / "run")
    from safespot.utils.instantiate import instantiate

    torch.manual_seed(0)
    net = instantiate(cfg.model)
    x, y = instantiate(cfg.data).build_datasets()[0].tensors
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        for k in range(0, 256, 32):
            noisy = x[k : k + 32] + 0.25 * torch.randn_like(x[k : k + 32])  # Gaussian augmentation (Cohen et al.)
            loss = nn.functional.cross_entropy(net(noisy), y[k : k + 32])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    path = root / "small.ckpt"
    config = to_plain(OmegaConf.to_container(cfg, resolve=True))
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "safespot_config": config, "hyper_parameters": {"method": "natural"}}, path)
    return path


def _evaluate(ckpt: Path, out: Path, *overrides: str) -> dict:
    cfg = compose_config(
        "evaluate",
        [f"ckpt_path={ckpt}", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", *overrides],
        out,
    )
    return evaluate(cfg)


SMOOTH_RUN = (
    "smoothing.sigma=0.25",
    "smoothing.n_vote=16",
    "smoothing.m=2",
    "evaluation=[clean,certify,pgd_smooth]",
    "evaluation.certify.n0=8",
    "evaluation.certify.n=64",
    "evaluation.pgd_smooth.attack.steps=2",
)


def test_evaluate_with_smoothing_certifies_and_attacks(small_checkpoint, tmp_path):
    out = tmp_path / "smooth"
    results = _evaluate(small_checkpoint, out, *SMOOTH_RUN, "evaluation.certify.alpha=0.05", "data.test_subset=12")
    for r in ("0", "0.25", "0.5", "0.75", "1"):
        assert 0 <= results[f"certify/cert_{r}"] <= results["certify/acc"] <= 1
    assert results["certify/cert_0"] == pytest.approx(results["certify/acc"])
    assert results["meta"]["smoothing"]["sigma"] == 0.25 and results["n_images"] == 12
    records = pd.read_csv(out / "records.csv")
    assert {"certify/radius", "certify/pA_lower", "certify/cert_0.5", "pgd_smooth/correct"} <= set(records)
    assert records["pgd_smooth/dist"].max() <= 0.5 + 1e-5
    table = pd.read_csv(out / "certified_accuracy.csv")
    assert table["radius"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert table["certify"].tolist() == pytest.approx(
        [results[f"certify/cert_{r}"] for r in ("0", "0.25", "0.5", "0.75", "1")]
    )
    assert (out / "certified_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "results.json").read_text())["certify/acc"] == results["certify/acc"]


def test_smoothing_only_evaluations_refuse_a_plain_model(small_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"smoothing\.sigma"):
        _evaluate(small_checkpoint, tmp_path / "plain", "evaluation=[clean,epgd]")
    with pytest.raises(ThreatConfigError, match="vote must be one of"):
        _evaluate(small_checkpoint, tmp_path / "bad", "smoothing.sigma=0.25", "smoothing.vote=median")


def test_preemptive_robustification_of_the_smoothed_classifier(small_checkpoint, tmp_path):
    """Paper 002, Section 3.6: the robustifier runs on the soft smoothed classifier, points are
    scored by the vote, and robustified images are certified (Tables 5-7 layouts)."""
    from safespot.report import certified_preemptive_table, load_run, smoothed_table

    out = tmp_path / "preempt"
    fast = ["max_iter=3", "inner_steps=3", "beta=0.05"]
    results = _evaluate(
        small_checkpoint,
        out,
        "smoothing.sigma=0.25",
        "smoothing.n_vote=16",
        "smoothing.m=2",
        "evaluation=[clean,preempt_smooth_none,preempt_smooth_sfull,preempt_certify_none,preempt_certify_sfull]",
        *[f"evaluation.preempt_smooth_sfull.robustifier.{o}" for o in fast],
        *[f"evaluation.preempt_certify_sfull.robustifier.{o}" for o in fast],
        *[f"evaluation.preempt_smooth_{r}.attacks.{a}.steps=2" for r in ("none", "sfull") for a in ("pgd", "pgd10")],
        "evaluation.preempt_smooth_sfull.attacks.pgd10.restarts=2",
        "evaluation.preempt_smooth_none.attacks.pgd10.restarts=2",
        "~evaluation.preempt_smooth_sfull.white_box.attacks.pgd10",
        "evaluation.preempt_smooth_sfull.white_box.attacks.pgd.steps=2",
        "evaluation.preempt_smooth_sfull.white_box.eps_fractions=[1.0]",
        *[f"evaluation.preempt_certify_{r}.certify.{k}" for r in ("none", "sfull") for k in ("n0=8", "n=64")],
        "data.test_subset=8",
    )
    records = pd.read_csv(out / "records.csv")
    assert (records["preempt_smooth_sfull/dist"] <= 0.5 + 1e-5).all()  # x_r inside B_delta(x_o), l_2
    assert (records["preempt_smooth_sfull_pgd/dist"] <= 0.5 + 1e-5).all()  # attacks inside B_eps(x_r)
    # None leaves the images alone: its clean accuracy is the vote's accuracy on the originals
    assert results["preempt_smooth_none/acc"] == pytest.approx(results["clean/acc"])
    assert 0 <= results["preempt_certify_sfull_certify/cert_0.5"] <= results["preempt_certify_sfull_certify/cert_0"]
    run = load_run(out)
    table = smoothed_table([run])
    assert table["Preempt."].tolist() == ["None", "Ours"] and not table["White PGD"].isna()[1]
    certified = certified_preemptive_table([run])
    assert certified["Preempt."].tolist() == ["None", "Ours"] and "r = 0.5" in certified
    assert (out / "certified_accuracy.csv").is_file()


def test_smoothed_evaluation_files_are_the_same_with_two_processes(small_checkpoint, tmp_path):
    """Certificates, records, results and panels of a smoothed evaluation (CERTIFY and randomised
    PGD) are written by the worker holding the gathered records: with ``ddp_spawn`` the parent
    process used to write no certified_accuracy.* at all."""
    args = (*SMOOTH_RUN, "data.test_subset=11", "data.eval_batch_size=4")
    one = _evaluate(small_checkpoint, tmp_path / "one", *args, "trainer=cpu")
    two = _evaluate(small_checkpoint, tmp_path / "two", *args, "trainer=ddp_sim")
    assert (tmp_path / "two" / "certified_accuracy.csv").is_file() and one["n_images"] == two["n_images"] == 11
    assert_same_run_files(tmp_path / "one", tmp_path / "two")


def test_vectorised_binomial_test_equals_scipy_binomtest():
    """PREDICT's abstention test for a whole batch at once equals scipy's per-image binomtest."""
    from scipy import stats

    from safespot.smoothing.smoothed import binomial_pvalue_half

    pairs = [(a, b) for a in range(0, 40) for b in range(0, a + 1) if a + b > 0] + [(600, 400), (9000, 1000)]
    n_a, n_b = np.array(pairs).T
    expected = np.array([stats.binomtest(int(a), int(a + b), 0.5).pvalue for a, b in pairs])
    np.testing.assert_allclose(binomial_pvalue_half(n_a, n_b), expected, rtol=1e-9, atol=1e-300)


def test_draw_rows_cover_each_draw_of_each_image_once_in_order():
    """The noisy samples of a vote: draw-then-image order (a chunk holds few draws, i.e. few
    forward passes of a network whose noise a pass shares), chunks of at most max_batch rows."""
    from safespot.smoothing.smoothed import draw_rows

    parts = list(draw_rows(3, 7, 5, torch.device("cpu")))
    assert [len(owner) for owner, _ in parts] == [5, 5, 5, 5, 1]
    owner, draw = (torch.cat(t) for t in zip(*parts, strict=True))
    assert torch.equal(owner, torch.arange(3).repeat(7)) and torch.equal(draw, torch.arange(7).repeat_interleave(3))
