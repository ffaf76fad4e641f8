"""Feature Level Stochastic Smoothing (paper 004): the stochastic classifier, Algorithm 1's losses
and two-step training, N-sample inference, threshold calibration and the Eqs. 3-8 metrics."""

import json
import math
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence
from torch.utils.data import DataLoader, TensorDataset

from conftest import cpu_trainer
from safespot.attacks import PGD
from safespot.evaluate import build_evaluations
from safespot.evaluation import EvaluationModule
from safespot.evaluation.rejection import RejectionEvaluation, view_predictions
from safespot.evaluation.rejection_metrics import (
    TableRow,
    calibrate_threshold,
    load_row,
    rejection_metrics,
    rejection_table,
    worst_case,
)
from safespot.methods import FLSSTraining
from safespot.methods.flss import FixedDraw, gaussian_kl, softmax_kl
from safespot.models import SmallCNN, build_classifier, build_stochastic_classifier
from safespot.threat import LpBall
from safespot.train import train

EPS = 0.1


def _flss_net(num_classes: int = 4, latent_dim: int | None = 16, sigma: str = "softplus"):
    torch.manual_seed(0)
    backbone = SmallCNN(num_classes, width=4)
    return build_stochastic_classifier(backbone, [0.5] * 3, [0.25] * 3, num_classes, latent_dim, (16,), sigma).eval()


def _method(net, **kwargs):
    threat = {"norm": "linf", "eps": EPS, "step_size": EPS / 4, "steps": 3}
    return FLSSTraining(net=net, optimizer=partial(torch.optim.SGD, lr=0.1), threat=threat, **kwargs)


# --- KL terms (Algorithm 1, lines 6-8 and 13) ----------------------------------------------
def test_gaussian_kl_matches_closed_form_and_torch():
    g = torch.Generator().manual_seed(0)
    mu_p, mu_q = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    s_p, s_q = torch.rand(3, 5, generator=g) + 0.2, torch.rand(3, 5, generator=g) + 0.2
    expected = kl_divergence(Normal(mu_p, s_p), Normal(mu_q, s_q)).sum(-1)
    assert torch.allclose(gaussian_kl(mu_p, s_p, mu_q, s_q), expected, atol=1e-5)
    prior = kl_divergence(Normal(mu_p, s_p), Normal(torch.zeros(3, 5), torch.ones(3, 5))).sum(-1)
    assert torch.allclose(gaussian_kl(mu_p, s_p), prior, atol=1e-5)
    # one dimension by hand: KL(N(1, 2^2) || N(0, 1)) = 0.5 (4 + 1 - 1 - log 4)
    by_hand = 0.5 * (4 + 1 - 1 - math.log(4))
    assert gaussian_kl(torch.tensor([[1.0]]), torch.tensor([[2.0]])).item() == pytest.approx(by_hand, rel=1e-6)
    assert gaussian_kl(mu_p, s_p, mu_p, s_p).abs().max() < 1e-6


def test_softmax_kl_is_kl_of_the_sampled_from_the_unsampled_output():
    p, q = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    pp, qq = F.softmax(p, 1), F.softmax(q, 1)
    expected = (pp * (pp / qq).log()).sum()
    assert softmax_kl(p, q).item() == pytest.approx(expected.item(), rel=1e-6)
    assert softmax_kl(p, p).item() == pytest.approx(0.0, abs=1e-7)


# --- the stochastic classifier -----------------------------------------------------------------
@pytest.mark.parametrize("sigma", ["softplus", "logvar"])
def test_forward_samples_holds_a_fixed_draw_and_has_a_deterministic_mode(images, sigma):
    x, _ = images
    net = _flss_net(sigma=sigma)
    with torch.no_grad():
        mu, sd = net.encode(x)
        assert (sd > 0).all() and mu.shape == (16, 16)
        assert not torch.allclose(net(x), net(x))  # a fresh draw per call
        e = torch.randn(16, 16)
        assert torch.equal(net(x, eps=e), net(x, eps=e))
        assert torch.allclose(net(x, eps=e), net.head(mu + sd * e), atol=1e-6)
        assert torch.allclose(net(x, eps=e, scale=2.0), net.head(mu + 2 * sd * e), atol=1e-6)
        with net.scaled(2.0):
            assert torch.allclose(net(x, eps=e), net.head(mu + 2 * sd * e), atol=1e-6)
        assert net.sd_scale == 1.0
        with net.no_sampling():
            assert torch.equal(net(x), net.head(mu)) and torch.equal(net(x), net(x))
        assert torch.allclose(net(x, eps=torch.zeros_like(e)), net.head(mu), atol=1e-6)


