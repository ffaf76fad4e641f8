"""ResNet-20 and the noise-injected layers of paper 003's base models (PNI, He et al., 2019)."""

from __future__ import annotations

import json

import hydra
import pytest
import torch

from conftest import SYNTHETIC
from safespot.errors import ConfigError
from safespot.models import NoisyConv2d, ResNet20, noise_scales
from safespot.smoothing.soft import seeded_noise
from safespot.train import train

NOISY = ["pni_w", "pni_a", "cni_w"]


def test_resnet20_is_he_et_als_cifar_network():
    net = ResNet20()
    assert sum(p.numel() for p in net.parameters()) == 269_722  # 0.27M (He et al., Table 6)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 19  # + 1 linear = 20 layers
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="noise must be one of"):
        ResNet20(noise="cni_x")


@pytest.mark.parametrize("noise", NOISY)
def test_noise_is_drawn_at_every_forward_pass_and_is_off_without_noise(noise):
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32)
    noisy, plain = ResNet20(noise=noise).eval(), ResNet20().eval()
    assert not torch.equal(noisy(x), noisy(x))  # on in eval mode: smoothed inference averages passes
    assert torch.equal(plain(x), plain(x))
    if noise != "cni_w":
        assert all(v == pytest.approx(0.25) for v in noise_scales(noisy).values()) and len(noise_scales(noisy)) == 19


@pytest.mark.parametrize("noise", NOISY)
@pytest.mark.parametrize("seeded", [False, True])
def test_the_learned_noise_parameters_receive_gradients(noise, seeded):
    torch.manual_seed(0)
    net = ResNet20(noise=noise, blocks=1)
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    with seeded_noise(net, torch.arange(4) if seeded else None):
        torch.nn.functional.cross_entropy(net(x), y).backward()
    layers = [m for m in net.modules() if isinstance(m, NoisyConv2d)]
    learned = [p for m in layers for p in ((m.diag, m.factor) if noise == "cni_w" else (m.alpha,))]
    assert layers and all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned)


@pytest.mark.parametrize("noise", NOISY)
def test_seeded_draws_are_per_image_and_independent_of_the_batch(noise):
    torch.manual_seed(0)
    net = ResNet20(noise=noise, blocks=1, noise_per="image").eval()
    x, seeds = torch.rand(5, 3, 16, 16), torch.tensor([11, 12, 13, 14, 15])
    with seeded_noise(net, seeds):
        together = net(x)
        second_pass = net(x)  # the next forward pass: fresh draws
    with seeded_noise(net, seeds[[3, 1]]):
        apart = net(x[[3, 1]])
    with seeded_noise(net, seeds):
        again = net(x)
    torch.testing.assert_close(apart, together[[3, 1]], rtol=1e-4, atol=1e-5)
    assert torch.equal(again, together) and not torch.allclose(second_pass, together)
    # each image its own draw: two copies of one image with different seeds differ
    with seeded_noise(net, torch.tensor([1, 2])):
        twins = net(x[[0, 0]])
    assert not torch.allclose(twins[0], twins[1])


def _noisy_layers(net: torch.nn.Module) -> int:
    return sum(isinstance(m, NoisyConv2d) for m in net.modules())


