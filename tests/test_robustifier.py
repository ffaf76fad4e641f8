"""The safe-spot search (paper 002, Algorithm 1) and its baselines."""

import pytest
import torch

from conftest import SYNTHETIC, compose_config
from safespot.attacks import PGD
from safespot.data import SyntheticDataModule
from safespot.defenses import NoRobustification, SafeSpotFGSM, SafeSpotPGD, SafeSpotSearch
from safespot.threat import LpBall, ThreatConfigError
from safespot.train import train


@pytest.mark.parametrize("norm,delta,beta", [("linf", 0.05, 0.05), ("l2", 0.5, 0.05)])
@pytest.mark.parametrize("init", ["original", "random"])
def test_search_stays_in_delta_ball_and_box(tiny_net, images, norm, delta, beta, init):
    x, y = images
    x = x.clone()
    x[0] = 0.0  # an image on the box corner
    seeds = torch.arange(len(x))
    result = SafeSpotSearch(norm, delta, max_iter=4, inner_steps=3, beta=beta, init=init)(tiny_net, x, seeds=seeds)
    assert LpBall(norm, delta).contains(result.x_r, x, tol=1e-6).all()
    assert (result.distance <= delta + 1e-6).all()
    if norm == "linf":  # the tanh box: exactly inside [clamp(x - delta), clamp(x + delta)]
        assert (result.x_r >= (x - delta).clamp(0, 1)).all() and (result.x_r <= (x + delta).clamp(0, 1)).all()
    assert not result.x_r.requires_grad and all(p.grad is None for p in tiny_net.parameters())


def test_worst_case_loss_decreases_over_iterations(tiny_net, images):
    x, _ = images
    search = SafeSpotSearch("linf", 0.2, eps=0.05, max_iter=15, inner_steps=5, beta=0.1)
    result = search(tiny_net, x, seeds=torch.arange(16))
    history = torch.stack(result.loss_history)
    assert len(history) == 16
    assert history[-1] < history[8] < history[0] - 0.03
    assert result.worst_loss.mean() <= history[-1] + 1e-6  # the kept iterate is the best one seen


def test_second_order_option_runs_for_l2_only(tiny_net, images):
    x, _ = images
    result = SafeSpotSearch("l2", 0.5, max_iter=2, inner_steps=2, beta=0.05, second_order=True)(tiny_net, x[:4])
    assert LpBall("l2", 0.5).contains(result.x_r, x[:4], tol=1e-6).all()
    with pytest.raises(ThreatConfigError, match="second_order"):
        SafeSpotSearch("linf", 0.05, second_order=True)


def test_early_exit_stops_robust_images_and_reports_it(tiny_net, images):
    x, _ = images
    full = SafeSpotSearch("linf", 0.05, max_iter=8, inner_steps=2, beta=0.05)(tiny_net, x, seeds=torch.arange(16))
    fast = SafeSpotSearch("linf", 0.05, max_iter=8, inner_steps=2, beta=0.05, early_exit=2)(
        tiny_net, x, seeds=torch.arange(16)
    )
    assert (full.iterations == 8).all()
    assert fast.early_exit.any() and (fast.iterations[fast.early_exit] < 8).all()
    assert not fast.attack_succeeded[fast.early_exit].any()


@pytest.mark.parametrize("cls", [SafeSpotFGSM, SafeSpotPGD])
def test_baselines_lower_the_protected_loss_within_delta(tiny_net, images, cls):
    x, _ = images
    none = NoRobustification("linf", 0.05)(tiny_net, x, seeds=torch.arange(16))
    result = cls("linf", 0.05)(tiny_net, x, seeds=torch.arange(16))
    assert LpBall("linf", 0.05).contains(result.x_r, x, tol=1e-6).all()
    assert torch.equal(result.protected, none.protected)
    assert result.worst_loss.mean() < none.worst_loss.mean()


def test_invalid_settings_are_refused():
    with pytest.raises(ThreatConfigError, match="max_iter"):
        SafeSpotSearch("linf", 0.05, max_iter=0)
    with pytest.raises(ThreatConfigError, match="active_batch"):
        SafeSpotSearch("linf", 0.05, active_batch=0)
    with pytest.raises(ThreatConfigError, match="norm"):
        SafeSpotSearch("l1", 0.05)
    with pytest.raises(ThreatConfigError, match="eps"):
        SafeSpotSearch("linf", -0.05)


