"""The margin attacks of paper 004's ensemble: GAMA-PGD and GAMA-MT (Sriramanan et al., 2020) and
MultiTargeted PGD (Gowal et al., 2019): threat model, loss, schedules, targets, per-image seeds."""

import hydra
import pytest
import torch
import torch.nn.functional as F

from safespot.attacks import GAMA, Attack, MultiTargetedPGD
from safespot.attacks.gama import reg_weights, step_sizes
from safespot.attacks.losses import cw_margin
from safespot.attacks.multitargeted import multi_targeted, target_classes, targeted_margin
from safespot.threat import LpBall, ThreatConfigError


class Linear(torch.nn.Module):
    """A small deterministic classifier (no batch norm: per-image results are exact)."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 32), torch.nn.ReLU(), torch.nn.Linear(32, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture
def case():
    net = Linear().eval()
    g = torch.Generator().manual_seed(3)
    x = 0.2 + 0.6 * torch.rand(12, 3, 8, 8, generator=g)  # away from the box: the ball's boundary is reachable
    with torch.no_grad():
        y = net(x).argmax(1)  # correctly classified: the attacks have something to break
    return net, x, y, torch.arange(12) * 11 + 5


ATTACKS = {
    "gama_pgd": lambda norm, eps: GAMA(norm, eps, steps=12),
    "gama_mt": lambda norm, eps: GAMA(norm, eps, steps=8, n_targets=3),
    "mt_pgd": lambda norm, eps: MultiTargetedPGD(norm, eps, steps=8, n_targets=3),
}
BUDGETS = {"linf": 0.03, "l2": 0.3}


@pytest.mark.parametrize("norm", list(BUDGETS))
@pytest.mark.parametrize("name", list(ATTACKS))
def test_margin_attacks_stay_in_the_ball_and_raise_the_margin(case, name, norm):
    net, x, y, seeds = case
    attack = ATTACKS[name](norm, BUDGETS[norm])
    assert isinstance(attack, Attack) and not attack.targeted
    x_adv = attack(net, x, y, seeds=seeds)
    assert LpBall(norm, BUDGETS[norm]).contains(x_adv, x, tol=1e-5).all()
    with torch.no_grad():
        clean, adv = net(x), net(x_adv)
    assert (cw_margin(adv, y) > cw_margin(clean, y)).all()  # every image's margin raised
    if name.startswith("gama"):  # GAMA's own objective: the margin of the softmax
        assert (cw_margin(F.softmax(adv, 1), y) > cw_margin(F.softmax(clean, 1), y)).all()


@pytest.mark.parametrize("name", list(ATTACKS))
def test_margin_attacks_are_seeded_per_image_and_batch_independent(case, name):
    net, x, y, seeds = case
    attack = ATTACKS[name]("linf", BUDGETS["linf"])
    whole = attack(net, x, y, seeds=seeds)
    assert torch.equal(whole, attack(net, x, y, seeds=seeds))
    part = attack(net, x[[7, 2, 9]], y[[7, 2, 9]], seeds=seeds[[7, 2, 9]])  # other batch, other order
    assert torch.equal(part, whole[[7, 2, 9]])
    other = attack(net, x, y, seeds=seeds + 1)
    assert not torch.equal(other, whole)  # the start is the seed's


def test_gama_schedules_are_the_papers():
    """100 steps: step 2 eps divided by 10 at steps 60 and 85; lambda 50 decayed linearly to 0 at
    step 25 (Sriramanan et al., 2020, CIFAR-10)."""
    eps = 8 / 255
    sizes, lambdas = GAMA("linf", eps).schedule
    assert len(sizes) == len(lambdas) == 100
    assert sizes[0] == sizes[59] == pytest.approx(2 * eps) and sizes[60] == sizes[84] == pytest.approx(0.2 * eps)
    assert sizes[85] == sizes[99] == pytest.approx(0.02 * eps)
    assert lambdas[0] == 50 and lambdas[1] == pytest.approx(48) and lambdas[24] == pytest.approx(2)
    assert all(v == 0 for v in lambdas[25:])
    assert step_sizes(4, 1.0, [2], 10) == [1.0, 1.0, 0.1, 0.1] and reg_weights(3, 5.0, 0) == [0.0] * 3


def test_gama_loss_is_the_softmax_margin_plus_the_decaying_relaxation():
    logits = torch.tensor([[2.0, 0.5, 0.0], [0.0, 1.0, 3.0]])
    y, guide = torch.tensor([0, 1]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    p = F.softmax(logits, 1)
    gama = GAMA("linf", 0.1)
    margin = torch.stack([p[0, 1] - p[0, 0], p[1, 2] - p[1, 1]])
    assert torch.allclose(gama.loss(logits, y, guide, 0.0, None), margin)
    assert torch.allclose(gama.loss(logits, y, guide, 2.0, None), margin + 2 * ((guide - p) ** 2).sum(1))
    target = torch.tensor([2, 0])
    assert torch.allclose(gama.loss(logits, y, guide, 0.0, target), torch.stack([p[0, 2] - p[0, 0], p[1, 0] - p[1, 1]]))


def test_gama_starts_on_the_boundary_of_the_ball(case):
    _, x, _, seeds = case
    vertex = LpBall("linf", 0.03).boundary_init(x, seeds=seeds)
    assert torch.allclose((vertex - x).abs(), torch.full_like(x, 0.03))
    assert 0.4 < ((vertex - x) > 0).float().mean() < 0.6
    sphere = LpBall("l2", 0.3).boundary_init(x, seeds=seeds)
    assert torch.allclose((sphere - x).flatten(1).norm(dim=1), torch.full((12,), 0.3), atol=1e-5)
    assert torch.equal(vertex[[4]], LpBall("linf", 0.03).boundary_init(x[[4]], seeds=seeds[[4]]))


def test_targets_are_the_top_classes_after_the_label_ties_to_the_lower_index():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.5, 0.0], [3.0, 1.0, 1.0, 2.0, 0.0]])
    y = torch.tensor([1, 0])
    assert target_classes(scores, y, 3).tolist() == [[3, 2, 0], [3, 1, 2]]
    assert target_classes(scores, y, 10).shape == (2, 4)  # at most C - 1
    assert targeted_margin(scores, y, torch.tensor([3, 4])).tolist() == [0.0, -3.0]


def test_multi_targeted_keeps_the_first_successful_run_else_the_highest_margin():
    """Three images, runs towards their top classes: image 0 is broken by the second run only,
    image 1 by none (the run of highest margin is kept), image 2 by the first and the third."""
    net = torch.nn.Flatten()  # the "logits" are the pixels: points decide their own scores
    x = torch.tensor([[5.0, 4.0, 3.0, 0.0], [5.0, 4.0, 3.0, 0.0], [5.0, 4.0, 3.0, 0.0]]).view(3, 1, 1, 4)
    y = torch.zeros(3, dtype=torch.long)
    runs = {  # target rank -> the points each image reaches
        0: [[5.0, 4.5, 3.0, 0.0], [5.0, 4.9, 0.0, 0.0], [1.0, 6.0, 0.0, 0.0]],
        1: [[5.0, 0.0, 6.0, 0.0], [5.0, 0.0, 4.0, 0.0], [5.0, 4.0, 3.0, 0.0]],
        2: [[5.0, 0.0, 0.0, 9.0], [5.0, 0.0, 0.0, 4.5], [0.0, 0.0, 0.0, 7.0]],
    }
    seen = []

    def run(x_, y_, target, seeds):
        seen.append(target.tolist())
        return torch.tensor(runs[len(seen) - 1]).view(3, 1, 1, 4)

    best = multi_targeted(net, x, y, 3, run, None, None).view(3, 4)
    assert seen == [[1, 1, 1], [2, 2, 2], [3, 3, 3]]
    assert torch.equal(best, torch.tensor([runs[1][0], runs[0][1], runs[0][2]]))


def test_bad_settings_are_refused_in_one_clear_error():
    with pytest.raises(ThreatConfigError, match="start must be one of"):
        GAMA("linf", 0.1, start="corner")
    with pytest.raises(ThreatConfigError, match="reg_fraction"):
        GAMA("linf", 0.1, reg_fraction=2.0)
    with pytest.raises(ThreatConfigError, match="n_targets must be an integer >= 1"):
        MultiTargetedPGD("linf", 0.1, n_targets=0)


@pytest.mark.parametrize("option,n_targets", [("gama_pgd", None), ("gama_mt", 9), ("mt_pgd", 9)])
def test_the_presets_are_the_papers_settings(make_cfg, option, n_targets):
    cfg = make_cfg("ckpt_path=x", "threat.norm=linf", "threat.eps=8/255", f"+attack@probe={option}", name="evaluate")
    attack = hydra.utils.instantiate(cfg.probe)
    assert attack.steps == 100 and attack.n_targets == n_targets and attack.mode == "eval"
    if option.startswith("gama"):
        assert attack.step_factor == 2 and list(attack.decay_at) == [0.6, 0.85] and attack.reg_weight == 50