@pytest.mark.parametrize("noise", ["pni_w", "cni_w"])
@pytest.mark.parametrize("seeded", [False, True])
def test_noise_per_forward_draws_one_weight_noise_per_layer_and_pass(noise, seeded, monkeypatch):
    """Paper 003 (and its code) draws one weight noise per forward pass: every noisy layer draws
    one noise tensor per forward call, so all images of the batch see the same weights (four
    copies of one image give four equal outputs), and the next pass draws afresh; per image, the
    same copies with their own seeds see different weights."""
    torch.manual_seed(0)
    net = ResNet20(noise=noise, blocks=1, noise_per="forward").eval()
    x, seeds = torch.rand(1, 3, 16, 16).repeat(4, 1, 1, 1), torch.tensor([11, 12, 13, 14])
    drawn = []
    weight_noise = NoisyConv2d.weight_noise

    def spy(self, rows, passes=None):
        noise = weight_noise(self, rows, passes)
        drawn.append(len(noise))
        return noise

    monkeypatch.setattr(NoisyConv2d, "weight_noise", spy)
    with seeded_noise(net, seeds if seeded else None):
        out, again = net(x), net(x)
    assert drawn == [1] * 2 * _noisy_layers(net)  # one noise tensor per layer per forward pass
    assert all(torch.equal(out[0], row) for row in out) and not torch.allclose(out, again)
    per_image = ResNet20(noise=noise, blocks=1, noise_per="image").eval()
    per_image.load_state_dict(net.state_dict())
    drawn.clear()
    with seeded_noise(per_image, seeds if seeded else None):
        apart = per_image(x)
    assert drawn == [4] * _noisy_layers(net) and not torch.allclose(apart[0], apart[1])


@pytest.mark.parametrize("noise", ["pni_w", "cni_w"])
def test_noise_per_forward_gives_each_copy_of_a_batch_its_own_pass_seeded(noise):
    """Inside ``seeded_noise`` a call that holds k copies of the seeded images (a soft smoothed
    classifier's m noisy copies) is k forward passes: each copy's images share one weight draw,
    the copies differ, and the same seeds give the same draws."""
    torch.manual_seed(0)
    net = ResNet20(noise=noise, blocks=1, noise_per="forward").eval()
    x, seeds = torch.rand(1, 3, 16, 16).repeat(12, 1, 1, 1), torch.tensor([5, 6, 7, 8])  # 3 copies of 4 images
    with seeded_noise(net, seeds):
        out = net(x).view(3, 4, -1)
    with seeded_noise(net, seeds):
        again = net(x).view(3, 4, -1)
    assert torch.equal(out, again)
    assert all(torch.equal(copy[0], row) for copy in out for row in copy)  # one pass: the same weights
    assert not torch.allclose(out[0, 0], out[1, 0]) and not torch.allclose(out[1, 0], out[2, 0])


def test_the_smoothed_vote_of_a_forward_noise_model_shares_each_draw_across_the_batch():
    """Paper 003's smoothed inference on a model with one weight noise per forward pass: draw j of
    the vote is one pass of the batch, so two copies of an image in one batch get the same vote
    (sigma 0: the model's own noise only), whatever the chunking, and n draws are n passes (12
    draws are not 1); per image, the copies' votes differ."""
    from safespot.smoothing import SmoothedClassifier

    torch.manual_seed(0)
    net = ResNet20(noise="cni_w", blocks=1, noise_per="forward").eval()
    x, seeds = torch.rand(1, 3, 16, 16).repeat(4, 1, 1, 1), torch.tensor([5, 6, 7, 8])
    smoothed = SmoothedClassifier(net, sigma=0.0, n_vote=12, vote="soft", max_batch=48).eval()
    together = smoothed.vote_logits(x, seed=seeds)
    assert all(torch.equal(together[0], row) for row in together)
    smoothed.max_batch = 5  # other chunks: a chunk holds parts of two passes
    torch.testing.assert_close(smoothed.vote_logits(x, seed=seeds), together, rtol=1e-5, atol=1e-6)
    one = SmoothedClassifier(net, sigma=0.0, n_vote=1, vote="soft").eval().vote_logits(x, seed=seeds)
    assert not torch.allclose(one, together)
    net.apply(lambda m: setattr(m, "noise_per", "image") if isinstance(m, NoisyConv2d) else None)
    per_image = smoothed.vote_logits(x, seed=seeds)
    assert not torch.allclose(per_image[0], per_image[1])


