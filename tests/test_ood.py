"""Out-of-distribution detection (paper 000, Sections 3.6 and 4.4): metrics, outlier data and
the class-split protocol, Outlier Exposure and safe-spot-aware outlier training, detectors and
the ood.py entry point."""

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hydra.errors import ConfigCompositionException
from PIL import Image

from safespot.data.base import DataConfigError
from safespot.data.ood import ClassSplitOODDataModule, SyntheticOODDataModule
from safespot.data.outliers import NoiseImages, NumpyImages
from safespot.defenses import RobustifyResult, SafeSpotSearch
from safespot.errors import ConfigError
from safespot.methods import OutlierExposure, SafeSpotOE
from safespot.methods.ood import kl_from_uniform, uniform_cross_entropy
from safespot.ood import MSP, Mahalanobis, SafeSpotScore, fpr_at_tpr, mean_std, ood_metrics
from safespot.ood.detectors import DetectorError, resolve_layers, stage_modules
from safespot.ood.evaluate import build_detectors, evaluate_ood
from safespot.ood.metrics import labelled, threshold_at_tpr
from safespot.train import train
from safespot.utils.checkpoint import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny forward passes: one thread is fastest


SMALL_DATA = [
    "data.n_train=128",
    "data.n_test=32",
    "data.val_size=32",
    "data.n_outliers=96",
    "data.val_outlier_size=32",
]
SMALL_DATA += ["data.n_test_outliers=32", "data.test_outliers.gaussian.n=32", "data.test_outliers.uniform.n=32"]


# --- metrics --------------------------------------------------------------------------------
def test_metrics_match_a_hand_computed_example_with_ties():
    # outliers positive, higher = more anomalous. Outliers: 0.9, 0.7, 0.5, 0.5 (tie with an inlier), 0.1
    inliers, outliers = [0.8, 0.5, 0.3, 0.2, 0.0], [0.9, 0.7, 0.5, 0.5, 0.1]
    m = ood_metrics(inliers, outliers)
    # AUROC: pairs (out > in) + 0.5 ties over 25 pairs: 0.9 beats 5, 0.7 beats 4, each 0.5 beats 3 and ties 1,
    # 0.1 beats 1 -> (5 + 4 + 3.5 + 3.5 + 1) / 25
    assert m["auroc"] == pytest.approx(17 / 25)
    # TPR >= 0.95 needs all 5 outliers: threshold 0.1 flags the inliers 0.8, 0.5, 0.3, 0.2 -> FPR 4/5
    assert m["fpr95"] == pytest.approx(0.8)
    # average precision (outliers positive), thresholds 0.9 | 0.8 | 0.7 | 0.5 (3 items) | ... | 0.1:
    # recall steps 0.2 at P=1, 0.2 at P=2/3, 0.4 at P=4/6, 0.2 at P=5/9
    assert m["aupr"] == pytest.approx(0.2 * 1 + 0.2 * 2 / 3 + 0.4 * 4 / 6 + 0.2 * 5 / 9, rel=1e-6)
    # FPR at 60% TPR: the tied pair moves together, so 0.5 is the first threshold reaching it (FPR 2/5)
    scores, targets = labelled(inliers, outliers)
    assert fpr_at_tpr(scores, targets, 0.6) == pytest.approx(0.4)
    assert fpr_at_tpr(scores, targets, 0.4) == pytest.approx(0.2)


def test_fpr95_is_read_at_95_percent_tpr_with_outliers_positive_and_ties_moving_together():
    """20 outliers (positive, higher = more anomalous), 10 in-distribution images. By hand:
    score >= 9 flags 18 outliers (TPR 0.90) and the inlier 9.5 (FPR 0.1); score >= 5 flags the
    19th outlier (TPR 0.95) and, tied with it, the inliers 5 and 5 (FPR 0.3); score >= 2 flags
    all 20 (TPR 1, needed for any level above 0.95) and 7 inliers (FPR 0.7). FPR95 is 0.3: not
    the FPR at 90% (0.1) or 96% (0.7), and not 0.1 as it would be if the tied outlier were
    counted before the tied inliers."""
    inliers = [9.5, 5.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.0, 0.5, 0.0]
    outliers = [float(s) for s in range(10, 27)] + [9.0, 5.0, 2.0]
    scores, targets = labelled(inliers, outliers)
    levels = {0.90: 0.1, 0.95: 0.3, 0.96: 0.7, 1.0: 0.7, 0.85: 0.0}
    assert {level: fpr_at_tpr(scores, targets, level) for level in levels} == pytest.approx(levels)
    m = ood_metrics(inliers, outliers)
    assert m["fpr95"] == pytest.approx(0.3)
    # AUROC: 17 outliers beat all 10 inliers, 9 beats 9, 5 beats 7 and ties 2, 2 beats 3 and ties 1
    assert m["auroc"] == pytest.approx((170 + 9 + 7 + 1 + 3 + 0.5) / 200)
    # AUPR-Out (average precision): recall 17/20 at precision 1, then one outlier each at 18/19,
    # 19/22 (the two tied inliers flagged with it) and 20/27
    assert m["aupr"] == pytest.approx(17 / 20 + (18 / 19 + 19 / 22 + 20 / 27) / 20, rel=1e-6)
    # the operating point's score threshold (flag score >= t): the 19th highest outlier score
    assert threshold_at_tpr(inliers, outliers) == 5.0
    assert threshold_at_tpr(inliers, outliers, 0.90) == 9.0 and threshold_at_tpr(inliers, outliers, 0.96) == 2.0
    # the positive class is the outliers': swapping the roles gives another number
    assert ood_metrics(outliers, inliers)["fpr95"] == pytest.approx(1.0)


