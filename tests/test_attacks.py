import hydra
import pytest
import torch
import torch.nn.functional as F

from safespot.attacks import PGD, NoisyViewAttack, attack_context, fgsm, fgsm_rs
from safespot.threat import LpBall, ThreatConfigError


def _loss(net, x, y):
    with torch.no_grad():
        return F.cross_entropy(net(x), y, reduction="none")


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_raises_loss_and_stays_in_ball(tiny_net, images, norm, eps):
    x, y = images
    x_adv = PGD(norm, eps, steps=10)(tiny_net, x, y)
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert LpBall(norm, eps).contains(x_adv, x, tol=1e-5).all()
    assert _loss(tiny_net, x_adv, y).mean() > _loss(tiny_net, x, y).mean() + 0.01


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_variants_stay_in_ball(tiny_net, images, norm):
    x, y = images
    for attack in (fgsm(norm, 0.1), fgsm_rs(norm, 0.1)):
        x_adv = attack(tiny_net, x, y)
        assert LpBall(norm, 0.1).contains(x_adv, x, tol=1e-5).all()
    assert _loss(tiny_net, fgsm(norm, 0.1)(tiny_net, x, y), y).mean() > _loss(tiny_net, x, y).mean()


def test_targeted_pgd_lowers_target_loss(tiny_net, images):
    x, y = images
    target = (y + 1) % 4
    x_adv = PGD("linf", 0.1, steps=10, targeted=True)(tiny_net, x, y, target=target)
    assert _loss(tiny_net, x_adv, target).mean() < _loss(tiny_net, x, target).mean()


def test_attack_restores_mode_and_never_touches_parameter_gradients(tiny_net, images):
    x, y = images
    tiny_net.train()
    tiny_net.body[0].weight.grad = torch.ones_like(tiny_net.body[0].weight)
    grads_before = {n: (p.grad.clone() if p.grad is not None else None) for n, p in tiny_net.named_parameters()}
    PGD("linf", 0.1, steps=3, mode="eval")(tiny_net, x, y)
    assert tiny_net.training and all(m.training for m in tiny_net.modules())
    for n, p in tiny_net.named_parameters():
        assert p.requires_grad
        before = grads_before[n]
        assert (p.grad is None) if before is None else torch.equal(p.grad, before)
    tiny_net.eval()
    PGD("linf", 0.1, steps=2, mode="train")(tiny_net, x, y)
    assert not any(m.training for m in tiny_net.modules())


def test_attack_can_protect_batchnorm_statistics(tiny_net, images):
    x, y = images
    bn = tiny_net.body[1]
    before = bn.running_mean.clone()
    with attack_context(tiny_net, update_bn=False):
        PGD("linf", 0.1, steps=3, mode="train")(tiny_net, x, y)
    assert torch.equal(bn.running_mean, before)
    PGD("linf", 0.1, steps=3, mode="train")(tiny_net, x, y)
    assert not torch.equal(bn.running_mean, before)


def test_zero_gradient_gives_no_nan(images):
    x, y = images

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(4))

        def forward(self, inp):
            return self.bias.expand(inp.shape[0], 4) + 0 * inp.flatten(1)[:, :4]

    for norm in ("linf", "l2"):
        x_adv = PGD(norm, 0.5, steps=3, random_start=False)(Constant(), x, y)
        assert torch.isfinite(x_adv).all() and torch.equal(x_adv, x)


def test_seeded_attack_is_deterministic(tiny_net, images):
    x, y = images
    attack = PGD("l2", 0.5, steps=3)
    a = attack(tiny_net, x, y, generator=torch.Generator().manual_seed(3))
    b = attack(tiny_net, x, y, generator=torch.Generator().manual_seed(3))
    c = attack(tiny_net, x, y, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_restarts_keep_a_per_image_success(tiny_net, images):
    x, y = images
    torch.manual_seed(0)
    single = [PGD("linf", 0.03, steps=1, step_size=0.03)(tiny_net, x, y) for _ in range(5)]
    broken_any = torch.stack([tiny_net(s).argmax(1) != y for s in single]).any(0)
    torch.manual_seed(0)
    multi = PGD("linf", 0.03, steps=1, step_size=0.03, restarts=5)(tiny_net, x, y)
    assert torch.equal(tiny_net(multi).argmax(1) != y, broken_any)


def test_attack_under_inference_mode_fails_clearly(tiny_net, images):
    x, y = images
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        PGD("linf", 0.1, steps=1)(tiny_net, x, y)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"steps": 0}, "steps"),
        ({"step_size": -1}, "step_size"),
        ({"restarts": 0}, "restarts"),
        ({"loss": "hinge"}, "loss"),
    ],
)
def test_invalid_attack_settings(kwargs, match):
    with pytest.raises((ThreatConfigError, ValueError), match=match):
        PGD("linf", 0.1, **kwargs)