def test_n_sample_inference_runs_the_encoder_once_and_the_head_on_all_draws(images):
    x, _ = images
    net = _flss_net()
    calls = {"encoder": 0, "head_rows": 0}
    net.encoder.register_forward_hook(lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1))
    net.mlp.register_forward_hook(
        lambda m, inp, out: calls.__setitem__("head_rows", calls["head_rows"] + out[..., 0].numel())
    )
    ns_logits, logits = net.sample_logits(x, 100, seed=torch.arange(16))
    assert calls["encoder"] == 1 and logits.shape == (16, 100, 4) and ns_logits.shape == (16, 4)
    assert calls["head_rows"] == 16 * 100 + 16
    calls.update(encoder=0)
    out = view_predictions(net, x, ["ns", "vote", "mean"], n_samples=100, seeds=torch.arange(16))
    assert calls["encoder"] == 1
    pred, share = out["vote"]
    assert torch.equal(share, F.one_hot(logits.argmax(-1), 4).float().mean(1).max(1).values)
    assert torch.equal(pred, net.vote_logits(x, seed=torch.arange(16)).argmax(1))


def test_vote_draws_depend_only_on_each_images_seed(images):
    x, _ = images
    net = _flss_net()
    seeds = torch.arange(100, 116)
    whole = net.vote_logits(x, seed=seeds)
    parts = torch.cat([net.vote_logits(x[:5], seed=seeds[:5]), net.vote_logits(x[5:], seed=seeds[5:])])
    assert torch.equal(whole, parts)


# --- training (Algorithm 1) --------------------------------------------------------------------
def test_attack_holds_the_draw_fixed_and_raises_that_loss(images):
    x, y = images
    net = _flss_net()
    module = _method(net)
    e = module.draw(x)
    x_adv = module.adversarial_examples(x, y, e)
    assert LpBall("linf", EPS).contains(x_adv, x, tol=1e-6).all()
    fixed = FixedDraw(net, e)
    with torch.no_grad():
        assert F.cross_entropy(fixed(x_adv), y) > F.cross_entropy(fixed(x), y)
    assert all(p.grad is None for p in net.parameters())


def test_losses_are_equations_1_and_2(images):
    x, y = images
    net = _flss_net()
    module = _method(net, kl_weights={"kl1": 0.5, "kl2": 2.0, "kl3": 3.0, "kl4": 4.0})
    e = torch.randn(16, 16)
    x_adv = (x + 0.05).clamp(0, 1)
    loss, terms, logits = module.adversarial_loss(x, x_adv, y, e)
    mu_c, s_c = net.encode(x)
    mu_a, s_a = net.encode(x_adv)
    z = net.head(mu_a + s_a * e)
    expected = (
        F.cross_entropy(z, y)
        + 0.5 * gaussian_kl(mu_c, s_c).mean()
        + 2.0 * gaussian_kl(mu_a, s_a, mu_c, s_c).mean()
        + 3.0 * softmax_kl(z, net.head(mu_a)).mean()
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and torch.allclose(logits, z, atol=1e-6)
    assert set(terms) == {"ce_adv", "kl1", "kl2", "kl3"}
    loss2, _, _ = module.clean_loss(x, y, e)
    z = net.head(mu_c + s_c * e)
    expected2 = F.cross_entropy(z, y) + 0.5 * gaussian_kl(mu_c, s_c).mean() + 4.0 * softmax_kl(z, net.head(mu_c)).mean()
    assert loss2.item() == pytest.approx(expected2.item(), rel=1e-5)
    warm = _method(net, kl_warmup={"epochs": 5, "weights": {"kl2": 0.01}})
    assert warm.current_kl_weights["kl2"] == 0.01 and warm.current_kl_weights["kl1"] == 1.0


def test_awp_perturbation_is_gamma_times_each_weight_norm_and_leaves_state_alone(images):
    x, y = images
    net = _flss_net().train()
    module = _method(net, awp={"gamma": 0.01})
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    e = torch.randn(16, 16)
    v = module.weight_perturbation(x, (x + 0.05).clamp(0, 1), y, e)
    weights = dict(net.named_parameters())
    assert v and all(weights[n].dim() > 1 for n in v)
    for name, delta in v.items():
        assert delta.norm().item() == pytest.approx(0.01 * weights[name].norm().item(), rel=1e-4)
    assert all(torch.equal(buffers[k], b) for k, b in net.named_buffers())
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ValueError, match="unknown"):
        _method(net, awp={"gamma": 0.01, "lr": 0.1})


def test_flss_refuses_a_deterministic_network():
    net = build_classifier(SmallCNN(4, width=4), [0.5] * 3, [0.25] * 3, 4)
    with pytest.raises(ValueError, match="model=flss_"):
        _method(net).setup("fit")