@pytest.mark.parametrize("preset", ["cifar10_cni_w", "cifar10_pni_w", "cifar10_cni_iw_finetune"])
def test_paper_003s_presets_draw_one_weight_noise_per_forward_pass(make_cfg, preset):
    """The paper's protocol (one weight noise per forward pass) is the default of its presets;
    per-image noise is the option, and an unknown value is refused."""
    cfg = make_cfg(f"experiment={preset}", "init_from=x", "model.backbone.blocks=1", synthetic=False)
    assert cfg.model.backbone.noise_per == "forward"
    layers = [m for m in hydra.utils.instantiate(cfg.model).modules() if isinstance(m, NoisyConv2d)]
    assert layers and all(m.noise_per == "forward" for m in layers)
    cfg = make_cfg(f"experiment={preset}", "init_from=x", "model.backbone.noise_per=image", synthetic=False)
    assert all(
        m.noise_per == "image" for m in hydra.utils.instantiate(cfg.model).modules() if isinstance(m, NoisyConv2d)
    )
    with pytest.raises(ConfigError, match="noise_per must be one of"):
        ResNet20(noise="cni_w", noise_per="batch")


def test_evaluate_draws_a_runs_weight_noise_as_stored_or_as_chosen_and_records_it(make_cfg, tmp_path):
    """evaluate.py evaluates a noise-injected run with the weight draws it trained with (its
    model.backbone.noise_per) or with ``noise_per=`` chosen for the evaluation (per image: exact
    records), and records which in results.json; a model without weight noise refuses it."""
    from safespot.evaluate import evaluate

    quiet = [o for o in SYNTHETIC if not o.startswith("model")]
    short = ["model=resnet20", "model.backbone.blocks=1", "method=natural", "trainer.max_epochs=1", "test=false"]
    runs = {}
    for noise in ("cni_w", "none"):
        _, objects = train(
            make_cfg(*quiet, *short, f"model.backbone.noise={noise}", synthetic=False, out=tmp_path / noise)
        )
        runs[noise] = objects["trainer"].checkpoint_callback.last_model_path
    small = ["evaluation=[clean]", "data.test_subset=4", "trainer.enable_progress_bar=false"]
    for chosen, expected in ((None, "forward"), ("image", "image")):
        extra = [] if chosen is None else [f"noise_per={chosen}"]
        out = tmp_path / f"eval_{chosen}"
        evaluate(make_cfg(f"ckpt_path={runs['cni_w']}", *small, *extra, name="evaluate", out=out))
        meta = json.loads((out / "results.json").read_text())["meta"]
        assert meta["noise_per"] == expected and meta["model_config"]["backbone"]["noise_per"] == expected
    with pytest.raises(ConfigError, match="noise_per=image: the run's model has no weight noise"):
        evaluate(make_cfg(f"ckpt_path={runs['none']}", *small, "noise_per=image", name="evaluate", out=tmp_path / "e"))
    with pytest.raises(ConfigError, match="noise_per must be one of"):
        evaluate(make_cfg(f"ckpt_path={runs['cni_w']}", *small, "noise_per=batch", name="evaluate", out=tmp_path / "f"))


def test_a_noise_injected_resnet20_trains_through_the_normal_command(make_cfg):
    quiet = [o for o in SYNTHETIC if not o.startswith("model")]
    cfg = make_cfg(
        *quiet,
        "model=resnet20",
        "model.backbone.noise=pni_w",
        "model.backbone.blocks=1",
        "method=adversarial",
        "threat.steps=1",
        "method.val_attack.steps=1",
        "method.test_attack.steps=1",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
        "test=false",
        synthetic=False,
    )
    start = noise_scales(hydra.utils.instantiate(cfg.model))
    _, objects = train(cfg)
    learned = noise_scales(objects["method"].net)
    assert set(learned) == set(start) and learned != start  # the scales were trained