def test_trades_kl_start_follows_the_per_image_seeds(tiny_net, images):
    """TRADES' KL attack draws its start from the images' own seeds when given: an image's
    adversarial example does not depend on the images it is batched with; it stays in the ball
    and raises the KL to the clean prediction."""
    from safespot.attacks import TradesKL, trades_kl

    x, y = images
    seeds = torch.arange(100, 100 + len(x))
    attack = TradesKL("linf", 8 / 255, steps=3, start_scale=0.01)
    whole = attack(tiny_net, x, y, seeds=seeds)
    halves = torch.cat([attack(tiny_net, x[i::2], y[i::2], seeds=seeds[i::2]) for i in (0, 1)])
    order = torch.cat([torch.arange(0, len(x), 2), torch.arange(1, len(x), 2)])
    torch.testing.assert_close(halves, whole[order], rtol=0, atol=1e-6)
    assert torch.equal(attack(tiny_net, x, y, seeds=seeds), whole)
    assert not torch.equal(attack(tiny_net, x, y, seeds=seeds + 1), whole)
    assert bool(LpBall("linf", 8 / 255).contains(whole, x).all())
    with torch.no_grad():
        assert trades_kl(tiny_net(x), tiny_net(whole), "sum") > trades_kl(tiny_net(x), tiny_net(x), "sum")


# --- the default step size: eps / 4 (paper 000, Section 4; paper 002, Appendix C) --------------
def _linear_net(w: torch.Tensor) -> torch.nn.Module:
    """Two-class logits ``[0, <w, x>]``: the input gradient of CE at label 0 has the sign of ``w``."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(w.numel(), 2, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.stack([torch.zeros_like(w), w]))
    return net


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_one_pgd_step_from_the_input_moves_exactly_eps_over_four(norm, eps):
    """The default step is eps/4, whatever the number of steps (not 2.5 eps / steps, not eps/5):
    one step from a non-random start on a linear model is that long, along the gradient's sign."""
    w = torch.tensor([1.0, -2.0, 0.5, -0.25, 3.0, -1.0])
    net, x, y = _linear_net(w), torch.full((1, 1, 2, 3), 0.5), torch.zeros(1, dtype=torch.long)
    for steps in (1, 3, 20):
        attack = PGD(norm, eps, steps=steps, random_start=False)
        assert attack.step_size == pytest.approx(eps / 4, rel=1e-12)
        taken = PGD(norm, eps, steps=1, random_start=False, step_size=attack.step_size)(net, x, y) - x
        direction = w.sign() if norm == "linf" else w / w.norm()
        assert torch.allclose(taken.flatten(), eps / 4 * direction, atol=1e-7)
    once = PGD(norm, eps, steps=1, random_start=False)(net, x, y) - x
    assert LpBall(norm, eps).size(once).item() == pytest.approx(eps / 4, rel=1e-6)


PGD_PRESETS = [
    "pgd10",
    "pgd100",
    "pgd100_cw",
    "pgd100_eot",
    "pgd20",
    "pgd20_restarts10",
    "pgd_cw",
    "pgd_dlr",
    "pgd_eot",
    "pgd_noisy",
    "epgd",
]
PRESET_CASES = [(o, t) for o in PGD_PRESETS for t in ("linf_8", "l2_0.5")]
PRESET_CASES += [("pgd_train", t) for t in ("linf_8", "linf_4", "l2_0.5", "l2_3.0")]  # threat.step_size


@pytest.mark.parametrize("option,threat", PRESET_CASES, ids=[f"{o}-{t}" for o, t in PRESET_CASES])
def test_every_pgd_preset_and_threat_steps_eps_over_four(make_cfg, option, threat):
    """Each PGD preset of conf/attack (and the training attack of each threat preset, Rice et al.
    2020 / paper 002 Appendix C: PGD-10 with step eps/4) steps eps/4."""
    cfg = make_cfg("ckpt_path=x", f"threat={threat}", f"+attack@preset={option}", name="evaluate")
    attack = hydra.utils.instantiate(cfg.preset)
    pgd = attack.attack if isinstance(attack, NoisyViewAttack) else attack
    assert isinstance(pgd, PGD), option
    assert pgd.step_size == pytest.approx(pgd.eps / 4, rel=1e-9), (option, threat, pgd.step_size, pgd.eps)