def test_fast_dev_run_takes_two_optimiser_steps_and_steps_the_scheduler(make_cfg):
    cfg = make_cfg(
        "method=flss",
        "model=flss_small_cnn",
        "model.backbone.width=4",
        "debug=fast_dev_run",
        "threat.steps=1",
        "method.val_attack.steps=1",
        "method.test_attack.steps=1",
        "data.batch_size=32",
        "data.eval_batch_size=32",
    )
    metrics, objs = train(cfg)
    assert {"train/loss_step", "train/kl1", "train/kl4", "val/acc", "test/acc", "test/robust_acc"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    trainer = objs["trainer"]
    assert trainer.global_step == 2  # the adversarial and the clean step of one batch
    # step_decay over one epoch decays x0.1 after it, before validation, as automatic optimisation would
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)


# --- rejection: calibration and the worst-case metrics (Section 4.4, Eqs. 3-8) --------------
def test_calibration_rejects_at_most_ten_percent_of_correct_clean_images():
    rng = np.random.default_rng(0)
    scores = np.round(rng.uniform(0, 1, 200), 2)  # ties
    correct = rng.uniform(size=200) < 0.8
    for reference, n_ref in (("test_set", 200), ("correct", int(correct.sum()))):
        t = calibrate_threshold(scores, correct, 0.10, reference)
        rejected_correct = int(((scores < t) & correct).sum())
        assert rejected_correct <= math.floor(0.1 * n_ref)
        # the threshold is the largest such: raising it to the next correct score rejects too many
        above = np.sort(scores[correct])
        above = above[above > t]
        assert ((scores < above[0]) & correct).sum() > math.floor(0.1 * n_ref)
    assert calibrate_threshold([0.9, 0.2], [False, False]) == -math.inf
    assert calibrate_threshold([0.9, 0.2], [True, True], budget=1.0) == math.inf


def test_worst_case_sets_on_hand_built_records():
    # four images, two attacks; threshold 0.5 from the clean scores (budget 0 of the test set)
    #   image 0: correct and accepted under both attacks                -> FC
    #   image 1: accepted and wrong under attack b                        -> FW
    #   image 2: rejected under attack a, correct and accepted under b    -> R only
    #   image 3: rejected under a, accepted and wrong under b             -> FW and R
    records = pd.DataFrame(
        {
            "index": range(4),
            "r_clean_vote/correct": [True, True, True, True],
            "r_clean_vote/score": [0.9, 0.5, 0.8, 0.7],
            "r_a_vote/correct": [True, True, True, False],
            "r_a_vote/score": [0.9, 0.9, 0.3, 0.2],
            "r_b_vote/correct": [True, False, True, False],
            "r_b_vote/score": [0.8, 0.6, 0.7, 0.9],
            "r_clean_ns/correct": [True, True, False, True],
            "r_a_ns/correct": [True, False, True, True],
            "r_b_ns/correct": [True, True, True, True],
        }
    )
    correct = records[["r_a_vote/correct", "r_b_vote/correct"]].to_numpy().T
    rejected = records[["r_a_vote/score", "r_b_vote/score"]].to_numpy().T < 0.5
    sets = worst_case(correct, rejected)
    assert sets == {"fc": 25.0, "fw": 50.0, "mpr": 50.0, "acc": pytest.approx(100 / 3)}
    m = rejection_metrics(records, "r", "vote", budget=0.0)
    assert m["threshold"] == 0.5 and m["clean_rejected"] == 0.0
    assert (m["fc"], m["fw"], m["mpr"]) == (25.0, 50.0, 50.0)
    assert m["acc_adv_rej"] == pytest.approx(100 / 3)
    assert m["acc_adv_0"] == 50.0  # without rejection: correct under every attack (images 0 and 2)
    assert m["acc_nat_0"] == 100.0 and m["acc_nat_rej"] == 100.0
    # the no-sampling worst case counts the clean image too (x lies in A(x)): image 1 is wrong under
    # attack a and image 2 when clean, so only images 0 and 3 are correct at every point
    assert m["acc_nat_ns"] == 75.0 and m["acc_adv_ns"] == 50.0
    table = rejection_table([TableRow("FLSS", records, "r", "vote")], budget=0.0)
    assert list(table.iloc[0, :2]) == ["FLSS", "Maj. Vote"] and table["FC"].iloc[0] == 25.0