def test_robustified_images_resist_grey_box_pgd_better_on_an_adversarially_trained_model(tmp_path):
    cfg = compose_config(
        "train",
        [
            *SYNTHETIC,
            "method=adversarial",
            "trainer.max_epochs=4",
            "threat.eps=0.1",
            "threat.step_size=0.025",
            "threat.steps=5",
            "optimizer.lr=0.05",
            "data.n_train=1024",
            "test=false",
            "callbacks=none",
        ],
        tmp_path,
    )
    _, objs = train(cfg)
    net = objs["method"].net.eval()
    dm = SyntheticDataModule(n_train=1024, n_test=128, val_size=64)
    dm.setup()
    x, y, index = next(iter(dm.test_dataloader()))
    seeds = index * 31
    attack = PGD("linf", 0.1, steps=20)
    with torch.no_grad():
        clean_ok = net(x).argmax(1) == y
    before = net(attack(net, x, y, seeds=seeds)).argmax(1) == y
    result = SafeSpotSearch("linf", 0.1, max_iter=10, inner_steps=5, beta=0.05)(net, x, seeds=seeds)
    after = net(attack(net, result.x_r, y, seeds=seeds + 1)).argmax(1) == y
    assert clean_ok.float().mean() > 0.5
    assert after.float().mean() > before.float().mean() + 0.1


@pytest.mark.parametrize("norm,delta", [("linf", 8 / 255), ("l2", 0.3)])
def test_8bit_projection_stays_in_ball_on_the_grid(norm, delta):
    from safespot.defenses.quantize import project_to_8bit, round_trip_8bit

    g = torch.Generator().manual_seed(0)
    x_o = round_trip_8bit(torch.rand(8, 3, 6, 6, generator=g))
    ball = LpBall(norm, delta)
    x_r = ball.project(x_o + 0.2 * torch.randn(8, 3, 6, 6, generator=g), x_o)
    q = project_to_8bit(x_r, x_o, ball)
    assert torch.equal(q, round_trip_8bit(q))
    assert ball.contains(q, x_o, tol=1e-6).all()
    assert (q - x_r).abs().max() <= 1 / 255 + 1e-6 if norm == "linf" else ball.distance(q, x_r).max() < delta


def test_quantized_search_returns_8bit_images(tiny_net, images):
    from safespot.defenses.quantize import round_trip_8bit

    x, _ = images
    x = round_trip_8bit(x)
    result = SafeSpotSearch("linf", 8 / 255, max_iter=3, inner_steps=2, quantize=True)(
        tiny_net, x, seeds=torch.arange(16)
    )
    assert torch.equal(result.x_r, round_trip_8bit(result.x_r))
    assert LpBall("linf", 8 / 255).contains(result.x_r, x, tol=1e-6).all()


def test_reconstruction_starts_at_x_r_ascends_and_stays_in_its_delta_ball(tiny_net, images):
    from safespot.defenses import reconstruction

    x, _ = images
    search = SafeSpotSearch("linf", 0.2, eps=0.05, max_iter=8, inner_steps=3, beta=0.1)
    x_r = search(tiny_net, x, seeds=torch.arange(16)).x_r
    recon = reconstruction(search)
    assert recon.ascend and recon.init == "original" and recon.early_exit is None
    result = recon(tiny_net, x_r, seeds=torch.arange(16))
    assert LpBall("linf", 0.2).contains(result.x_r, x_r, tol=1e-6).all()
    history = torch.stack(result.loss_history)
    assert history[-1] > history[0]  # the reversed dynamics raise the worst-case loss
    first = SafeSpotSearch("linf", 0.2, eps=0.05, max_iter=1, inner_steps=3, beta=1e-9, ascend=True)
    assert torch.allclose(first(tiny_net, x_r, seeds=torch.arange(16)).x_r, x_r, atol=1e-6)  # starts at x_r


@pytest.mark.parametrize("norm, delta, eps", [("linf", 0.1, 0.24), ("l2", 1.0, 1.5)])
def test_active_set_compaction_gives_the_same_images_and_spends_nothing_on_finished_ones(
    tiny_net, images, norm, delta, eps
):
    x, _ = images
    seeds = torch.arange(16) * 7
    settings = dict(norm=norm, delta=delta, eps=eps, max_iter=6, inner_steps=3, beta=0.05, early_exit=1)
    whole = SafeSpotSearch(**settings)(tiny_net, x, seeds=seeds)
    rows_seen = []
    hook = tiny_net.register_forward_pre_hook(lambda module, args: rows_seen.append(len(args[0])))
    try:
        pooled = SafeSpotSearch(**settings, active_batch=5)(tiny_net, x, seeds=seeds)
    finally:
        hook.remove()
    assert torch.allclose(pooled.x_r, whole.x_r, atol=1e-6)
    assert torch.equal(pooled.iterations, whole.iterations) and torch.equal(pooled.early_exit, whole.early_exit)
    assert torch.allclose(pooled.worst_loss, whole.worst_loss, atol=1e-5)
    assert pooled.early_exit.any() and not pooled.early_exit.all()  # a mixed case: rows leave and join
    assert max(rows_seen) <= 5
    # one forward per image for c(x_o), then T + 1 per image and outer iteration it was searched in
    assert sum(rows_seen) == 16 + int((pooled.iterations + 1).sum()) * (3 + 1)
