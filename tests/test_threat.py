import math

import pytest
import torch

from safespot.threat import LpBall, ThreatConfigError, check_budget, parse_budget


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_project_lands_in_ball_and_box(norm, eps):
    g = torch.Generator().manual_seed(0)
    center = torch.rand(32, 3, 8, 8, generator=g)
    far = center + 3 * torch.randn(32, 3, 8, 8, generator=g)
    ball = LpBall(norm, eps)
    projected = ball.project(far, center)
    assert ball.contains(projected, center, tol=1e-6).all()
    assert projected.min() >= 0 and projected.max() <= 1
    inside = ball.random_init(center, g)
    assert torch.allclose(ball.project(inside, center), inside)  # idempotent inside


def test_linf_projection_is_exact_clamp():
    ball = LpBall("linf", 0.1)
    center = torch.full((1, 1, 2, 2), 0.95)
    x = torch.tensor([[[[2.0, 0.0], [0.9, 0.97]]]])
    expected = torch.tensor([[[[1.0, 0.85], [0.9, 0.97]]]])
    assert torch.allclose(ball.project(x, center), expected)


def _start(ball, center, source):
    """A random start from a global-style generator or from per-image seeds."""
    if source == "generator":
        return ball.random_init(center, torch.Generator().manual_seed(0))
    return ball.random_init(center, seeds=torch.arange(len(center)) * 7919 + 11)


@pytest.mark.parametrize("source", ["generator", "seeds"])
def test_l2_random_init_is_uniform_in_volume_not_on_sphere(source):
    d = 3 * 4 * 4
    ball = LpBall("l2", 0.5)
    center = torch.full((4000, 3, 4, 4), 0.5)  # far from the box edges: no clamping
    radii = ball.distance(_start(ball, center, source), center)
    assert radii.max() <= 0.5 + 1e-6
    # for the uniform distribution in a d-ball, (r / eps)^d is uniform on [0, 1]
    u = (radii / 0.5).pow(d)
    assert abs(u.mean().item() - 0.5) < 0.03
    assert abs((u < 0.25).float().mean().item() - 0.25) < 0.03
    assert (radii < 0.5 * 0.999).float().mean() > 0.9  # most points strictly inside


@pytest.mark.parametrize("source", ["generator", "seeds"])
def test_linf_random_init_is_uniform_in_cube(source):
    ball = LpBall("linf", 0.2)
    center = torch.full((2000, 3, 4, 4), 0.5)
    delta = _start(ball, center, source) - center
    assert delta.abs().max() <= 0.2 + 1e-6
    assert abs(delta.mean().item()) < 0.005
    assert abs(delta.var().item() - 0.4**2 / 12) < 0.001


def test_steepest_direction_unit_norm_and_zero_safe():
    g = torch.randn(4, 3, 5, 5)
    g[0] = 0
    for norm in ("linf", "l2"):
        d = LpBall(norm, 1.0).steepest_direction(g)
        assert torch.isfinite(d).all()
        assert d[0].abs().sum() == 0
        n = d[1:].flatten(1).abs().amax(1) if norm == "linf" else d[1:].flatten(1).norm(dim=1)
        assert torch.allclose(n, torch.ones(3))


def test_step_ascends_a_linear_function():
    w = torch.randn(1, 3, 4, 4)
    x = torch.full((1, 3, 4, 4), 0.5)
    for norm in ("linf", "l2"):
        ball = LpBall(norm, 0.1)
        x2 = ball.step(x, w, 0.05, x)
        assert (w * x2).sum() > (w * x).sum()


def test_budget_parsing_and_validation():
    assert parse_budget("8/255") == pytest.approx(8 / 255)
    assert parse_budget(0.5) == 0.5
    for bad in (-0.1, 0, "abc", "1/0", math.nan, True):
        with pytest.raises(ThreatConfigError, match="eps"):
            LpBall("linf", bad)
    with pytest.raises(ThreatConfigError, match="norm must be one of"):
        LpBall("l1", 0.1)