def test_rejection_evaluation_records_and_table(images, tmp_path):
    x, y = images
    attacks = {"pgd": PGD("linf", EPS, steps=2), "pgd_cw": PGD("linf", EPS, steps=2, loss="cw")}
    net = _flss_net()
    evaluation = RejectionEvaluation("rej", attacks, views=["ns", "vote", "mean"], n_samples=20, sd_scale=2.0)
    evaluation.ns_attacks = ["pgd"]
    seeds = torch.arange(16) * 7
    fields, _ = evaluation(net, x, y, seeds)
    assert net.sd_scale == 1.0
    assert {f"{o}/score" for o in evaluation.outputs} <= set(fields)
    assert evaluation.point_sets == ["clean", "pgd", "pgd_cw", "pgd_ns"]
    assert all(((fields[f"{o}/score"] > 0) & (fields[f"{o}/score"] <= 1)).all() for o in evaluation.outputs)
    # a deterministic classifier supports confidence thresholding only
    det = build_classifier(SmallCNN(4, width=4), [0.5] * 3, [0.25] * 3, 4).eval()
    with pytest.raises(ValueError, match="views"):
        evaluation(det, x, y, seeds)
    conf = RejectionEvaluation("rej", attacks, views=["ns"])
    det_fields, _ = conf(det, x, y, seeds)
    assert torch.equal(det_fields["rej_clean_ns/pred"], det(x).argmax(1))

    run = tmp_path / "run"
    run.mkdir()
    records = pd.DataFrame({"index": range(16), **{k: v.numpy() for k, v in fields.items()}})
    records.to_csv(run / "records.csv", index=False)
    config = {"_target_": "safespot.evaluation.rejection.RejectionEvaluation", "name": "rej", "views": ["ns", "vote"]}
    config |= {"attacks": {"pgd": {}, "pgd_cw": {}}, "attack_ns": ["pgd"]}
    (run / "results.json").write_text(json.dumps({"meta": {"evaluation_config": {"rej": config}}}))
    rows = [load_row("FLSS (SD=2)", run), load_row("NS", run, "ns")]
    assert [r.view for r in rows] == ["vote", "ns"] and rows[0].attacks == ["pgd", "pgd_cw", "pgd_ns"]
    table = rejection_table(rows)
    assert [list(table.iloc[i, :2]) for i in range(2)] == [["FLSS (SD=2)", "Maj. Vote"], ["NS", "Confidence"]]


@pytest.mark.parametrize("option", ["rejection_flss", "rejection_conf"])
def test_rejection_configs_instantiate(make_cfg, option):
    cfg = make_cfg(
        "ckpt_path=x.ckpt", f"evaluation=[{option}]", "threat.norm=linf", "threat.eps=8/255", name="evaluate"
    )
    (evaluation,) = build_evaluations(cfg.evaluation)
    assert isinstance(evaluation, RejectionEvaluation) and evaluation.name == option
    assert {"pgd", "apgd_ce", "apgd_dlr", "pgd_cw"} <= set(evaluation.attacks)
    assert all(a.attack.steps == 100 for k, a in evaluation.attacks.items() if k.startswith("pgd"))


def test_rejection_evaluation_runs_in_the_engine_with_one_record_per_image(images, tmp_path):
    x, y = images
    evaluation = RejectionEvaluation("rej", {"pgd": PGD("linf", EPS, steps=2)}, views=["ns", "vote"], n_samples=10)
    module = EvaluationModule(_flss_net(), [evaluation], output_dir=tmp_path)
    cpu_trainer().test(module, DataLoader(TensorDataset(x, y, torch.arange(16)), batch_size=8), verbose=False)
    records = pd.read_csv(tmp_path / "records.csv")
    assert len(records) == 16 and {"clean/correct", "rej_pgd_vote/score", "rej_pgd/dist"} <= set(records)
    assert (
        json.loads((tmp_path / "results.json").read_text())["rej_pgd_vote/acc"]
        == records["rej_pgd_vote/correct"].mean()
    )
    assert math.isfinite(rejection_metrics(records, "rej", "vote")["fc"])


@pytest.mark.parametrize("width,features", [(64, 512), (16, 128)])
def test_preact_resnet18_width_scales_every_stage_and_the_flss_latent(make_cfg, width, features):
    """``model.backbone.width`` of PreActResNet-18 (64: the published network and paper 004's
    512-d latent); the FLSS latent defaults to the encoder's feature size."""
    from hydra.utils import instantiate

    cfg = make_cfg("experiment=cifar10_flss", f"model.backbone.width={width}", synthetic=False)
    net = instantiate(cfg.model)
    assert net.latent_dim == features and net.to_mu.in_features == features
    convs = [m.out_channels for m in net.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0] == width and max(convs) == 8 * width
    mu, sigma = net.encode(torch.rand(2, 3, 32, 32))
    assert mu.shape == sigma.shape == (2, features)
    with pytest.raises(Exception, match="width must be >= 1"):  # hydra wraps the ValueError
        instantiate(cfg.model.backbone, width=0)