def test_a_detector_that_outputs_the_label_is_perfect_and_its_negation_worst():
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(200, generator=g) < 0.3).long()
    perfect = ood_metrics(labels[labels == 0].float(), labels[labels == 1].float())
    assert perfect == {"fpr95": 0.0, "auroc": 1.0, "aupr": 1.0}
    worst = ood_metrics(-labels[labels == 0].float(), -labels[labels == 1].float())
    assert worst["auroc"] == 0.0 and worst["fpr95"] == 1.0


def test_scores_outside_unit_interval_are_not_squashed():
    # large scores would all saturate a sigmoid; ranks keep them apart
    m = ood_metrics([1e4, 2e4, 3e4], [2.5e4, 4e4, 5e4])
    assert m["auroc"] == pytest.approx(8 / 9)


def test_mean_std_over_runs():
    summary = mean_std([{"auroc": 90.0, "fpr95": 10.0}, {"auroc": 94.0, "fpr95": 20.0}])
    assert summary["auroc"] == {"mean": 92.0, "std": pytest.approx(math.sqrt(8)), "n": 2}
    assert mean_std([{"auroc": 1.0}])["auroc"]["std"] == 0.0


# --- losses ---------------------------------------------------------------------------------
def test_outlier_exposure_loss_is_log_k_at_the_uniform_prediction_and_larger_elsewhere():
    k = 6
    uniform = torch.zeros(3, k) + torch.tensor([[0.0], [5.0], [-2.0]])  # equal logits, any offset
    assert torch.allclose(uniform_cross_entropy(uniform), torch.full((3,), math.log(k)))
    assert torch.allclose(kl_from_uniform(uniform), torch.zeros(3), atol=1e-6)
    logits = torch.randn(100, k, generator=torch.Generator().manual_seed(0)) * 3
    assert (uniform_cross_entropy(logits) > math.log(k)).all()
    expected = -F.log_softmax(logits, 1).mean(1)  # mean over classes of -log softmax (Hendrycks et al.)
    assert torch.allclose(uniform_cross_entropy(logits), expected, atol=1e-5)
    assert torch.allclose(kl_from_uniform(logits), expected - math.log(k), atol=1e-5)


def _threat():
    return {"norm": "linf", "eps": 0.1, "step_size": 0.025, "steps": 2}


def test_outlier_losses_combine_their_terms(tiny_net, images):
    x, y = images
    x_out = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    opt = partial(torch.optim.SGD, lr=0.1)
    oe = OutlierExposure(net=tiny_net, optimizer=opt, threat=_threat(), oe_weight=0.5)
    loss, logits, terms = oe.outlier_training_loss(x, y, x_out)
    assert loss.item() == pytest.approx(terms["in_loss"].item() + 0.5 * terms["oe_loss"].item(), rel=1e-5)
    assert terms["oe_loss"].item() >= math.log(4) - 1e-5 and logits.shape == (len(x), 4)
    ss = SafeSpotOE(net=tiny_net, optimizer=opt, threat=_threat(), gamma=0.5, lam=0.25, outlier_ce_cap="log_k")
    assert ss.outlier_ce_cap == pytest.approx(math.log(4)) and ss.hparams["outlier_ce_cap"] == "log_k"
    loss, _, terms = ss.outlier_training_loss(x, y, x_out)
    combined = terms["in_loss"] + 0.5 * terms["kl_uniform"] - 0.25 * terms["outlier_safe_spot_ce"]
    assert loss.item() == pytest.approx(combined.item(), rel=1e-5)
    assert terms["outlier_safe_spot_ce"].item() <= math.log(4) + 1e-6 and terms["kl_uniform"].item() >= -1e-6
    with pytest.raises(ValueError, match="trains on outliers"):
        ss.training_step((x, y, torch.arange(len(x))), 0)


