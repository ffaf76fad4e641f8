"""Gaussian-noise training: Cohen et al.'s augmentation, SmoothAdv (Salman et al.) and
adversarial training under noise injection (paper 003)."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from safespot.methods import GaussianTraining
from safespot.methods.gaussian import multi_noise_loss, noisy_copies
from safespot.threat import LpBall, ThreatConfigError
from safespot.train import train

EPS = 0.5
THREAT = {"norm": "l2", "eps": EPS, "step_size": EPS / 4, "steps": 5}


def _module(net: nn.Module, **kwargs: Any) -> GaussianTraining:
    return GaussianTraining(net=net, optimizer=partial(torch.optim.SGD, lr=0.1), threat=THREAT, **kwargs)


class Recorder(nn.Module):
    """Passes inputs to ``net`` and keeps a detached copy of each."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.num_classes = net.num_classes
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.net(x)


def _soft_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-image ``-log mean_i softmax(c(x + xi_i))_y``."""
    with torch.no_grad():
        _, log_probs = multi_noise_loss(net(noisy_copies(x, noise)), y, noise.shape[0])
    return -log_probs.gather(1, y[:, None]).squeeze(1)


@pytest.mark.parametrize("m", [1, 3])
def test_plain_loss_is_cross_entropy_on_the_drawn_noise(tiny_net, images, m):
    x, y = images
    module = _module(tiny_net, sigma=0.25, m=m)
    torch.manual_seed(7)
    loss, log_probs = module.training_loss(x, y)
    torch.manual_seed(7)
    noise = 0.25 * torch.randn(m, *x.shape)
    with torch.no_grad():
        expected = torch.stack([F.cross_entropy(tiny_net(x + noise[i]), y) for i in range(m)]).mean()
        clean = F.cross_entropy(tiny_net(x), y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(loss.item() - clean.item()) > 1e-4  # far above float error (the tiny net is near-uniform)
    assert log_probs.shape == (x.shape[0], tiny_net.num_classes)
    assert torch.allclose(log_probs.exp().sum(1), torch.ones(x.shape[0]), atol=1e-5)


def test_noisy_inputs_are_not_clamped(tiny_net, images):
    x, y = images
    recorder = Recorder(tiny_net)
    _module(recorder, sigma=0.5).training_loss(x, y)
    (seen,) = recorder.inputs
    assert seen.min() < 0 and seen.max() > 1


def test_smooth_adv_reuses_the_same_draws_at_every_step_and_for_training(tiny_net, images):
    x, y = images
    m = 3
    recorder = Recorder(tiny_net)
    module = _module(recorder, smooth_adv=True, m=m, sigma=0.25)
    x_adv, noise = module.smooth_adv_examples(x, y)
    steps = recorder.inputs
    assert len(steps) == THREAT["steps"] and noise.shape == (m, *x.shape)
    for seen in steps:
        # every forward sees x_t + xi_i: subtracting the first copy removes x_t, leaving xi_i - xi_1
        copies = seen.view(m, *x.shape)
        assert torch.allclose(copies - copies[0], noise - noise[0], atol=1e-5)
    recorder.inputs.clear()
    module.noisy_loss(x_adv, y, noise)
    (trained_on,) = recorder.inputs
    assert torch.allclose(trained_on, noisy_copies(x_adv, noise))


def test_smooth_adv_raises_the_soft_smoothed_loss_inside_the_ball(tiny_net, images):
    x, y = images
    module = _module(tiny_net, smooth_adv=True, m=4, sigma=0.25)
    torch.manual_seed(0)
    x_adv, noise = module.smooth_adv_examples(x, y)
    assert LpBall("l2", EPS).contains(x_adv, x, tol=1e-5).all()
    assert (x_adv - x).flatten(1).norm(dim=1).max() > EPS / 2  # it moved
    before, after = _soft_loss(tiny_net, x, y, noise), _soft_loss(tiny_net, x_adv, y, noise)
    assert after.mean() > before.mean() + 0.01
    assert (after > before).float().mean() >= 0.75


def test_noisy_pgd_draws_fresh_noise_per_pass_and_raises_the_noisy_loss(tiny_net, images):
    x, y = images
    recorder = Recorder(tiny_net)
    module = _module(recorder, noisy_pgd=True, m=2, sigma=0.1)
    torch.manual_seed(0)
    x_adv = module.noisy_pgd_examples(x, y)
    assert len(recorder.inputs) == THREAT["steps"] * 2  # EPGD: m gradients per step
    first, second = recorder.inputs[0], recorder.inputs[1]  # same x_t, different draws
    assert (first - second).abs().max() > 0.05
    assert LpBall("l2", EPS).contains(x_adv, x, tol=1e-5).all()
    noise = 0.1 * torch.randn(32, *x.shape, generator=torch.Generator().manual_seed(5))
    assert _soft_loss(tiny_net, x_adv, y, noise).mean() > _soft_loss(tiny_net, x, y, noise).mean() + 0.01


def test_adv_weight_mixes_the_noisy_clean_and_adversarial_terms(tiny_net, images, monkeypatch):
    x, y = images
    module = _module(tiny_net, smooth_adv=True, m=2, adv_weight=0.25)
    x_adv = (x + 0.05).clamp(0, 1)
    noise = 0.25 * torch.randn(2, *x.shape)
    monkeypatch.setattr(module, "smooth_adv_examples", lambda *_: (x_adv, noise))
    loss, _ = module.training_loss(x, y)
    clean, _ = module.noisy_loss(x, y, noise)
    adv, _ = module.noisy_loss(x_adv, y, noise)
    assert loss.item() == pytest.approx(0.75 * clean.item() + 0.25 * adv.item(), rel=1e-5)


def test_attack_leaves_batch_norm_statistics_alone_unless_asked(tiny_net, images):
    x, y = images
    tiny_net.train()
    module = _module(tiny_net, smooth_adv=True, m=2, attack_mode="train", attack_updates_bn=False)
    before = [b.clone() for n, b in tiny_net.named_buffers() if "running" in n]
    module.smooth_adv_examples(x, y)
    after = [b for n, b in tiny_net.named_buffers() if "running" in n]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert tiny_net.training


def test_defaults_and_recorded_settings(tiny_net):
    assert _module(tiny_net).m == 1 and _module(tiny_net).train_attack is None
    smooth = _module(tiny_net, smooth_adv=True)
    assert smooth.m == 4 and smooth.train_attack.eot == 1 and smooth.monitor == "val/noisy_acc"
    noisy = _module(tiny_net, noisy_pgd=True, m=3, sigma="1/4")
    assert noisy.train_attack.eot == 3 and noisy.sigma == 0.25
    hp = noisy.hparams
    assert hp["method"] == "GaussianTraining" and hp["sigma"] == 0.25 and hp["m"] == 3 and hp["noisy_pgd"]
    assert hp["attack_mode"] == "eval" and hp["attack_updates_bn"] is False


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"smooth_adv": True, "noisy_pgd": True}, ValueError, "at most one"),
        ({"sigma": 0}, ThreatConfigError, "sigma must be > 0"),
        ({"sigma": -0.25}, ThreatConfigError, "sigma must be > 0"),
        ({"m": 0}, ThreatConfigError, "m must be an integer >= 1"),
        ({"m": 2.5}, ThreatConfigError, "m must be an integer >= 1"),
        ({"smooth_adv": True, "adv_weight": 0}, ValueError, r"adv_weight must be in \(0, 1\]"),
        ({"noisy_pgd": True, "adv_weight": 1.5}, ValueError, r"adv_weight must be in \(0, 1\]"),
        ({"adv_weight": 0.5}, ValueError, "only with smooth_adv or noisy_pgd"),
        ({"attack_mode": "test"}, ValueError, "attack mode must be one of"),
    ],
)
def test_invalid_options_are_rejected(tiny_net, kwargs, error, match):
    with pytest.raises(error, match=match):
        _module(tiny_net, **kwargs)


@pytest.mark.parametrize(
    "variant",
    [[], ["method.smooth_adv=true", "method.m=2"], ["method.noisy_pgd=true"]],
    ids=["plain", "smooth_adv", "noisy_pgd"],
)
def test_fast_dev_run(make_cfg, variant):
    fast = ("threat.steps=2", "method.val_attack.steps=2", "method.test_attack.steps=2")
    cfg = make_cfg("method=gaussian", "threat=l2_0.5", *fast, "debug=fast_dev_run", *variant)
    metrics, objs = train(cfg)
    assert {"train/loss_step", "val/acc", "val/noisy_acc", "test/noisy_acc", "test/robust_acc"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert objs["trainer"].global_step == 1
