"""AutoAttack adapter: threat model, side effects, determinism, settings, and a cross-check."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from pyautoattack import AutoAttack as PackageAutoAttack
from pyautoattack.autopgd_base import APGDAttack

from safespot.attacks import PGD
from safespot.attacks.autoattack import AutoAttack
from safespot.data.synthetic import make_synthetic
from safespot.threat import LpBall, ThreatConfigError

FAST = {"attacks": ["apgd-ce"], "n_iter": 10}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These attacks run many tiny ops; one thread is much faster than two on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A small MLP trained naturally on 4-class synthetic 8x8 images, and 64 test images."""
    x_train, y_train = make_synthetic(512, 4, 8, 3, 0.25, 0.15, seed=0, split_seed=1).tensors
    x_test, y_test = make_synthetic(64, 4, 8, 3, 0.25, 0.15, seed=0, split_seed=2).tensors
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(net(x_train), y_train).backward()
        opt.step()
    net.eval().zero_grad(set_to_none=True)
    return net, x_test, y_test


def _accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_output_is_detached_and_in_ball_and_box(tiny_net, images, norm, eps):
    x, y = images
    x_adv = AutoAttack(norm, eps, **FAST)(tiny_net, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert LpBall(norm, eps).contains(x_adv, x, tol=1e-6).all()
    assert (x_adv >= 0).all() and (x_adv <= 1).all()


def test_fraction_eps_and_standard_defaults():
    attack = AutoAttack("linf", "8/255")
    assert attack.eps == pytest.approx(8 / 255)
    assert attack.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert (attack.n_iter, attack.square_queries, attack.seed, attack.verbose) == (100, 5000, 0, False)
    assert AutoAttack("l2", 0.5, version="rand").attacks_to_run == ["apgd-ce", "apgd-dlr"]


def test_lowers_accuracy_of_a_trained_model(trained):
    net, x, y = trained
    clean = _accuracy(net, x, y)
    robust = _accuracy(net, AutoAttack("linf", 24 / 255, **FAST)(net, x, y), y)
    assert clean >= 0.9
    assert robust <= clean - 0.5


def test_seeded_runs_are_identical_and_leave_the_callers_rng_alone(trained):
    net, x, y = trained
    attack = AutoAttack("l2", 1.0, seed=3, n_iter=5, square_queries=20)
    state = torch.get_rng_state()
    first = attack(net, x[:16], y[:16])
    assert torch.equal(torch.get_rng_state(), state)
    second = attack(net, x[:16], y[:16])
    assert torch.equal(first, second)
    assert not torch.equal(first, x[:16])  # some images were broken
    other = AutoAttack("l2", 1.0, seed=4, n_iter=5, square_queries=20)(net, x[:16], y[:16])
    assert not torch.equal(first, other)  # the seed reaches the random starts (l2: sign steps would erase them)


def test_restores_modes_and_never_touches_parameter_gradients(tiny_net, images):
    x, y = images
    tiny_net.train()
    tiny_net.body[0].weight.grad = torch.ones_like(tiny_net.body[0].weight)
    grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in tiny_net.named_parameters()}
    bn = tiny_net.body[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    AutoAttack("linf", 0.1, n_iter=3, square_queries=10)(tiny_net, x, y)
    assert all(m.training for m in tiny_net.modules())
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])  # ran in eval mode
    for n, p in tiny_net.named_parameters():
        assert p.requires_grad
        assert (p.grad is None) if grads[n] is None else torch.equal(p.grad, grads[n])
    tiny_net.eval()
    AutoAttack("linf", 0.1, **FAST)(tiny_net, x, y)
    assert not any(m.training for m in tiny_net.modules())


def test_refuses_inference_mode(tiny_net, images):
    x, y = images
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        AutoAttack("linf", 0.1, **FAST)(tiny_net, x, y)