def test_colored_noise_has_the_low_rank_plus_diagonal_covariance():
    """CNI-W's weight noise: covariance ``diag(|std(W) d|) + F F^T`` over all weights of the layer."""
    torch.manual_seed(0)
    conv = NoisyConv2d(2, 2, 1, bias=False, noise="cni_w", rank=2)
    with torch.no_grad():
        conv.factor.copy_(torch.randn_like(conv.factor) * 0.3)
        samples = conv.weight_noise(200_000).flatten(1)
        expected = torch.diag((conv.weight.std() * conv.diag).abs() + 1e-8) + conv.factor @ conv.factor.T
    torch.testing.assert_close(samples.T.cov(), expected, atol=0.01, rtol=0.05)


def test_the_smoothed_vote_averages_a_noisy_models_own_noise_per_draw_independent_of_the_batch():
    """Paper 003's smoothed inference on a noise-injected model: every draw of the vote has its own
    weight noise (sigma 0: only that noise), seeded per image and draw, so the vote of an image is
    the same alone, in a batch, and with another chunking."""
    from safespot.smoothing import SmoothedClassifier

    torch.manual_seed(0)
    net = ResNet20(noise="cni_w", blocks=1, noise_per="image").eval()
    x, seeds = torch.rand(4, 3, 16, 16), torch.tensor([5, 6, 7, 8])
    smoothed = SmoothedClassifier(net, sigma=0.0, n_vote=12, vote="soft", max_batch=48).eval()
    together = smoothed.vote_logits(x, seed=seeds)
    alone = smoothed.vote_logits(x[[2]], seed=seeds[[2]])
    smoothed.max_batch = 5  # other chunks: rows of one draw never share noise by accident
    rechunked = smoothed.vote_logits(x, seed=seeds)
    torch.testing.assert_close(alone, together[[2]], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rechunked, together, rtol=1e-4, atol=1e-5)
    one = SmoothedClassifier(net, sigma=0.0, n_vote=1, vote="soft").eval().vote_logits(x, seed=seeds)
    assert not torch.allclose(one, together)  # 12 draws with different model noise are not 1
    with pytest.raises(Exception, match="certify needs input noise"):
        smoothed.certify(x, n0=2, n=4)


def test_fine_tuning_starts_from_the_checkpoints_weights(make_cfg, tmp_path):
    """``init_from`` (paper 003 fine-tunes an adversarially pre-trained model): the new run's
    network starts with the checkpoint's weights, with its own optimiser and epochs."""
    from safespot.train import initialise_from
    from safespot.utils.checkpoint import CheckpointError, load_checkpoint, net_state_dict

    base = ["model=resnet20", "model.backbone.noise=cni_w", "model.backbone.blocks=1", "method=natural"]
    quiet = [o for o in SYNTHETIC if not o.startswith("model")]
    first = make_cfg(*quiet, *base, "trainer.max_epochs=1", "test=false", synthetic=False, out=tmp_path / "a")
    _, objects = train(first)
    path = objects["trainer"].checkpoint_callback.last_model_path
    net = hydra.utils.instantiate(first.model)
    initialise_from(net, path)
    saved = net_state_dict(load_checkpoint(path))
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
    tuned = make_cfg(*quiet, *base, f"init_from={path}", "trainer.max_epochs=1", "test=false", synthetic=False,
                     out=tmp_path / "b")  # fmt: skip
    _, again = train(tuned)
    assert again["trainer"].current_epoch == 1  # a fresh run of its own length, not a resume
    with pytest.raises(CheckpointError, match="do not fit the model config"):
        initialise_from(ResNet20(noise="pni_w", blocks=1), path)
    with pytest.raises(ConfigError, match="not both"):
        train(make_cfg(*quiet, *base, f"init_from={path}", f"ckpt_path={path}", synthetic=False))