def test_budgets_above_the_largest_distance_of_two_images_are_refused():
    """An l_inf budget above 1 (``eps=8`` meant as 8/255) allows any image; so does an l_2 budget
    above the distance of a black and a white image, ``sqrt(C H W)``, where the size is known."""
    for eps in ("8/255", 1, "255/255"):
        assert LpBall("linf", eps).eps == pytest.approx(parse_budget(eps))
    for eps in (8, "1.5", "300/255"):
        with pytest.raises(ThreatConfigError, match=rf"eps={eps} is above 1 for norm linf.*eps=8/255"):
            LpBall("linf", eps)
    with pytest.raises(ThreatConfigError, match=r"delta=2 is above 1 for norm linf"):
        check_budget(2, "linf", "delta")
    diagonal = math.sqrt(3 * 16 * 16)
    assert check_budget(diagonal, "l2", "eps", (3, 16, 16)) == pytest.approx(diagonal)
    with pytest.raises(ThreatConfigError, match=r"eps=30 is above 27\.71 for norm l2 .*3x16x16.*eps=0\.5"):
        check_budget(30, "l2", "eps", (3, 16, 16))
    assert LpBall("l2", 30).eps == 30  # no image size, no bound: a 3x224x224 image's diagonal is 388


def test_every_budget_setting_takes_the_bound():
    """The attacks, the robustifiers and the safe-spot step check their budgets alike."""
    from safespot.attacks import PGD
    from safespot.attacks.safe_spot import SafeSpotStep
    from safespot.defenses import SafeSpotSearch

    with pytest.raises(ThreatConfigError, match="eps=8 is above 1"):
        PGD("linf", 8)
    with pytest.raises(ThreatConfigError, match="delta=8 is above 1"):
        SafeSpotSearch(norm="linf", delta=8, eps="8/255")
    with pytest.raises(ThreatConfigError, match=r"safe_spot\.delta=4 is above 1"):
        SafeSpotStep(norm="linf", eps="8/255", delta=4)


def test_train_config_refuses_budgets_in_levels(make_cfg):
    from safespot.checks import check_train_config
    from safespot.errors import ConfigError

    with pytest.raises(ConfigError, match=r"threat\.eps=8 is above 1 for norm linf.*threat\.eps=8/255"):
        check_train_config(make_cfg("threat.eps=8"))
    with pytest.raises(ConfigError, match=r"threat\.eps=28 is above 27\.71 for norm l2"):
        check_train_config(make_cfg("threat=l2_0.5", "threat.eps=28"))  # synthetic data: 3x16x16
    check_train_config(make_cfg("threat=l2_0.5", "threat.eps=27"))


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.2)])
def test_seeded_random_init_depends_only_on_the_image_seed(norm, eps):
    ball = LpBall(norm, eps)
    # centres at least 0.2 from the box edges, so offsets are not clamped
    center = 0.2 + 0.6 * torch.rand(6, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    seeds = torch.tensor([3, 1, 4, 1, 5, 9])
    whole = ball.random_init(center, seeds=seeds)
    # another batch order and size: each image gets the same start
    order = torch.tensor([4, 0, 5])
    part = ball.random_init(center[order], seeds=seeds[order])
    assert torch.equal(part, whole[order])
    # equal seeds give equal offsets, different seeds different ones
    assert torch.allclose(whole[1] - center[1], whole[3] - center[3], atol=1e-6)
    assert not torch.equal(whole[0] - center[0], whole[2] - center[2])


def test_only_threat_py_branches_on_the_norm():
    """All l_p geometry lives in safespot/threat.py, one class per norm: no other module of the
    package compares a norm with a norm's name (``norm == "linf"``, ``!= "l2"``, ...) or takes
    a sign step of its own (``grad.sign()``, ``torch.sign``: the l_inf steepest direction)."""
    import re
    from pathlib import Path

    import safespot

    package = Path(safespot.__file__).parent
    branch = re.compile(r"""(==|!=)\s*["'](linf|l2|Linf|L2)["']|["'](linf|l2)["']\s*(==|!=)|\.sign\(|torch\.sign\b""")
    offenders = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "threat.py"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if branch.search(line)
    ]
    assert offenders == []


@pytest.mark.parametrize("norm, cls", [("linf", "LinfBall"), ("l2", "L2Ball")])
def test_lp_ball_is_one_class_per_norm(norm, cls):
    import copy
    import pickle

    from safespot.threat import geometry

    ball = LpBall(norm, "8/255")
    assert type(ball).__name__ == cls and geometry(norm) is type(ball) and ball.eps == pytest.approx(8 / 255)
    assert pickle.loads(pickle.dumps(ball)) == ball and copy.deepcopy(ball) == ball
    assert ball.with_eps(0.5) == LpBall(norm, 0.5)
    with pytest.raises(ThreatConfigError, match="norm"):
        LpBall("l1", 0.1)