def test_full_standard_version_on_four_classes(trained, caplog):
    net, x, y = trained
    caplog.set_level(logging.DEBUG)
    subset = AutoAttack("linf", 16 / 255, **FAST)
    full = AutoAttack("linf", 16 / 255, n_iter=10, square_queries=50)
    adversary = full.adversary(net, num_classes=4)
    assert adversary.apgd_targeted.n_target_classes == 3 and adversary.fab.n_target_classes == 3
    x_full = full(net, x[:16], y[:16])
    assert LpBall("linf", 16 / 255).contains(x_full, x[:16], tol=1e-6).all()
    assert not [r for r in caplog.records if r.name == "auto-attack"]  # quiet, and no "too many targets" warning
    # APGD-CE runs first with the same seed, and the later members can only break more images.
    assert _accuracy(net, x_full, y[:16]) <= _accuracy(net, subset(net, x[:16], y[:16]), y[:16])


@pytest.mark.parametrize("num_classes,targets", [(4, 3), (10, 9), (100, 9)])
def test_target_classes_follow_the_number_of_classes(tiny_net, num_classes, targets):
    adversary = AutoAttack("linf", 0.1).adversary(tiny_net, num_classes)
    assert adversary.apgd_targeted.n_target_classes == targets
    assert adversary.fab.n_target_classes == targets


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_settings_match_the_packages_own_versions(tiny_net, norm):
    package_norm = {"linf": "Linf", "l2": "L2"}[norm]
    for version in ("standard", "rand"):
        theirs = PackageAutoAttack(tiny_net, eps=0.1, norm=package_norm, version=version, seed=0)
        ours = AutoAttack(norm, 0.1, version=version).adversary(tiny_net, num_classes=10)
        assert ours.attacks_to_run == theirs.attacks_to_run
        for attr in ("n_iter", "n_iter_2", "n_iter_min", "size_decr", "n_restarts", "eot_iter", "eps", "norm"):
            assert getattr(ours.apgd, attr) == getattr(theirs.apgd, attr), attr
        for attr in ("n_iter", "n_iter_2", "n_restarts", "n_target_classes"):
            assert getattr(ours.apgd_targeted, attr) == getattr(theirs.apgd_targeted, attr), attr
        assert ours.fab.n_iter == theirs.fab.n_iter == 100
        assert ours.fab.n_target_classes == theirs.fab.n_target_classes
        assert ours.square.n_queries == theirs.square.n_queries == 5000
    # rand: the package leaves APGD-T (not a member of rand) at one sample; a custom subset gets EOT there too.
    assert ours.apgd.eot_iter == ours.apgd_targeted.eot_iter == 20 and ours.apgd.n_iter == 100


def test_reduced_iterations_rescale_the_step_size_schedule(tiny_net):
    adversary = AutoAttack("linf", 0.1, n_iter=10, square_queries=7).adversary(tiny_net, 4)
    reference = APGDAttack(tiny_net, n_iter=10, eps=0.1)
    for apgd in (adversary.apgd, adversary.apgd_targeted):
        assert (apgd.n_iter, apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr) == (
            10,
            reference.n_iter_2,
            reference.n_iter_min,
            reference.size_decr,
        )
    assert adversary.fab.n_iter == 10 and adversary.square.n_queries == 7


def test_cross_check_against_independent_pgd(trained):
    """Robust accuracy under the adapter's APGD-CE and APGD-DLR agrees with this framework's
    own, independently written PGD with the CE and DLR losses (with restarts), and AutoAttack
    is never much weaker than PGD."""
    net, x, y = trained
    eps, steps = 16 / 255, 20
    apgd_ce = _accuracy(net, AutoAttack("linf", eps, attacks=["apgd-ce"], n_iter=steps)(net, x, y), y)
    apgd_dlr = _accuracy(net, AutoAttack("linf", eps, attacks=["apgd-dlr"], n_iter=steps)(net, x, y), y)
    seeds = torch.arange(len(x))
    pgd_ce = _accuracy(net, PGD("linf", eps, steps=steps, restarts=3)(net, x, y, seeds=seeds), y)
    pgd_dlr = _accuracy(net, PGD("linf", eps, steps=steps, restarts=3, loss="dlr")(net, x, y, seeds=seeds), y)
    assert 0.1 < pgd_ce < 0.95  # the budget is neither trivial nor overwhelming, so the comparison means something
    assert abs(apgd_ce - pgd_ce) <= 0.1 and abs(apgd_dlr - pgd_dlr) <= 0.1
    assert apgd_ce <= pgd_ce + 0.05 and apgd_dlr <= pgd_dlr + 0.05