# --- data -----------------------------------------------------------------------------------
@pytest.fixture
def folder_tree(tmp_path):
    """An ImageFolder tree with 10 classes c0..c9, two 8x8 images per class and split, each
    image's red value encoding (split, class, number)."""
    for s, split in enumerate(("train", "test")):
        for c in range(10):
            d = tmp_path / "tree" / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (100 * s + 10 * c + i, 0, 0)).save(d / f"{i}.png")
    return tmp_path / "tree"


def _red(image: torch.Tensor) -> int:
    return round(float(image[0, 0, 0]) * 255)


def test_class_split_keeps_in_training_and_test_outlier_classes_disjoint(folder_tree):
    dm = ClassSplitOODDataModule(
        str(folder_tree), image_size=8, val_size=2, val_outlier_size=1, batch_size=4, num_workers=0, augment=False
    )
    dm.setup()
    assert dm.num_classes == 6
    train_in = {(_red(dm.dataset("train")[i][0]) // 10, dm.dataset("train")[i][1]) for i in range(10)}
    assert all(c == label and c < 6 for c, label in train_in)  # relabelled 0..5 in order
    train_out = {_red(x) for x, label, _ in [*dm.outlier_split("train"), *dm.outlier_split("val")] if label == -1}
    assert {v // 10 for v in train_out} == {6, 7} and all(v < 100 for v in train_out)  # from train/
    (name, held_out), *rest = dm.test_outlier_sets().items()
    assert name == "held_out" and not rest
    assert {_red(x) // 10 - 10 for x, _, _ in held_out} == {8, 9}  # from test/
    assert len(dm.outlier_split("train")) == 3 and len(dm.outlier_split("val")) == 1


@pytest.mark.parametrize(
    "split,match",
    [
        ({"train_outlier_classes": [6, 7], "test_outlier_classes": [7, 8]}, "train_outlier_classes and data.test"),
        ({"in_classes": [0, 1, 6]}, r"share classes 6 \(c6\)"),
        ({"in_classes": ["c0", "c1"], "test_outlier_classes": ["c1"]}, "in_classes and data.test_outlier_classes"),
        ({"in_classes": [0, 0, 1]}, "lists a class twice"),
        ({"train_outlier_classes": [10]}, "out of range"),
        ({"test_outlier_classes": ["dog"]}, "no class folder 'dog'"),
    ],
)
def test_class_split_refuses_overlaps_and_unknown_classes(folder_tree, split, match):
    with pytest.raises(DataConfigError, match=match):
        ClassSplitOODDataModule(str(folder_tree), **split)


def test_noise_and_npy_outliers(tmp_path):
    g = NoiseImages("gaussian", 4, 3, 8, seed=1)
    assert torch.equal(g[2][0], NoiseImages("gaussian", 4, 3, 8, seed=1)[2][0]) and g[2][1] == -1
    assert not torch.equal(g[2][0], g[3][0]) and g[0][0].min() >= 0 and g[0][0].max() <= 1
    u = NoiseImages("uniform", 2, 3, 8, seed=1)[0][0]
    assert 0.4 < u.mean() < 0.6 and u.min() >= 0
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", hwc)
    image, label = NumpyImages(tmp_path / "a.npy")[1]
    assert label == -1 and torch.allclose(image, torch.from_numpy(hwc[1]).permute(2, 0, 1).float() / 255)
    np.save(tmp_path / "b.npy", rng.random((2, 3, 8, 8)).astype(np.float32))
    assert NumpyImages(tmp_path / "b.npy", image_size=4)[0][0].shape == (3, 4, 4)
    np.save(tmp_path / "c.npy", rng.random((2, 3, 8, 8)).astype(np.float32) * 2)
    with pytest.raises(DataConfigError, match=r"must lie in \[0, 1\]"):
        NumpyImages(tmp_path / "c.npy")


def test_paired_batches_have_twice_as_many_outliers():
    dm = SyntheticOODDataModule(n_train=96, n_test=16, val_size=16, n_outliers=40, val_outlier_size=8, batch_size=16)
    dm.setup()
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == math.ceil(80 / 16)
    first = batches[0][0] if isinstance(batches[0], tuple) else batches[0]
    assert first["in"][0].shape[0] == 16 and first["out"][0].shape[0] == 32 and (first["out"][1] == -1).all()
    val = list(dm.val_dataloader())
    assert any((b[0] if isinstance(b, tuple) else b)["out"] is not None for b in val)


# --- detectors ------------------------------------------------------------------------------
class SpyRobustifier:
    """Returns a fixed modification of x as x_r and records its calls."""

    protect = "prediction"

    def __init__(self):
        self.calls = []

    def __call__(self, model, x, y=None, seeds=None):
        self.calls.append(seeds)
        with torch.no_grad():
            labels = model(x).argmax(1)
        x_r = (1 - x).detach()
        zeros = torch.zeros(len(x))
        return RobustifyResult(x_r, labels, zeros, zeros.bool(), zeros.long(), zeros.bool(), zeros + 0.5)


class SpyAttack:
    targeted = False

    def __init__(self):
        self.inputs = []

    def __call__(self, model, x, y, seeds=None):
        self.inputs.append((x.clone(), y.clone()))
        return (x * 0.5).detach()


def test_safe_spot_score_is_computed_from_the_robustifiers_output(tiny_net, images):
    x, _ = images
    robustifier, attack = SpyRobustifier(), SpyAttack()
    detector = SafeSpotScore(robustifier, attack, mu=0.25)
    seeds = torch.arange(len(x)) + 100
    parts = detector.parts(tiny_net, x, seeds)
    x_r, labels = attack.inputs[0]
    assert torch.equal(x_r, 1 - x) and torch.equal(robustifier.calls[0], seeds)  # the attack starts at x_s*
    with torch.no_grad():
        assert torch.equal(labels, tiny_net(x).argmax(1))  # ... and attacks the protected c(x_o)
        msp = F.softmax(tiny_net(x), 1).amax(1)
        msp_adv = F.softmax(tiny_net((1 - x) * 0.5), 1).amax(1)
    assert torch.allclose(parts["msp"], msp) and torch.allclose(parts["msp_adv"], msp_adv)
    assert torch.allclose(parts["score"], -(0.25 * msp + 0.75 * msp_adv))
    assert torch.equal(parts["dist"], torch.full((len(x),), 0.5))


def test_safe_spot_score_with_the_search_tunes_mu_on_training_outliers(tiny_net, images):
    x = images[0][:8]
    search = SafeSpotSearch("linf", 0.05, max_iter=2, inner_steps=2)
    from safespot.attacks import PGD

    detector = SafeSpotScore(search, PGD("linf", 0.05, steps=2, mode="eval"), mu_grid=[0.0, 0.5, 1.0])
    assert detector.requires_tuning
    half = len(x) // 2

    def tune(part):
        return lambda: [(part, None, torch.arange(len(part)))]

    info = detector.fit(tiny_net, tune(x), tune(x[:half]), tune(torch.rand_like(x[half:])))
    assert info["tuned"] and detector.mu in (0.0, 0.5, 1.0)
    parts = detector.parts(tiny_net, x, torch.arange(len(x)))
    assert (parts["dist"] <= 0.05 + 1e-6).all() and torch.isfinite(parts["score"]).all()
    with pytest.raises(ValueError, match="protect must be 'prediction'"):
        SafeSpotScore(SafeSpotSearch("linf", 0.05, protect="label"), SpyAttack())


def test_mahalanobis_fits_class_means_and_tied_covariance():
    class Identity(torch.nn.Module):
        num_classes = 2

        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.head(x.flatten(1))

    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    feats = torch.randn(40, 2, generator=g) * torch.tensor([1.0, 2.0]) + y[:, None] * 3.0
    model = Identity().eval()
    detector = Mahalanobis(layers=["penultimate"], noise=[0.0])
    detector.prepare(model)
    assert not detector.requires_tuning
    detector.fit(model, lambda: [(feats[:25], y[:25], None), (feats[25:], y[25:], None)], lambda: [], None)
    means = torch.stack([feats[y == c].mean(0) for c in (0, 1)]).double()
    centered = feats.double() - means[y]
    assert torch.allclose(detector.means[0], means, atol=1e-6)
    assert torch.allclose(detector.precisions[0], torch.linalg.inv(centered.T @ centered / 40), atol=1e-6)
    scores = detector.score(model, torch.tensor([[0.0, 0.0], [30.0, 30.0]]))
    assert scores[1] > scores[0] > -1e-9  # far from both classes = more anomalous; score = min distance >= 0
    assert MSP().score(model, feats).shape == (40,)


STAGES = {  # the `stages` layers of every conf/model config (input size in brackets)
    "small_cnn": (32, ["backbone.features.0", "backbone.features.1", "backbone.features.2"]),
    "flss_small_cnn": (32, ["encoder.features.0", "encoder.features.1", "encoder.features.2"]),
    "preact_resnet18": (32, [f"backbone.features.{i}" for i in (2, 4, 6, 10)]),
    "flss_preact_resnet18": (32, [f"encoder.features.{i}" for i in (2, 4, 6, 10)]),
    "wrn28_10": (32, [f"backbone.features.{i}" for i in (0, 4, 8, 14)]),
    "wrn34_10": (32, [f"backbone.features.{i}" for i in (0, 5, 10, 17)]),
    "resnet20": (32, [f"backbone.features.{i}" for i in (5, 8, 11)]),
    "resnet50": (64, ["backbone.relu", "backbone.maxpool", *(f"backbone.layer{i}" for i in range(1, 5))]),
}


def test_stages_are_the_stage_outputs_of_every_model_config():
    """`stages` (the default Mahalanobis layers) gives Lee et al.'s per-stage feature maps on every
    model config, and the channel means of the last stage are the penultimate features."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from safespot.paths import CONFIG_DIR

    data = {"num_classes": 10, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    configs = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml") if p.stem != "robustbench")
    assert configs == sorted(STAGES)  # a new model config needs its row here (zoo models: tests/test_zoo.py)
    for name in configs:
        size, expected = STAGES[name]
        torch.manual_seed(0)
        model_cfg = OmegaConf.merge({"data": data}, {"model": OmegaConf.load(CONFIG_DIR / "model" / f"{name}.yaml")})
        net = instantiate(model_cfg.model).eval()
        x = torch.rand(2, 3, size, size)
        assert stage_modules(net, x) == expected, name
        if name in ("small_cnn", "preact_resnet18"):
            detector = Mahalanobis(layers=["stages", "penultimate"], noise=[0.0])
            detector._layers = resolve_layers(net, detector.layers, probe=x)
            features = detector._features(net, x)
            assert len(features) == len(expected) + 1
            assert torch.allclose(features[-2], features[-1], atol=1e-5)  # last stage, pooled = penultimate


THREAT = ["threat.norm=linf", "threat.eps=0.03"]  # the checkpoint's, normally (the safe-spot score needs it)


def test_default_mahalanobis_is_the_multi_layer_ensemble_and_penultimate_composes(make_cfg):
    default = {d.name: d for d, _ in build_detectors(make_cfg("ckpt_path=x.ckpt", *THREAT, name="ood").detector)}
    assert isinstance(default["mahalanobis"], Mahalanobis) and default["mahalanobis"].layers == ["stages"]
    assert "mahalanobis_penultimate" not in default
    cfg = make_cfg("ckpt_path=x.ckpt", "detector=[mahalanobis,mahalanobis_penultimate]", *THREAT, name="ood")
    both = {d.name: d for d, _ in build_detectors(cfg.detector)}
    assert both["mahalanobis"].layers == ["stages"] and both["mahalanobis_penultimate"].layers == ["penultimate"]
    assert both["mahalanobis"].noise_grid == both["mahalanobis_penultimate"].noise_grid
    one_noise = Mahalanobis(layers=["stages"], noise=[0.0])
    assert one_noise.requires_tuning  # several layers until fit resolves them: the ensemble weights
    assert not Mahalanobis(layers=["penultimate"], noise=[0.0]).requires_tuning


def test_mahalanobis_ensemble_over_the_stages_of_a_tiny_cnn():
    """The default detector fits one Gaussian model per stage, tunes the noise and the logistic
    ensemble weights on D_out^train and scores images (Lee et al., Algorithm 1)."""
    from safespot.models import SmallCNN, build_classifier

    torch.manual_seed(0)
    net = build_classifier(SmallCNN(3, width=4), [0.5] * 3, [0.25] * 3, 3).eval()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(96) % 3
    x = (0.5 + 0.15 * torch.randn(96, 3, 16, 16, generator=g) + 0.1 * y[:, None, None, None]).clamp(0, 1)
    noise = torch.rand(32, 3, 16, 16, generator=g)
    seeds = torch.arange(32)

    def batches(images, labels):
        return lambda: [(images[i : i + 32], labels[i : i + 32], seeds[: len(images[i : i + 32])])
                        for i in range(0, len(images), 32)]  # fmt: skip

    detector = Mahalanobis(noise=[0.0, 0.01])
    assert detector.layers == ["stages"]
    detector.prepare(net)
    assert detector.requires_tuning
    tuned = detector.fit(net, batches(x[:64], y[:64]), batches(x[64:], y[64:]), batches(noise, torch.zeros(32).long()))
    assert tuned["resolved_layers"] == ["backbone.features.0", "backbone.features.1", "backbone.features.2"]
    assert len(tuned["weights"]) == 3 and tuned["noise"] in (0.0, 0.01) and len(detector.means) == 3
    scores = detector.score(net, torch.cat([x[64:], noise]))
    assert scores.shape == (64,) and torch.isfinite(scores).all()
    # the ensemble's sign: tuned against noise (labels: in-distribution 1), noise scores as anomalous
    assert (scores[32:, None] > scores[None, :32]).float().mean() > 0.9
    with pytest.raises(DetectorError, match="stages"):
        resolve_layers(net, ["stages"])  # needs a forward pass: only the Mahalanobis fit makes one
    with pytest.raises(DetectorError, match="stages"):
        Mahalanobis(layers=["stages"]).prepare(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2)))


# --- training and the entry point ---------------------------------------------------------
@pytest.mark.parametrize("method", ["outlier_exposure", "safe_spot_oe", "natural"])
def test_fast_dev_run_each_outlier_method(make_cfg, method):
    """Both outlier methods train on paired batches; any other method on the same data sees
    the in-distribution batches alone (a baseline for Mahalanobis and Gram)."""
    extra = ["method.val_attack.steps=1", "method.test_attack=null"] if method == "safe_spot_oe" else []
    small_batches = ["data.batch_size=16", "data.eval_batch_size=32"]
    cfg = make_cfg("data=synthetic_ood", f"method={method}", "debug=fast_dev_run", "threat.steps=1", *SMALL_DATA,
                   *small_batches, *extra)  # fmt: skip
    metrics, objs = train(cfg)
    expected = {"train/loss_step", "val/acc", "test/acc"} | ({"val/auroc"} if method != "natural" else set())
    assert expected <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    assert objs["trainer"].global_step == 1


@pytest.fixture(scope="module")
def oe_checkpoint(tmp_path_factory) -> Path:
    from conftest import SYNTHETIC, compose_config

    out = tmp_path_factory.mktemp("oe")
    overrides = [*SYNTHETIC, "data=synthetic_ood", "method=outlier_exposure", "trainer.max_epochs=1", "test=false"]
    cfg = compose_config("train", [*overrides, *SMALL_DATA, "tags=[synthetic_oe,ood]"], out)
    _, objs = train(cfg)
    return Path(objs["trainer"].checkpoint_callback.last_model_path)


FAST_OOD = [
    "detector.safe_spot.robustifier.max_iter=2",
    "detector.safe_spot.robustifier.inner_steps=2",
    "detector.safe_spot.attack.steps=2",
    "detector.mahalanobis.noise=[0.0,0.01]",
    "detector.gram.powers=2",
    "fit_subset=64",
    "tune_subset=16",
    "outlier_subset=8",
    "data.test_subset=16",
    "histograms=true",
]


def test_ood_entry_point_writes_scores_table_and_histograms(make_cfg, oe_checkpoint, tmp_path):
    out = tmp_path / "ood"
    detectors = ["msp", "energy", "mahalanobis", "mahalanobis_penultimate", "gram", "safe_spot", "oe"]
    cfg = make_cfg(f"ckpt_path={oe_checkpoint}", *FAST_OOD, f"detector=[{','.join(detectors)}]",
                   "detector.mahalanobis_penultimate.noise=[0.0]", name="ood", out=out)  # fmt: skip
    results = evaluate_ood(cfg)
    scores = pd.read_csv(out / "scores.csv")
    assert scores["set"].value_counts().to_dict() == {"in_distribution": 16, "held_out": 8, "gaussian": 8, "uniform": 8}
    assert set(detectors) <= set(scores.columns) and "safe_spot/msp_adv" in scores.columns
    assert np.allclose(scores["msp"], scores["oe"])  # both MSP of the same (OE-trained) model
    table = (out / "table.md").read_text()
    assert "| held_out |" in table and "| Average |" in table and "FPR95 ↓ safe_spot" in table
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["metrics"]) == set(detectors) and saved["tuned"]["safe_spot"]["mu"] in [i / 10 for i in range(11)]
    assert saved["tuned"]["mahalanobis"]["noise"] in (0.0, 0.01) and saved["method"] == "OutlierExposure"
    assert saved["train_run"] == "synthetic_oe"  # the training preset (first tag), as evaluate.py records it
    # the default: Lee et al.'s ensemble over the small CNN's three conv blocks (`stages`)
    stages = ["backbone.features.0", "backbone.features.1", "backbone.features.2"]
    assert saved["tuned"]["mahalanobis"]["resolved_layers"] == stages
    assert len(saved["tuned"]["mahalanobis"]["weights"]) == 3
    assert saved["tuned"]["mahalanobis_penultimate"]["resolved_layers"] == ["penultimate"]
    for det in detectors:
        avg = saved["metrics"][det]["Average"]
        assert 0 <= avg["auroc"] <= 100 and (out / "histograms" / f"{det}.png").is_file()
    assert (out / "figure3.png").is_file() and results["metrics"]["msp"] == saved["metrics"]["msp"]


def test_ood_entry_point_refuses_bad_settings_before_work(make_cfg, oe_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"ckpt_path is required: python ood\.py ckpt_path=PATH"):
        evaluate_ood(make_cfg(name="ood"))
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate_ood(make_cfg(f"ckpt_path={tmp_path / 'missing.ckpt'}", name="ood"))
    missing_root = f"+outliers.lsun={{kind: folder, root: {tmp_path / 'LSUN'}}}"
    with pytest.raises(DataConfigError, match=r"outliers.lsun.root=.*does not exist"):
        evaluate_ood(make_cfg(f"ckpt_path={oe_checkpoint}", missing_root, name="ood"))
    with pytest.raises(ConfigCompositionException, match="detector/nonsense"):
        make_cfg(f"ckpt_path={oe_checkpoint}", "detector=[msp,nonsense]", name="ood")
    with pytest.raises(ConfigError, match=r"unknown layer 'head\.nope'"):
        evaluate_ood(make_cfg(f"ckpt_path={oe_checkpoint}", "detector=[mahalanobis]",
                              "detector.mahalanobis.layers=[head.nope]", "fit_subset=8", name="ood"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"detector\.safe_spot: delta=8 is above 1 for norm linf"):
        evaluate_ood(make_cfg(f"ckpt_path={oe_checkpoint}", "detector=[safe_spot]",
                              "detector.safe_spot.robustifier.delta=8", name="ood"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"threat\.eps=8 is above 1 for norm linf"):
        evaluate_ood(make_cfg(f"ckpt_path={oe_checkpoint}", "threat.eps=8", name="ood"))
    with pytest.raises(ConfigError, match="the held_out set has 1 images, fewer than the 2 processes"):
        evaluate_ood(make_cfg(f"ckpt_path={oe_checkpoint}", "trainer=ddp_sim", "detector=[msp]", "outlier_subset=1",
                              name="ood", out=tmp_path / "two"))  # fmt: skip
    assert not (tmp_path / "two").exists()


def test_ood_entry_point_on_two_processes_writes_the_scores_of_one(make_cfg, oe_checkpoint, tmp_path):
    """The fitting batches, tuning images and test images split over two ddp_spawn processes
    (trainer=ddp_sim; 8 fitting batches, 4 per process) give every output file of one process
    (trainer=cpu): scores.csv, the tables, the histograms and figure3.png byte for byte,
    results.json equal but for its runtime."""
    common = [f"ckpt_path={oe_checkpoint}", *FAST_OOD, "batch_size=8"]
    one = evaluate_ood(make_cfg(*common, "trainer=cpu", name="ood", out=tmp_path / "one"))
    two = evaluate_ood(make_cfg(*common, "trainer=ddp_sim", name="ood", out=tmp_path / "two"))
    assert (one["runtime"]["world_size"], two["runtime"]["world_size"]) == (1, 2)
    scores = (tmp_path / "one" / "scores.csv").read_bytes()
    assert (tmp_path / "two" / "scores.csv").read_bytes() == scores
    assert pd.read_csv(tmp_path / "two" / "scores.csv")["set"].value_counts().to_dict() == {
        "in_distribution": 16, "held_out": 8, "gaussian": 8, "uniform": 8
    }  # fmt: skip
    assert two["metrics"] == one["metrics"] and two["tuned"] == one["tuned"]
    assert (tmp_path / "two" / "table.md").read_text() == (tmp_path / "one" / "table.md").read_text()
    files = {}
    for run in ("one", "two"):
        root = tmp_path / run
        found = (p for p in root.rglob("*") if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log")
        files[run] = {str(p.relative_to(root)): p for p in found}
    assert sorted(files["one"]) == sorted(files["two"]) and "figure3.png" in files["one"]
    assert sum(name.startswith("histograms/") for name in files["one"]) >= 4
    for name, path in files["one"].items():
        if name == "results.json":
            a, b = (json.loads(f.read_text()) for f in (path, files["two"][name]))
            assert {k: v for k, v in a.items() if k != "runtime"} == {k: v for k, v in b.items() if k != "runtime"}
        else:
            assert path.read_bytes() == files["two"][name].read_bytes(), name


def test_ood_runs_on_the_trainer_group(make_cfg):
    """ood.py selects its processes as train.py / evaluate.py do (``trainer=...``); the Fabric
    runtime block and its aliases are gone."""
    cfg = make_cfg("ckpt_path=x.ckpt", name="ood")
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer" and not cfg.trainer.inference_mode
    assert "runtime" not in cfg and "device" not in cfg and "precision" not in cfg
    sim = make_cfg("ckpt_path=x.ckpt", "trainer=ddp_sim", name="ood")
    assert (sim.trainer.accelerator, sim.trainer.devices, sim.trainer.strategy) == ("cpu", 2, "ddp_spawn")
    assert "progress_bar" in make_cfg("ckpt_path=x.ckpt", name="ood").callbacks


def test_whole_batches_go_to_one_process_each_as_one_process_batches_them():
    """WholeBatchSampler: 70 images in batches of 4 (18 batches, the last short), 8 slices. For 1 to
    9 processes every position is dealt once, batch b goes to process (b mod 8) mod N, and each
    process's loader yields exactly the one-process batches it was dealt, in batch order."""
    from torch.utils.data import DataLoader

    from safespot.data.samplers import WholeBatchSampler

    n, size, slices = 70, 4, 8
    batches = [list(range(b, min(b + size, n))) for b in range(0, n, size)]
    for world in range(1, 10):
        dealt = []
        for rank in range(world):
            sampler = WholeBatchSampler(n, size, slices, world, rank)
            loaded = [b.tolist() for b in DataLoader(range(n), batch_size=size, sampler=sampler)]
            mine = [b for i, b in enumerate(batches) if (i % slices) % world == rank]
            assert loaded == mine and len(sampler) == sum(map(len, mine)), (world, rank)
            dealt += [p for b in loaded for p in b]
        assert sorted(dealt) == list(range(n))
    assert len(WholeBatchSampler(n, size, slices, 9, 8)) == 0  # slices 0..7 only: process 8 idles


def _reduce_like_ddp(metrics):
    """What the DDP reduction of torchmetrics does with the states of ``metrics`` (one per process):
    each state stacked over the processes and reduced by its ``dist_reduce_fx``, into the first."""
    first = metrics[0]
    for name, reduce in first._reductions.items():
        setattr(first, name, reduce(torch.stack([getattr(m, name) for m in metrics])))
    return first


@pytest.mark.parametrize("world", [2, 3])
def test_fitting_statistics_reduced_over_processes_equal_one_process_bit_for_bit(world):
    """Mahalanobis' class moments (float sums) and Gram's class ranges (min/max) accumulated by
    `world` processes, each on the whole batches WholeBatchSampler deals it, and reduced as DDP
    reduces torchmetrics states, give one process's fitted detector bit for bit: 18 fitting batches
    over 8 slices, so a slice adds several batches."""
    import copy

    from torch.utils.data import DataLoader

    from safespot.data.samplers import WholeBatchSampler
    from safespot.models import SmallCNN, build_classifier
    from safespot.ood import GramDetector
    from safespot.ood.detectors import FIT_SLICES

    torch.manual_seed(0)
    net = build_classifier(SmallCNN(3, width=4), [0.5] * 3, [0.25] * 3, 3).eval()
    g = torch.Generator().manual_seed(1)
    n, size = 70, 4
    y = torch.arange(n) % 3
    x = (0.5 + 0.15 * torch.randn(n, 3, 16, 16, generator=g) + 0.1 * y[:, None, None, None]).clamp(0, 1)

    def fitted(kind, positions):
        detector = Mahalanobis(layers=["stages", "penultimate"], noise=[0.0]) if kind == "m" else GramDetector(powers=3)
        model = copy.deepcopy(net)  # each process its own model (the detectors hook into it)
        detector.prepare(model, probe=x[:1])
        for rows in DataLoader(positions, batch_size=size):
            detector.accumulate(model, x[rows], y[rows], int(rows[0]) // size)
        return detector, model

    def state(d):
        return [*d.means, *d.precisions] if isinstance(d, Mahalanobis) else [*d.mins, *d.maxs]

    for kind in ("m", "g"):
        one, model = fitted(kind, list(range(n)))
        one.finish_fit(model)
        parts = [fitted(kind, list(WholeBatchSampler(n, size, FIT_SLICES, world, r))) for r in range(world)]
        _reduce_like_ddp([d.statistics for d, _ in parts])
        merged, model = parts[0]
        merged.finish_fit(model)
        assert all(torch.equal(a, b) for a, b in zip(state(merged), state(one), strict=True)), kind


def test_merged_rows_are_in_set_order_and_cover_the_set_once():
    """The tuning values and scores of every process come back in set order; a share that repeats
    or misses a position (a padding sampler) is refused."""
    from safespot.ood.data import SCORE, Loader
    from safespot.ood.module import merge_rows

    def rows(positions):
        p = torch.tensor(positions)
        return [{"_position": p, "value": 10 * p}]

    loader = Loader(SCORE, "noise", 5)
    merged = merge_rows([rows([0, 2, 4]), rows([1, 3])], loader)
    assert merged["value"].tolist() == [0, 10, 20, 30, 40] and "_position" not in merged
    with pytest.raises(RuntimeError, match="noise set do not cover it exactly once"):
        merge_rows([rows([0, 2, 4]), rows([1, 3, 0])], loader)  # position 0 padded onto process 1