def test_adv_weight_mixes_clean_and_adversarial_cross_entropy(tiny_net, images):
    """Paper 003, Eq. 23: ``(1 - w) CE(c(x), y) + w CE(c(x_a), y)``; TRADES refuses it."""
    import functools

    from safespot.methods import AdversarialTraining, TradesTraining

    x, y = images
    threat = {"norm": "linf", "eps": 0.1, "step_size": 0.03, "steps": 2}
    common = {"net": tiny_net, "optimizer": functools.partial(torch.optim.SGD, lr=0.1), "threat": threat}
    method = AdversarialTraining(**common, adv_weight=0.5, attack_mode="eval", attack_updates_bn=False)
    tiny_net.eval()
    torch.manual_seed(0)
    loss, _ = method.training_loss(x, y)
    torch.manual_seed(0)
    x_adv = method.adversarial_examples(x, y)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(loss, 0.5 * ce(tiny_net(x), y) + 0.5 * ce(tiny_net(x_adv), y))
    assert method.hparams["adv_weight"] == 0.5
    with pytest.raises(ValueError, match="adv_weight"):
        AdversarialTraining(**common, adv_weight=0.0)
    with pytest.raises(ValueError, match="TRADES weighs"):
        TradesTraining(**common, adv_weight=0.5)


def test_the_vote_sweep_scores_each_n_and_rule_as_the_vote_itself_would(make_cfg, tmp_path):
    """``evaluation=[votes]``: accuracy versus the number of draws and the vote rule (paper 003)
    from one run of max(n) draws; each (rule, n) equals the smoothed classifier's own vote."""
    from safespot.evaluation import VoteSweep
    from safespot.smoothing import SmoothedClassifier

    torch.manual_seed(0)
    net = ResNet20(noise="pni_w", blocks=1).eval()
    x, y, seeds = torch.rand(5, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4]), torch.arange(5)
    smoothed = SmoothedClassifier(net, sigma=0.1, n_vote=8, max_batch=9).eval()
    fields, _ = VoteSweep("votes", ns=[1, 8], votes=["majority", "soft", "weighted"])(smoothed, x, y, seeds)
    for vote in ("majority", "soft", "weighted"):
        for n in (1, 8):
            smoothed.vote, smoothed.n_vote = vote, n
            assert torch.equal(fields[f"votes_{vote}_n{n}/pred"], smoothed.vote_logits(x, seed=seeds).argmax(1))
    with pytest.raises(ConfigError, match="needs a smoothed classifier"):
        VoteSweep("votes")(net, x, y, seeds)
    # through evaluate.py: the sweep's records next to the other evaluations'
    from safespot.evaluate import evaluate

    quiet = [o for o in SYNTHETIC if not o.startswith("model")]
    model = ["model=resnet20", "model.backbone.noise=cni_w", "model.backbone.blocks=1"]
    short = ["method=natural", "trainer.max_epochs=1", "test=false"]
    first = make_cfg(*quiet, *model, *short, synthetic=False, out=tmp_path / "t")
    _, objects = train(first)
    out = tmp_path / "eval"
    sweep = ["evaluation=[clean,votes_pgd]", "evaluation.votes_pgd.attack.steps=2", "evaluation.votes_pgd.ns=[1,4]"]
    ckpt = objects["trainer"].checkpoint_callback.last_model_path
    small = ["smoothing.sigma=0", "smoothing.m_attack=2", "data.test_subset=8"]
    cfg = make_cfg(f"ckpt_path={ckpt}", *sweep, *small, name="evaluate", out=out)
    results = evaluate(cfg)
    assert {f"votes_pgd_{v}_n{n}/acc" for v in ("majority", "soft", "weighted") for n in (1, 4)} <= set(results)


