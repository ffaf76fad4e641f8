"""The notebook API (safespot.load_classifier / robustify / attack): tensors in, tensors out, the
same robustifiers and attacks as the commands, per-image seeds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import safespot
from conftest import SYNTHETIC, compose_config
from safespot.errors import ConfigError
from safespot.train import train


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("api")
    overrides = [*SYNTHETIC, "method=natural", "trainer.max_epochs=2", "test=false", "data.image_size=8"]
    _, objects = train(compose_config("train", overrides, out))
    return Path(objects["trainer"].checkpoint_callback.last_model_path)


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.rand(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g)


def test_load_classifier_gives_logits_and_the_runs_threat_model(ckpt, images):
    model = safespot.load_classifier(ckpt)
    assert not model.training and model.threat == {"norm": "linf", "eps": pytest.approx(8 / 255)}
    assert model(images[0]).shape == (6, 4)


def test_attack_raises_the_loss_stays_in_its_ball_and_is_seeded_per_image(ckpt, images):
    model = safespot.load_classifier(ckpt)
    x, y = images
    x_a = safespot.attack(model, x, y, "pgd20", steps=5)
    assert x_a.shape == x.shape and (x_a - x).abs().max() <= 8 / 255 + 1e-6 and x_a.min() >= 0 and x_a.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(x_a), y) > F.cross_entropy(model(x), y)
    again = safespot.attack(model, x, y, "pgd20", steps=5)
    assert torch.equal(x_a, again)
    l2 = safespot.attack(model, x, y, "pgd20", norm="l2", eps=0.5, steps=3)
    assert (l2 - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5


def test_robustify_stays_in_its_ball_and_protects_the_prediction(ckpt, images):
    model = safespot.load_classifier(ckpt)
    x, y = images
    x_r = safespot.robustify(model, x, "sfull", max_iter=5, inner_steps=3)
    assert x_r.shape == x.shape and (x_r - x).abs().max() <= 8 / 255 + 1e-6
    with torch.no_grad():
        predicted = model(x).argmax(1)
        loss_o = F.cross_entropy(model(safespot.attack(model, x, predicted, steps=5)), predicted)
        loss_r = F.cross_entropy(model(safespot.attack(model, x_r, predicted, steps=5)), predicted)
    assert loss_r < loss_o  # the robustified images are harder to move off their class


def test_unknown_names_and_missing_threat_are_one_clear_error(ckpt, images):
    model = safespot.load_classifier(ckpt)
    with pytest.raises(ConfigError, match="no attack named 'pgd7'"):
        safespot.attack(model, *images, "pgd7")
    with pytest.raises(ConfigError, match="give norm and eps"):
        safespot.robustify(torch.nn.Flatten(), images[0])


def test_the_api_names_are_not_shadowed_by_the_commands_modules():
    """``safespot.robustify`` is the function even after every command module is imported (the
    robustify command is ``safespot.robustify_files``)."""
    import safespot.cli  # imports every command

    assert safespot.robustify.__module__ == "safespot.api" and safespot.attack.__module__ == "safespot.api"


def test_the_api_is_there_on_a_fresh_import():
    code = "import safespot as s; print(callable(s.load_classifier), callable(s.robustify), s.attack.__module__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True", "safespot.api"]