def test_rand_version_on_a_randomised_model(tiny_net, images, caplog):
    x, y = images

    class Noisy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_net

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            return self.net(inp + 0.05 * torch.randn_like(inp))

    model = Noisy()
    attack = AutoAttack("l2", 0.5, version="rand", n_iter=4, eot_iter=2)
    caplog.set_level(logging.DEBUG)
    first = attack(model, x, y)
    assert not [r for r in caplog.records if r.name == "auto-attack"]  # no "please use version='rand'" flag
    assert torch.equal(first, attack(model, x, y))
    assert LpBall("l2", 0.5).contains(first, x, tol=1e-6).all()
    AutoAttack("l2", 0.5, **FAST)(model, x, y)  # the standard path flags the randomness even when quiet
    assert any("randomized defense" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_quiet_unless_verbose(tiny_net, images, caplog, capsys):
    x, y = images
    logger = logging.getLogger("auto-attack")
    level = logger.level
    caplog.set_level(logging.DEBUG)
    AutoAttack("linf", 0.1, **FAST)(tiny_net, x, y)
    assert not [r for r in caplog.records if r.name == "auto-attack"]
    assert capsys.readouterr() == ("", "")
    AutoAttack("linf", 0.1, verbose=True, **FAST)(tiny_net, x, y)
    messages = [r.getMessage() for r in caplog.records if r.name == "auto-attack"]
    assert any("robust accuracy" in m for m in messages)
    assert logger.level == level


def test_keeps_the_callers_trace_function(tiny_net, images):
    """The package's dynamic-defence check calls sys.settrace(None); a debugger or coverage must survive."""
    x, y = images
    previous = sys.gettrace()

    def tracer(frame, event, arg):
        return None

    sys.settrace(tracer)
    try:
        AutoAttack("linf", 0.1, attacks=["apgd-ce"], n_iter=2)(tiny_net, x, y)
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(previous)


def test_empty_batch(tiny_net):
    x = torch.rand(0, 3, 8, 8)
    assert AutoAttack("linf", 0.1)(tiny_net, x, torch.zeros(0, dtype=torch.long)).shape == x.shape


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"version": "plus"}, "version"),
        ({"version": "custom"}, "version"),
        ({"norm": "l1"}, "norm"),
        ({"eps": 0}, "eps"),
        ({"eps": "-8/255"}, "eps"),
        ({"eps": "eight"}, "eps"),
        ({"attacks": ["pgd"]}, "attacks"),
        ({"attacks": []}, "attacks"),
        ({"attacks": ["apgd-ce", "apgd-ce"]}, "attacks"),
        ({"n_iter": 0}, "n_iter"),
        ({"square_queries": 1.5}, "square_queries"),
        ({"eot_iter": True}, "eot_iter"),
        ({"seed": None}, "seed"),
    ],
)
def test_bad_settings_raise_naming_the_setting(kwargs, name):
    settings = {"norm": "linf", "eps": 0.1, **kwargs}
    with pytest.raises(ThreatConfigError, match=name):
        AutoAttack(**settings)


def test_too_few_classes_for_dlr_members(images):
    x, y = images
    torch.manual_seed(0)
    three = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 3)).eval()
    with pytest.raises(ValueError, match="attacks: apgd-t needs at least 4 classes"):
        AutoAttack("linf", 0.1, n_iter=2)(three, x, y % 3)
    x_adv = AutoAttack("linf", 0.1, attacks=["apgd-ce", "fab-t", "square"], n_iter=2, square_queries=5)(three, x, y % 3)
    assert LpBall("linf", 0.1).contains(x_adv, x, tol=1e-6).all()
