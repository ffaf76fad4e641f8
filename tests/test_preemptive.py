"""Preemptively robust training (paper 002, Algorithm 2) and TRADES."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from safespot.methods import PreemptiveFastTraining, PreemptiveTraining, TradesTraining
from safespot.methods.preemptive import safe_spot_settings
from safespot.methods.trades import trades_kl
from safespot.threat import LpBall, ThreatConfigError

EPS = {"linf": 0.1, "l2": 0.5}


def _module(net, norm, cls=PreemptiveTraining, **kwargs):
    threat = {"norm": norm, "eps": EPS[norm], "step_size": EPS[norm] / 4, "steps": 5}
    return cls(net=net, optimizer=partial(torch.optim.SGD, lr=0.1), threat=threat, **kwargs)


def _loss(net, x, y):
    with torch.no_grad():
        return F.cross_entropy(net(x), y, reduction="none")


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize(
    "safe_spot",
    [{}, {"steps": 1, "random_start": False}, {"steps": 10, "step_fraction": 0.25}],
    ids=["paper002", "sfgsm", "spgd"],
)
def test_safe_spot_step_lowers_the_loss_inside_delta(tiny_net, images, norm, safe_spot):
    x, y = images
    module = _module(tiny_net, norm, safe_spot={"mode": "eval", **safe_spot})
    x_r = module.safe_spots(x, y)
    assert LpBall(norm, EPS[norm]).contains(x_r, x, tol=1e-5).all()
    before, after = _loss(tiny_net, x, y), _loss(tiny_net, x_r, y)
    assert after.mean() < before.mean() - 0.01
    assert (after < before).float().mean() >= 0.75  # descent, not the ascent of the reference script


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attack_step_raises_the_loss_inside_eps_of_the_safe_spot(tiny_net, images, norm):
    x, y = images
    module = _module(tiny_net, norm, attack_mode="eval", safe_spot={"mode": "eval"})
    x_r = module.safe_spots(x, y)
    x_a = module.adversarial_examples(x_r, y)
    assert LpBall(norm, EPS[norm]).contains(x_a, x_r, tol=1e-5).all()
    assert _loss(tiny_net, x_a, y).mean() > _loss(tiny_net, x_r, y).mean() + 0.01


def _bn_stats(net):
    return [b.clone() for n, b in net.named_buffers() if "running" in n]


def test_clean_batches_leave_batch_norm_statistics_alone(tiny_net, images):
    x, y = images
    module = _module(tiny_net, "linf")
    tiny_net.train()
    before = _bn_stats(tiny_net)
    module.safe_spots(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, _bn_stats(tiny_net), strict=True))
    module.training_loss(x, y)  # the attacked batch does update them (adversarial training)
    assert not all(torch.equal(a, b) for a, b in zip(before, _bn_stats(tiny_net), strict=True))
    explicit = _module(tiny_net, "linf", safe_spot={"updates_bn": True})
    before = _bn_stats(tiny_net)
    explicit.safe_spots(x, y)
    assert not all(torch.equal(a, b) for a, b in zip(before, _bn_stats(tiny_net), strict=True))


def test_training_loss_is_the_loss_of_an_attacked_safe_spot(tiny_net, images):
    x, y = images
    module = _module(tiny_net, "linf", attack_mode="eval", safe_spot={"mode": "eval"})
    torch.manual_seed(3)
    loss, logits = module.training_loss(x, y)
    torch.manual_seed(3)
    x_a = module.adversarial_examples(module.safe_spots(x, y), y)
    assert torch.allclose(logits, tiny_net(x_a), atol=1e-6)
    assert loss.item() == pytest.approx(F.cross_entropy(tiny_net(x_a), y).item(), rel=1e-5)
    assert loss.requires_grad


def test_fast_variant_uses_fgsm_rs_after_the_safe_spot(tiny_net, images):
    module = _module(tiny_net, "linf", cls=PreemptiveFastTraining, safe_spot={"random_start": False})
    assert module.train_attack.steps == 1 and module.train_attack.step_size == pytest.approx(1.25 * 0.1)
    assert module.safe_spot_step.steps == 1 and not module.safe_spot_step.random_start
    assert module.hparams["step_factor"] == 1.25 and module.hparams["safe_spot"]["delta"] == 0.1


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"delta": -0.1}, "safe_spot.delta must be > 0"),
        ({"step_size": 0}, "safe_spot.step_size must be > 0"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"mode": "sideways"}, "attack mode must be one of"),
        ({"radius": 1}, "unknown safe_spot settings"),
    ],
)
def test_bad_safe_spot_settings_are_refused(tiny_net, settings, match):
    with pytest.raises((ValueError, ThreatConfigError), match=match):
        _module(tiny_net, "linf", safe_spot=settings)


def test_safe_spot_defaults_follow_paper_002():
    s = safe_spot_settings(None, 8 / 255)
    assert s["delta"] == s["step_size"] == pytest.approx(8 / 255) and s["steps"] == 1 and s["random_start"]
    assert safe_spot_settings({"steps": 10, "step_fraction": 0.25}, 0.5)["step_size"] == pytest.approx(0.125)


def test_trades_kl_is_non_negative_and_zero_when_outputs_agree():
    g = torch.Generator().manual_seed(0)
    clean, adv = torch.randn(32, 10, generator=g), torch.randn(32, 10, generator=g)
    assert trades_kl(clean, clean).abs().item() < 1e-6
    assert trades_kl(clean, clean + 5.0).abs().item() < 1e-5  # same softmax
    assert trades_kl(clean, adv).item() > 0
    per_row = F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="none").sum(1)
    assert (per_row >= -1e-6).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_trades_attack_raises_the_kl_inside_the_ball(tiny_net, images, norm):
    x, y = images
    module = _module(tiny_net, norm, cls=TradesTraining)
    x_adv = module.adversarial_examples(x, y)
    assert LpBall(norm, EPS[norm]).contains(x_adv, x, tol=1e-5).all()
    x_rand = LpBall(norm, EPS[norm]).random_init(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert trades_kl(tiny_net(x), tiny_net(x_adv)) > 2 * trades_kl(tiny_net(x), tiny_net(x_rand))
    loss, _ = module.training_loss(x, y)
    assert loss.item() >= F.cross_entropy(tiny_net(x), y).item() - 1e-5  # CE + beta * KL, KL >= 0


def test_trades_beta_zero_is_natural_training(tiny_net, images):
    x, y = images
    module = _module(tiny_net, "linf", cls=TradesTraining, beta=0.0)
    loss, _ = module.training_loss(x, y)
    assert loss.item() == pytest.approx(F.cross_entropy(tiny_net(x), y).item(), rel=1e-5)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        _module(tiny_net, "linf", cls=TradesTraining, beta=-1)


def test_validation_runs_every_safe_spot_and_attack_step_in_eval_mode(tiny_net, images):
    """The x_r behind val/safe_robust_acc (the checkpoint monitor of the preemptive preset) is
    computed in eval mode, whatever mode training uses for its safe-spot step: otherwise it
    depends on the batch through batch-norm statistics."""
    x, y = images
    module = _module(tiny_net, "linf", val_attack={"steps": 2}, safe_spot={"mode": "train"})
    modes = []
    hook = tiny_net.body[1].register_forward_pre_hook(lambda m, _: modes.append(m.training))
    try:
        module._evaluate((x, y, torch.arange(len(x))), "val", module.val_attack)
    finally:
        hook.remove()
    assert len(modes) > 4 and not any(modes)
    # so x_r of an image does not depend on the images it is validated with
    torch.manual_seed(0)
    alone = module.eval_safe_spot_step(tiny_net, x[:1], y[:1], target=y[:1])
    torch.manual_seed(0)
    together = module.eval_safe_spot_step(tiny_net, x, y, target=y)[:1]
    assert torch.allclose(alone, together, atol=1e-6)
