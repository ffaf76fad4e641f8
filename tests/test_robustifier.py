"""The safe-spot search (paper 002, Algorithm 1) and its baselines."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import SYNTHETIC, compose_config
from safespot.attacks import PGD
from safespot.data import SyntheticDataModule
from safespot.defenses import NoRobustification, SafeSpotFGSM, SafeSpotPGD, SafeSpotSearch
from safespot.defenses.robustifier import _Pool
from safespot.threat import LinfBall, LpBall, SearchVariables, ThreatConfigError
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
    search = SafeSpotSearch("linf", 0.2, eps=0.05, max_iter=15, inner_steps=5, beta=0.1, output="best")
    result = search(tiny_net, x, seeds=torch.arange(16))
    history = torch.stack(result.loss_history)
    assert len(history) == 16 and result.output == "best"
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
    with pytest.raises(ThreatConfigError, match="delta must be > 0"):  # the second argument is delta
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


def test_8bit_projection_rounds_to_the_nearest_grid_point_inside_the_ball():
    """Hand values (in units of 1/255) around x_o = 100 with delta = 8.6: l_inf rounds each pixel
    (103.4 -> 103, 103.6 -> 104) and clamps to the grid points of [91.4, 108.6] (108.6 -> 108,
    91.2 -> 92); l_2 on one pixel keeps the largest rounding inside the ball (108.6 -> 108)."""
    from safespot.defenses.quantize import project_to_8bit

    x_o = torch.full((4, 1, 1, 1), 100 / 255)
    x_r = torch.tensor([103.4, 103.6, 108.6, 91.2]).view(4, 1, 1, 1) / 255
    q = project_to_8bit(x_r, x_o, LpBall("linf", 8.6 / 255))
    assert (q.flatten() * 255).round().tolist() == [103, 104, 108, 92]
    q = project_to_8bit(x_r, x_o, LpBall("l2", 8.6 / 255))
    assert (q.flatten() * 255).round().tolist() == [103, 104, 108, 92]


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
    first = SafeSpotSearch("linf", 0.2, eps=0.05, max_iter=1, inner_steps=3, beta=1e-9, ascend=True, init="original")
    # starts at x_r: a step of 1e-9 moves interior pixels by nothing and pixels on the edge of
    # their box by at most (1 - tanh limit) / 2 of the box (2 * 0.2 wide)
    moved = (first(tiny_net, x_r, seeds=torch.arange(16)).x_r - x_r).abs()
    assert moved.max() <= (1 - LinfBall.TANH_LIMIT) / 2 * 0.4 + 1e-6 and moved.median() <= 1e-6


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


# --- the paper's protocol and its named improvements (paper 002, Algorithm 1, Section 3.7) -----


def test_defaults_are_the_papers_protocol(tmp_path):
    """Random start in B_delta(x_o) (Section 3.7; the authors' code) and the last iterate
    (Algorithm 1), in the class, the S-Full preset, its evaluation and robustify.py."""
    search = SafeSpotSearch("linf", 8 / 255)
    assert search.init == "random" and search.output == "last"
    for name, overrides, key in [
        ("evaluate", ["evaluation=[preempt_sfull]", "ckpt_path=x"], "evaluation.preempt_sfull.robustifier"),
        ("robustify", ["ckpt_path=x", "input=x", "output=y"], "robustifier"),
    ]:
        cfg = compose_config(name, overrides, tmp_path)
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node.init == "random" and node.output == "last", name
    with pytest.raises(ThreatConfigError, match="output"):
        SafeSpotSearch("linf", 0.05, output="worst")


def test_each_papers_presets_start_the_search_where_the_paper_does(tmp_path):
    """Paper 000's Algorithm 1 starts the search at x_o (x_s = x_o): the default of its presets, the
    S-Full column of its Table 1 (preempt_sfull_xo) and the safe-spot OOD score; paper 002's presets
    (preempt_sfull, robustify.py's sfull_fast and sfull_paper) keep its random start (Section 3.7)."""
    evaluate = ["evaluation=[preempt_sfull,preempt_sfull_xo]", "ckpt_path=x"]
    robustify = ["ckpt_path=x", "input=x", "output=y"]
    expected = [
        ("evaluate", evaluate, "evaluation.preempt_sfull_xo.robustifier", "original"),
        ("ood", ["detector=[safe_spot]", "ckpt_path=x"], "detector.safe_spot.robustifier", "original"),
        ("robustify", [*robustify, "robustifier=sfull_paper000"], "robustifier", "original"),
        ("evaluate", evaluate, "evaluation.preempt_sfull.robustifier", "random"),
        ("robustify", robustify, "robustifier", "random"),
        ("robustify", [*robustify, "robustifier=sfull_paper"], "robustifier", "random"),
    ]
    for name, overrides, key, start in expected:
        node = OmegaConf.select(compose_config(name, overrides, tmp_path), key)
        assert node.init == start and node.max_iter == 100 and node.inner_steps == 20, (name, key)
        assert node._target_ == "safespot.defenses.SafeSpotSearch"
    xo = OmegaConf.select(compose_config("evaluate", evaluate, tmp_path), "evaluation.preempt_sfull_xo")
    assert set(xo.attacks) == {"pgd"} and xo.white_box is None  # paper 000's Table 1: grey-box PGD only


def test_the_search_from_x_o_starts_at_x_o(tiny_net, images, monkeypatch):
    """``init=original`` (paper 000, Algorithm 1): the first iterate whose worst-case loss the search
    measures is x_o itself, bit for bit; ``init=random`` starts elsewhere in B_delta(x_o)."""
    x, _ = images
    first = {}
    original = SafeSpotSearch._first_order

    def spy(self, model, x_r, labels, seeds):
        first.setdefault(self.init, x_r.detach().clone())
        return original(self, model, x_r, labels, seeds)

    monkeypatch.setattr(SafeSpotSearch, "_first_order", spy)
    for init in ("original", "random"):
        SafeSpotSearch("linf", 0.1, max_iter=2, inner_steps=2, init=init)(tiny_net, x, seeds=torch.arange(16))
    assert torch.equal(first["original"], x)
    assert not torch.equal(first["random"], x) and LpBall("linf", 0.1).contains(first["random"], x, tol=1e-6).all()


def test_random_start_and_first_inner_attack_draw_different_offsets(tiny_net, images, monkeypatch):
    """With delta = eps the search's random start and its first inner attack's start used to
    draw identical offsets from the same per-image seeds."""
    x, _ = images
    x = x * 0.5 + 0.25  # interior pixels: no offset is clamped
    starts = []
    original = LpBall.random_init

    def spy(self, center, *args, **kwargs):
        out = original(self, center, *args, **kwargs)
        starts.append(out - center)
        return out

    monkeypatch.setattr(LpBall, "random_init", spy)
    SafeSpotSearch("linf", 0.1, max_iter=1, inner_steps=1, init="random")(tiny_net, x, seeds=torch.arange(16))
    search_start, inner_start = starts[0], starts[1]
    assert search_start.abs().max() <= 0.1 + 1e-6 and inner_start.abs().max() <= 0.1 + 1e-6
    correlation = torch.corrcoef(torch.stack([search_start.flatten(), inner_start.flatten()]))[0, 1]
    assert abs(float(correlation)) < 0.1


def test_boundary_pixels_move_like_interior_ones():
    """A pixel on the edge of its box (x_o = 0, or clamped there by a random start) must move
    under the RMSProp update of the tanh variable as an interior pixel does: at |g| = 1e-3 a
    0-pixel used to move 4e-6/255 in 100 steps while interior pixels reached 8/255."""
    delta = 8 / 255
    search = SafeSpotSearch("linf", delta, init="original")
    x_o = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)
    for magnitude in (1e-3, 1e-5):
        pool = search._start(x_o, torch.zeros(1, dtype=torch.long), None, torch.arange(1))
        for direction in (-1.0, 1.0):  # descent along -grad: first up, then back down
            for _ in range(100):
                search._step(pool, torch.full_like(x_o, direction * magnitude))
            target = (x_o + delta).clamp(0, 1) if direction < 0 else (x_o - delta).clamp(0, 1)
            moved_to = pool.x_r.flatten()
            # every pixel reaches (within 2% of the box) the side of its box the gradient points to
            assert torch.allclose(moved_to, target.flatten(), atol=0.02 * 2 * delta), (magnitude, direction, moved_to)


def test_best_output_prefers_an_iterate_where_the_inner_attack_failed():
    """``output='best'`` selects first on "the inner attack failed", then on the loss; the
    old rule (lowest loss only) could return a broken iterate."""
    x = torch.zeros(2, 1, 1, 1)
    pool = _Pool(
        index=torch.arange(2),
        x_o=x,
        labels=torch.zeros(2, dtype=torch.long),
        seeds=None,
        x_r=torch.ones(2, 1, 1, 1),
        var=SearchVariables(center=x),
        best_x=x.clone(),
        best_loss=torch.tensor([0.1, 0.1]),
        best_success=torch.tensor([True, False]),
        it=torch.zeros(2, dtype=torch.long),
        streak=torch.zeros(2, dtype=torch.long),
    )
    # image 0: kept iterate broken with a low loss, new one unbroken with a higher loss -> take it
    # image 1: kept iterate unbroken, new one broken with a lower loss -> keep the old one
    pool.keep(torch.tensor([0.9, 0.01]), torch.tensor([False, True]), "best")
    assert pool.best_x.flatten().tolist() == [1.0, 0.0]
    assert pool.best_success.tolist() == [False, False]
    pool.keep(torch.tensor([5.0, 5.0]), torch.tensor([True, True]), "last")
    assert pool.best_x.flatten().tolist() == [1.0, 1.0] and pool.best_success.all()


def test_last_output_returns_the_last_iterate(tiny_net, images):
    x, _ = images
    result = SafeSpotSearch("linf", 0.1, max_iter=5, inner_steps=2, beta=0.05)(tiny_net, x[:1], seeds=torch.arange(1))
    assert result.output == "last" and (result.iterations == 5).all()
    assert torch.allclose(result.worst_loss[0], result.loss_history[-1])  # the loss of the 5th-step iterate


def test_restarts_score_an_iterate_by_its_worst_run(tiny_net, images):
    """With N inner runs an iterate's loss is the max over the runs (any run broke it = broken),
    not the mean."""
    from safespot.utils.rng import derive

    x, _ = images
    labels = tiny_net(x).argmax(1)
    seeds = torch.arange(16)
    search = SafeSpotSearch("linf", 0.1, inner_steps=2, restarts=3)
    grad, loss, success = search._first_order(tiny_net, x, labels, seeds)
    runs = [search._inner_run(tiny_net, x, labels, derive(seeds, "inner_run", n)) for n in range(3)]
    assert torch.allclose(loss, torch.stack([r[1] for r in runs]).amax(0))
    assert torch.equal(success, torch.stack([r[2] for r in runs]).any(0))
    assert torch.allclose(grad, torch.stack([r[0] for r in runs]).mean(0), atol=1e-7)  # the gradient: their mean


@pytest.mark.parametrize("quantize", [False, True])
def test_early_exit_never_reports_a_broken_image_as_done(tiny_net, images, quantize):
    x, _ = images
    for output in ("last", "best"):
        result = SafeSpotSearch(
            "linf", 8 / 255, eps=0.1, max_iter=6, inner_steps=2, early_exit=1, output=output, quantize=quantize
        )(tiny_net, x, seeds=torch.arange(16))
        assert not (result.early_exit & result.attack_succeeded).any()


def test_search_keeps_every_tensor_on_the_images_device(images):
    """Seeds given on the CPU are moved to the images' device before rows created there index
    them (on CUDA the old search raised "indices should be either on cpu or on the same device").
    Run on the ``meta`` device, which refuses mixed devices and host syncs alike: the fixed
    schedule needs neither."""
    from conftest import TinyNet

    net = TinyNet().to("meta").eval()
    x = torch.empty(6, 3, 8, 8, device="meta")
    for settings in ({"init": "random"}, {"init": "original", "active_batch": 4}):
        result = SafeSpotSearch("linf", 0.1, max_iter=2, inner_steps=2, **settings)(net, x, seeds=torch.arange(6))
        assert result.x_r.device.type == "meta" and result.iterations.device.type == "meta"
        assert len(result.loss_history) == 3


def test_image_seeds_live_on_the_index_device():
    from safespot.utils.rng import image_seeds

    index = torch.arange(4, device="meta")
    assert image_seeds(0, index, 3).device.type == "meta"


def test_search_on_a_smoothed_model_does_not_depend_on_its_batch(tiny_net, images):
    """The soft smoothed forward inside the search draws its noise from per-image streams (the
    global RNG made an image's x_r change with its batch by up to 3.5e-2), and the search runs at
    the robustification draw count (paper 002, Appendix C.2: 5 draws, attacks 50)."""
    from safespot.smoothing import SmoothedClassifier

    x, _ = images
    model = SmoothedClassifier(tiny_net, sigma=0.25, m_robustify=3, m_attack=7, n_vote=5).eval()
    rows = []
    hook = tiny_net.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    search = SafeSpotSearch("linf", 0.1, max_iter=3, inner_steps=2, beta=0.05)
    seeds = torch.arange(100, 116)
    try:
        whole = search(model, x, seeds=seeds)
    finally:
        hook.remove()
    # 16 images: soft forwards of 3 draws (48 rows) and votes of 5 (80 rows), never 7 draws (112)
    assert set(rows) == {48, 80}
    assert model.m == 7  # restored to the attack count after the search
    alone = search(model, x[5:6], seeds=seeds[5:6])
    reversed_batch = search(model, x.flip(0), seeds=seeds.flip(0))
    pooled = SafeSpotSearch("linf", 0.1, max_iter=3, inner_steps=2, beta=0.05, active_batch=3)(model, x, seeds=seeds)
    assert torch.allclose(alone.x_r[0], whole.x_r[5], atol=1e-5)
    assert torch.allclose(reversed_batch.x_r.flip(0), whole.x_r, atol=1e-5)
    assert torch.allclose(pooled.x_r, whole.x_r, atol=1e-5)


# --- 8-bit output: the reported loss and success are those of the quantised image ------------
class _Threshold(torch.nn.Module):
    """One-pixel images: logits ``[-z/2, z/2]``, ``z = k (x - b)`` per image: class 1 above the
    boundary ``b``, and an input gradient that never vanishes in float32 (both logits move)."""

    def __init__(self, boundary: torch.Tensor, k: float = 255.0) -> None:
        super().__init__()
        self.boundary, self.k = boundary, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.k * (x.flatten(1)[:, :1] - self.boundary[: len(x), None])
        return torch.cat([-z / 2, z / 2], 1)


QUANTIZED_CASES = [
    ("search", {"early_exit": None, "output": "last"}),
    ("search", {"early_exit": 1, "output": "last"}),
    ("search", {"early_exit": 1, "output": "best"}),
    ("fgsm", {}),
    ("pgd", {}),
]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind,options", QUANTIZED_CASES, ids=[f"{k}-{o}" for k, o in QUANTIZED_CASES])
def test_quantized_robustification_reports_the_loss_and_success_of_the_8bit_image(kind, options):
    """l_2 on one-pixel images, delta = eps = 8.6/255, x_o = 100/255: every robustifier moves x_r
    to x_o + delta = 108.6/255 (the protected class lies above), whose 8-bit projection inside
    B_delta(x_o) is 108/255. The worst case of the inner attack is x_r - eps: 100/255 before
    quantisation, 99.4/255 after. Image 0's boundary (99.7/255) lies between the two: only the
    quantised image is broken, and the report must say so (loss at 99.4/255, attack succeeded,
    no early exit). Image 1's boundary (95/255) lies below both: unbroken either way."""
    delta = 8.6 / 255
    x_o = torch.full((2, 1, 1, 1), 100 / 255)
    boundary = torch.tensor([99.7 / 255, 95 / 255])
    model = _Threshold(boundary)
    common = {"eps": delta, "quantize": True}
    robustifier = {
        "search": lambda: SafeSpotSearch(
            "l2",
            delta,
            max_iter=1 if options["early_exit"] is None else 5,
            beta=10.0,
            inner_steps=10,  # 8 steps of eps/4 reach x_r - eps from any start
            init="original",
            **options,
            **common,
        ),
        "fgsm": lambda: SafeSpotFGSM("l2", delta, **common),
        "pgd": lambda: SafeSpotPGD("l2", delta, **common),
    }[kind]()
    result = robustifier(model, x_o, seeds=torch.arange(2))
    assert result.protected.tolist() == [1, 1]
    assert torch.allclose(result.x_r.flatten(), torch.full((2,), 108 / 255), atol=1e-7)
    worst = result.x_r.flatten() - delta  # 99.4/255: the end of the inner attack at the 8-bit image
    expected = F.softplus(-model.k * (worst - boundary))  # CE of class 1: softplus(-z)
    assert result.attack_succeeded.tolist() == [True, False]
    assert torch.allclose(result.worst_loss, expected, rtol=1e-4)
    assert result.worst_loss[0] > math.log(2)  # on the wrong side of the boundary: > CE at a tie
    if kind == "search" and options["early_exit"] is not None:
        assert result.early_exit.tolist() == [False, True]  # left early, but broken once quantised
    unquantized = replace(robustifier, quantize=False)(model, x_o, seeds=torch.arange(2))
    assert not unquantized.attack_succeeded.any()  # the case depends on the quantisation
