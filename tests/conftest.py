"""Shared fixtures: composing configs against synthetic data in a temporary run directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

import safespot  # noqa: F401  (resolvers)
from safespot.utils.compose import compose_config

torch.set_num_threads(2)

SYNTHETIC = [
    "data=synthetic",
    "model=small_cnn",
    "model.backbone.width=8",
    "logger=none",
    "trainer=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg(*overrides, name="train", out=None)``: a composed config on synthetic data."""

    def _make(*overrides: str, name: str = "train", out: Path | None = None, synthetic: bool = True) -> DictConfig:
        base = SYNTHETIC if (synthetic and name == "train") else []
        return compose_config(name, [*base, *overrides], out or tmp_path / "run")

    yield _make
    GlobalHydra.instance().clear()


def cpu_trainer(**kwargs):
    """A quiet single-process CPU trainer that allows gradient attacks in test loops."""
    import lightning as L

    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "inference_mode": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **kwargs,
    }
    return L.Trainer(**options)


class TinyNet(torch.nn.Module):
    """A small conv net with batch norm, for attack tests."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(32, num_classes),
        )
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture(scope="module")
def one_thread():
    """Many tiny forward passes: one intra-op thread avoids thread hand-offs on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


#: keys of a results.json meta that name where a run wrote (they differ between two runs)
OUTPUT_PATH_KEYS = frozenset({"output_dir", "run_dir", "out"})


def assert_same_run_files(one: Path, two: Path) -> None:
    """Every file of two evaluation runs (records, results, certificates, panels) is the same:
    tables equal up to float noise, images and text byte for byte; ``results.json`` equal but
    for the output paths in its meta."""
    import json

    import pandas as pd

    files_one = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file() and ".hydra" not in p.parts)
    files_two = sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file() and ".hydra" not in p.parts)
    files_one = [p for p in files_one if p.suffix != ".log"]
    files_two = [p for p in files_two if p.suffix != ".log"]
    assert files_one == files_two
    for name in files_one:
        a, b = one / name, two / name
        if name.suffix == ".csv":
            pd.testing.assert_frame_equal(pd.read_csv(a), pd.read_csv(b), check_exact=False, atol=1e-5)
        elif name.suffix == ".json":
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            assert ja.keys() == jb.keys(), name
            for key in ja:
                if key == "meta":  # the run's settings, equal but for where each run wrote
                    ma, mb = ({k: v for k, v in m.items() if k not in OUTPUT_PATH_KEYS} for m in (ja[key], jb[key]))
                    assert ma == mb, (name, key)
                else:
                    assert ja[key] == pytest.approx(jb[key], abs=1e-6), (name, key)
        else:
            assert a.read_bytes() == b.read_bytes(), name


class InProcessCommands:
    """A runner for :func:`safespot.reproduce.engine.run_spec` that runs ``train.py`` /
    ``evaluate.py`` / ``ood.py`` in this process (the same configs and code as the commands, without
    a Python start per command); ``calls`` keeps every command line."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, cmd: list[str], cwd: Path) -> None:
        from safespot.evaluate import evaluate
        from safespot.ood.evaluate import evaluate_ood
        from safespot.train import train

        self.calls.append(cmd)
        run_dir = next(c for c in cmd if c.startswith("hydra.run.dir=")).split("=", 1)[1]
        overrides = [c for c in cmd[2:] if not c.startswith("hydra.")]
        name = cmd[1].removesuffix(".py")
        command = {"train": train, "evaluate": evaluate, "ood": evaluate_ood}[name]
        command(compose_config(name, overrides, run_dir))
        Path(run_dir, ".hydra").mkdir(exist_ok=True)
        Path(run_dir, ".hydra", "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
