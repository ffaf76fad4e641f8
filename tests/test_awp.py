"""Adversarial weight perturbation (Wu et al., 2020; method=awp): the layer-wise bound, the loss it
raises, the optimiser step taken at the perturbed weights with no perturbation left behind, and
training, resuming and bad settings end to end."""

import copy
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from conftest import TinyNet
from safespot.errors import ConfigError
from safespot.methods import AWPTraining
from safespot.train import train

THREAT = {"norm": "linf", "eps": 0.1, "step_size": 0.025, "steps": 3}
LR, MOMENTUM, DECAY = 0.1, 0.9, 5e-4


def _method(**kwargs) -> AWPTraining:
    torch.manual_seed(0)
    net = TinyNet().train()
    optimizer = partial(torch.optim.SGD, lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    return AWPTraining(net=net, optimizer=optimizer, threat=THREAT, **kwargs)


def _adversarial(module, images):
    x, y = images
    torch.manual_seed(1)
    return module.adversarial_examples(x, y), y


@pytest.mark.parametrize("steps,step_size", [(1, None), (3, 0.004)])
def test_the_perturbation_respects_the_relative_bound_of_each_layer(images, steps, step_size):
    module = _method(gamma=0.01, weight_steps=steps, weight_step_size=step_size)
    x_adv, y = _adversarial(module, images)
    buffers = {k: v.clone() for k, v in module.net.named_buffers()}
    weights = {k: v.detach().clone() for k, v in module.net.named_parameters()}
    v = module.weight_perturbation(x_adv, y)
    layers = dict(module.net.named_parameters())
    assert set(v) == {n for n, p in layers.items() if p.dim() > 1}  # conv and linear weights only
    for name, delta in v.items():
        bound = 0.01 * layers[name].norm().item()
        assert delta.norm().item() <= bound * (1 + 1e-5), name
        if steps == 1:  # one step of size gamma reaches the bound
            assert delta.norm().item() == pytest.approx(bound, rel=1e-4), name
    assert all(torch.equal(weights[k], p) for k, p in module.net.named_parameters())  # weights as before
    assert all(torch.equal(buffers[k], b) for k, b in module.net.named_buffers())  # batch-norm statistics too
    assert all(p.grad is None for p in module.net.parameters())


@pytest.mark.parametrize("steps", [1, 3])
def test_the_perturbation_raises_the_adversarial_loss(images, steps):
    module = _method(gamma=0.01, weight_steps=steps, weight_step_size=0.005)
    x_adv, y = _adversarial(module, images)
    net = module.net.eval()  # fixed statistics: the two losses differ by the weights only
    v = module.weight_perturbation(x_adv, y)
    with torch.no_grad():
        before = F.cross_entropy(net(x_adv), y).item()
        module.apply_perturbation(v)
        after = F.cross_entropy(net(x_adv), y).item()
        module.remove_perturbation()
    assert after > before + 1e-4


def test_the_step_is_taken_at_the_perturbed_weights_and_no_perturbation_is_left(images):
    """weights after = w - lr (g + decay (w + v)), g the gradient of CE(f_{w+v}(x'), y): SGD's first
    step (its momentum buffer is the gradient) computed at w + v, applied to w."""
    x, y = images
    module = _method(gamma=0.02)
    optimizer = module.configure_optimizers()
    seen = {}
    original = module.weight_perturbation

    def spy(x_adv, labels):
        seen["x_adv"], seen["v"] = x_adv, original(x_adv, labels)
        return seen["v"]

    module.weight_perturbation = spy
    w = {k: p.detach().clone() for k, p in module.net.named_parameters()}
    reference = copy.deepcopy(module.net)

    def closure():
        optimizer.zero_grad()
        loss, _ = module.training_loss(x, y)
        loss.backward()
        return loss

    module.optimizer_step(0, 0, optimizer, closure)
    v = seen["v"]
    assert v and not module._perturbation
    with torch.no_grad():  # the reference network at w + v
        for name, p in reference.named_parameters():
            p.add_(v.get(name, torch.zeros_like(p)))
    names, params = zip(*reference.named_parameters(), strict=True)
    loss = F.cross_entropy(reference(seen["x_adv"]), y)  # train mode: batch statistics, as the step's
    grads = dict(zip(names, torch.autograd.grad(loss, params), strict=True))
    for name, p in module.net.named_parameters():
        delta = v.get(name, torch.zeros_like(p))
        expected = w[name] - LR * (grads[name] + DECAY * (w[name] + delta))
        assert torch.allclose(p.detach(), expected, atol=1e-6), name
        assert torch.allclose(p.grad, grads[name], atol=1e-6), name


def test_warm_up_epochs_train_without_a_perturbation(images):
    x, y = images
    module = _method(warmup_epochs=1)  # epoch 0 of 1 warm-up epoch
    module.weight_perturbation = lambda *a: pytest.fail("AWP before its warm-up ended")
    module.training_loss(x, y)
    assert not module._perturbation and not module.awp_active()


def test_fast_dev_run_trains_and_records_the_settings(make_cfg):
    cfg = make_cfg("method=awp", "debug=fast_dev_run", "threat.steps=1", "method.val_attack.steps=1")
    metrics, objs = train(cfg)
    assert {"train/loss_step", "val/acc", "test/acc", "test/robust_acc"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    assert objs["trainer"].global_step == 1
    hparams = objs["method"].hparams
    assert hparams["gamma"] == 5e-3 and hparams["weight_steps"] == 1 and hparams["warmup_epochs"] == 0


def test_resume_from_last_checkpoint_matches_the_uninterrupted_run(make_cfg, tmp_path):
    common = ("method=awp", "threat.steps=1", "method.val_attack.steps=1", "trainer.deterministic=true",
              "data.train_subset=128", "data.val_subset=32", "trainer.max_epochs=2")  # fmt: skip
    _, full = train(make_cfg(*common, out=tmp_path / "full"))
    train(make_cfg(*common, "trainer.max_epochs=1", "test=false", out=tmp_path / "first"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    _, resumed = train(make_cfg(*common, f"ckpt_path={last}", out=tmp_path / "resumed"))
    a, b = full["method"].net.state_dict(), resumed["method"].net.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    assert resumed["method"].hparams["gamma"] == 5e-3


@pytest.mark.parametrize(
    "override,match",
    [
        ("method.gamma=0", "method.gamma must be > 0"),
        ("method.weight_steps=0", "method.weight_steps must be an integer >= 1"),
        ("+trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches must be 1"),
    ],
)
def test_bad_settings_fail_in_one_line_before_any_work(make_cfg, tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        train(make_cfg("method=awp", override, out=tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