@pytest.mark.parametrize("noise", ["pni_w", "cni_w"])
def test_a_noise_injected_model_fine_tunes_from_a_noise_free_checkpoint(tmp_path, noise):
    """Paper 003, Section 4 starts the noise-injected models from an adversarially pre-trained
    base model: ``init_from`` a noise-free ResNet-20 checkpoint loads every weight it has and
    leaves only the noise parameters at their initial values; the reverse (a noisy checkpoint
    into a noise-free model) and any other missing weight are refused."""
    from safespot.models import build_classifier
    from safespot.train import initialise_from
    from safespot.utils.checkpoint import CheckpointError

    def classifier(kind):
        return build_classifier(ResNet20(noise=kind, blocks=1), [0.5] * 3, [0.25] * 3, 10)

    torch.manual_seed(0)
    plain, noisy = classifier("none"), classifier(noise)
    path = tmp_path / "plain.ckpt"

    def save(state, path):
        torch.save({"state_dict": {f"net.{k}": v for k, v in state.items()}, "safespot_config": {}}, path)

    save(plain.state_dict(), path)
    initial = {k: v.clone() for k, v in noisy.state_dict().items()}
    initialise_from(noisy, str(path))
    loaded, fresh = noisy.state_dict(), set(initial) - set(plain.state_dict())
    assert fresh and all(k.rsplit(".", 1)[1] in ("alpha", "diag", "factor") for k in fresh)
    assert all(torch.equal(loaded[k], v) for k, v in plain.state_dict().items())
    assert all(torch.equal(loaded[k], initial[k]) for k in fresh)
    noisy_path = tmp_path / "noisy.ckpt"
    save(noisy.state_dict(), noisy_path)
    with pytest.raises(CheckpointError, match="unexpected"):
        initialise_from(classifier("none"), str(noisy_path))
    headless = {k: v for k, v in plain.state_dict().items() if "head" not in k}
    assert len(headless) < len(plain.state_dict())
    save(headless, path)
    with pytest.raises(CheckpointError, match="missing"):
        initialise_from(classifier(noise), str(path))


def test_cni_w_initial_covariance_is_set_from_the_model_config(make_cfg):
    """``model.backbone.diag_init`` / ``factor_init`` reach every CNI-W layer (the reference
    code's 0.25^2 / 0.01 by default)."""
    quiet = [o for o in SYNTHETIC if not o.startswith("model")]
    default = hydra.utils.instantiate(
        make_cfg(*quiet, "model=resnet20", "model.backbone.noise=cni_w", synthetic=False).model
    )
    custom = make_cfg(*quiet, "model=resnet20", "model.backbone.noise=cni_w", "model.backbone.diag_init=0.01",
                      "model.backbone.factor_init=0.002", synthetic=False)  # fmt: skip
    layers = [m for m in hydra.utils.instantiate(custom.model).modules() if isinstance(m, NoisyConv2d)]
    assert len(layers) == 19 and all(bool((m.diag == 0.01).all() and (m.factor == 0.002).all()) for m in layers)
    assert all(bool((m.diag == 0.0625).all()) for m in default.modules() if isinstance(m, NoisyConv2d))


def test_noise_levels_of_a_state_dict_are_the_noise_spread_relative_to_the_weights():
    """PNI: |alpha|; CNI-W: the root mean variance of the colored noise over std(W), which is the
    empirical spread of :meth:`NoisyConv2d.weight_noise` relative to std(W); layers in the state
    dict's order, noise-free layers left out."""
    from safespot.models.noise_injection import noise_levels

    torch.manual_seed(0)
    pni = NoisyConv2d(3, 4, 3, noise="pni_w", alpha=-0.1)
    cni = NoisyConv2d(3, 4, 3, noise="cni_w", rank=2)
    plain = NoisyConv2d(3, 4, 3, noise="none")
    state = {f"net.a.{k}": v for k, v in pni.state_dict().items()}
    state |= {f"net.p.{k}": v for k, v in plain.state_dict().items()}
    state |= {f"net.b.{k}": v for k, v in cni.state_dict().items()}
    levels = noise_levels(state)
    draws = cni.weight_noise(20000)
    empirical = float(draws.pow(2).mean().sqrt() / cni.weight.std())
    assert len(levels) == 2 and levels[0] == pytest.approx(0.1) and levels[1] == pytest.approx(empirical, rel=0.02)
    assert noise_levels(plain.state_dict()) == []
