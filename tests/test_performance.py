"""Speed options: channels-last and compiled networks compute the same function;
float16 refused for evaluation, robustification and OOD scoring (attacks' input gradients are not
loss-scaled), bf16 accepted."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import SYNTHETIC, TinyNet, compose_config
from safespot.errors import ConfigError
from safespot.evaluate import evaluate
from safespot.ood.evaluate import evaluate_ood
from safespot.robustify_files import robustify_files
from safespot.train import train
from safespot.utils.checkpoint import CheckpointError
from safespot.utils.performance import prepare_net, refuse_float16


def test_channels_last_network_computes_the_same_outputs_and_input_gradients():
    torch.manual_seed(0)
    net, x = TinyNet().eval(), torch.rand(4, 3, 8, 8, requires_grad=True)
    (g_ref,) = torch.autograd.grad(net(x).sum(), x)
    ref = net(x).detach()
    prepare_net(net, OmegaConf.create({"channels_last": True, "compile": False}))
    assert net.body[0].weight.is_contiguous(memory_format=torch.channels_last)
    (g,) = torch.autograd.grad(net(x).sum(), x)
    assert torch.allclose(net(x), ref, atol=1e-5) and torch.allclose(g, g_ref, atol=1e-5)


def test_an_unknown_compile_mode_is_refused_before_compiling():
    net = TinyNet()
    with pytest.raises(ConfigError, match=r"perf\.compile_mode"):
        prepare_net(net, OmegaConf.create({"compile": True, "compile_mode": "fastest"}))


@pytest.mark.slow
def test_compiled_network_keeps_its_parameter_names_and_outputs():
    torch.manual_seed(0)
    net, x = TinyNet().eval(), torch.rand(4, 3, 8, 8)
    ref, names = net(x).detach(), list(net.state_dict())
    prepare_net(net, OmegaConf.create({"compile": True}))
    assert list(net.state_dict()) == names  # checkpoints written from it load anywhere
    assert torch.allclose(net(x), ref, atol=1e-5)


# --- precision: float16 is refused wherever attacks run outside a loss-scaled backward pass ------
def test_refuse_float16_names_the_setting_and_suggests_bf16_or_32():
    for value in ("16-mixed", "16", 16, "16-true"):
        with pytest.raises(ConfigError, match=r"trainer\.precision=16.* not supported for evaluation") as err:
            refuse_float16(value, "trainer.precision", "evaluation")
        assert "trainer.precision=bf16-mixed" in str(err.value) and "trainer.precision=32-true" in str(err.value)
        assert "underflow" in str(err.value)
    for value in ("bf16-mixed", "32-true", "32", 32):
        assert refuse_float16(value, "precision", "robustification") == str(value)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    overrides = [*SYNTHETIC, "method=natural", "trainer.max_epochs=1", "test=false", "data.n_train=256"]
    _, objs = train(compose_config("train", [*overrides, "data.val_size=32"], out))
    return Path(objs["trainer"].checkpoint_callback.last_model_path)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "a.png")
    return folder


def test_evaluate_refuses_16_mixed_before_loading_the_checkpoint(tmp_path):
    missing = f"ckpt_path={tmp_path / 'missing.ckpt'}"  # loading it would fail: the check comes first
    with pytest.raises(ConfigError, match=r"trainer\.precision=16-mixed is not supported for evaluation"):
        evaluate(compose_config("evaluate", [missing, "trainer.precision=16-mixed"], tmp_path / "run"))
    with pytest.raises(CheckpointError, match="does not exist"):  # bf16 passes the check
        evaluate(compose_config("evaluate", [missing, "trainer.precision=bf16-mixed"], tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_evaluate_runs_in_bf16(checkpoint, tmp_path):
    overrides = [f"ckpt_path={checkpoint}", "trainer.precision=bf16-mixed", "trainer.accelerator=cpu"]
    overrides += ["evaluation=[clean,pgd]", "evaluation.pgd.attack.steps=2", "data.test_subset=16"]
    results = evaluate(compose_config("evaluate", overrides, tmp_path / "run"))
    assert results["n_images"] == 16 and 0 <= results["pgd/acc"] <= results["clean/acc"] <= 1
    assert json.loads((tmp_path / "run" / "results.json").read_text())["meta"]["precision"] == "bf16-mixed"


def test_robustify_refuses_16_mixed_before_any_work(image_folder, tmp_path):
    def cfg(precision: str):
        paths = [f"ckpt_path={tmp_path / 'missing.ckpt'}", f"input={image_folder}", f"output={tmp_path / 'out'}"]
        return compose_config("robustify", [*paths, f"trainer.precision={precision}"], tmp_path / "run")

    with pytest.raises(ConfigError, match=r"precision=16-mixed is not supported for robustification"):
        robustify_files(cfg("16-mixed"))
    with pytest.raises(CheckpointError, match="does not exist"):  # bf16 passes the check
        robustify_files(cfg("bf16-mixed"))
    assert not (tmp_path / "out").exists()


def test_ood_refuses_16_mixed_before_loading_the_checkpoint(tmp_path):
    missing = f"ckpt_path={tmp_path / 'missing.ckpt'}"
    cfg = compose_config("ood", [missing, "trainer.precision=16-mixed"], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"trainer[.]precision=16-mixed is not supported for OOD"):
        evaluate_ood(cfg)
    with pytest.raises(CheckpointError, match="does not exist"):  # bf16 passes the check
        evaluate_ood(compose_config("ood", [missing, "trainer.precision=bf16-mixed"], tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_training_that_attacks_refuses_float16_before_any_work(make_cfg, tmp_path):
    """Adversarial methods attack inside training_step, and every method with a validation PGD
    picks its checkpoint by attacks: under 16-mixed their input gradients are not loss-scaled."""
    from safespot.train import train

    for method in ("adversarial", "natural"):
        cfg = make_cfg(f"method={method}", "trainer.precision=16-mixed", out=tmp_path / method)
        with pytest.raises(ConfigError, match=r"trainer\.precision=16-mixed .*training that runs attacks"):
            train(cfg)
        assert not (tmp_path / method / "splits.json").exists()
    from safespot.checks import check_train_config

    plain = make_cfg(
        "method=natural", "trainer.precision=16-mixed", "method.val_attack=null", "method.test_attack=null"
    )
    check_train_config(plain)  # nothing attacks: float16 with Lightning's loss scaling is fine
