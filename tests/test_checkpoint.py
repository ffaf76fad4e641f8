"""Every checkpoint a command reads goes through the one checked loader
(safespot.utils.checkpoint.load_checkpoint): weights only, even where the environment asks torch
for full unpickling, and refused with one line naming the setting and the reason, before any work."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SYNTHETIC, compose_config
from safespot.evaluate import evaluate
from safespot.ood.evaluate import evaluate_ood
from safespot.robustify_files import robustify_files
from safespot.train import train
from safespot.utils.checkpoint import CheckpointError, SafeCheckpointIO, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MARKER = "safespot_malicious_marker"
TINY = ["method=natural", "test=false", "data.n_train=256", "data.val_size=32"]
#: torch's switch that turns every torch.load without an explicit weights_only into a full unpickling
FORCE_UNPICKLING = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class _RunsCode:
    """Unpickled, it runs ``touch <marker>``."""

    def __init__(self, marker: str | Path = MARKER) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    _, objs = train(compose_config("train", [*SYNTHETIC, *TINY, "trainer.max_epochs=1"], out))
    return Path(objs["trainer"].checkpoint_callback.last_model_path)


@pytest.fixture
def evil(trained, tmp_path) -> tuple[Path, Path]:
    """``(checkpoint, marker)``: a real checkpoint with an object whose unpickling creates ``marker``."""
    checkpoint = torch.load(trained, weights_only=True)
    marker = tmp_path / "code_ran"
    checkpoint["payload"] = _RunsCode(marker)
    path = tmp_path / "evil.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def _write_image(folder: Path) -> Path:
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(folder / "a.png")
    return folder


# --- the loader -----------------------------------------------------------------------------
def test_malicious_checkpoint_is_refused_without_running_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(FORCE_UNPICKLING, "1")
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": _RunsCode()}, f)
    with pytest.raises(CheckpointError, match=r"refused: .*\(posix\.system\), which could run code"):
        load_checkpoint(path)
    assert not (tmp_path / MARKER).exists()


def test_each_unreadable_checkpoint_is_named_with_its_reason(trained, tmp_path):
    """Random bytes are not "code", an empty file has a reason, a directory is a directory."""
    rng = np.random.default_rng(0)
    (tmp_path / "random.ckpt").write_bytes(rng.bytes(300))
    (tmp_path / "empty.ckpt").touch()
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    (tmp_path / "cut.ckpt").write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    (tmp_path / "folder.ckpt").mkdir()
    cases = {
        "random.ckpt": "is not a readable checkpoint: not a file torch.save wrote, or a damaged one",
        "text.ckpt": "is not a readable checkpoint",
        "cut.ckpt": "is not a readable checkpoint",
        "empty.ckpt": "is an empty file, not a checkpoint",
        "folder.ckpt": "is a directory, not a checkpoint file",
        "none.ckpt": "does not exist",
    }
    for name, reason in cases.items():
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(tmp_path / name, "init_from")
        message = str(caught.value)
        assert message.startswith(f"init_from='{tmp_path / name}' {reason}"), message
        assert "could run code" not in message and "\n" not in message


def test_a_head_that_disagrees_with_the_stored_class_count_is_refused(trained, tmp_path):
    """A checkpoint whose config says 10 classes around a 4-class head: refused at load, not an
    IndexError in the middle of an evaluation."""
    checkpoint = torch.load(trained, weights_only=True)
    checkpoint["safespot_config"]["data"]["num_classes"] = 10
    torch.save(checkpoint, tmp_path / "mixed.ckpt")
    message = r"classifier head has 4 outputs but its stored config says data\.num_classes=10"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "mixed.ckpt")
    cfg = compose_config("evaluate", [f"ckpt_path={tmp_path / 'mixed.ckpt'}", "evaluation=[clean]"], tmp_path / "run")
    with pytest.raises(CheckpointError, match=message):
        evaluate(cfg)
    assert not (tmp_path / "run" / "results.json").exists()


# --- every entry point ------------------------------------------------------------------------
def _train(setting: str, evil: Path, out: Path) -> Path:
    train(compose_config("train", [*SYNTHETIC, *TINY, "trainer.max_epochs=2", f"{setting}={evil}"], out))
    return out / "splits.json"


def _evaluate(overrides: list[str], out: Path) -> Path:
    evaluate(compose_config("evaluate", [*overrides, "data.test_subset=8"], out))
    return out / "results.json"


def _ood(overrides: list[str], out: Path) -> Path:
    evaluate_ood(compose_config("ood", [*overrides, "detector=[msp]", "data.test_subset=8"], out))
    return out / "scores.csv"


def _robustify(evil: Path, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    inputs = _write_image(out.parent / "inputs")
    overrides = [f"ckpt_path={evil}", f"input={inputs}", f"output={out}"]
    robustify_files(compose_config("robustify", overrides, out.parent / "robustify_run"))
    return out


ENTRY_POINTS = {  # name: (the setting named in the error, run(evil, trained, out) -> an output it must not write)
    "train resume": ("ckpt_path", lambda evil, trained, out: _train("ckpt_path", evil, out)),
    "train init_from": ("init_from", lambda evil, trained, out: _train("init_from", evil, out)),
    "evaluate": ("ckpt_path", lambda evil, trained, out: _evaluate([f"ckpt_path={evil}"], out)),
    "transfer source": (
        "evaluation.transfer.source_ckpt_path",
        lambda evil, trained, out: _evaluate(
            [f"ckpt_path={trained}", "evaluation=[transfer]", f"evaluation.transfer.source_ckpt_path={evil}"], out
        ),
    ),
    "ood": ("ckpt_path", lambda evil, trained, out: _ood([f"ckpt_path={evil}"], out)),
    "ood detector": (
        "detector.msp.ckpt_path",
        lambda evil, trained, out: _ood([f"ckpt_path={trained}", f"+detector.msp.ckpt_path={evil}"], out),
    ),
    "robustify": ("ckpt_path", lambda evil, trained, out: _robustify(evil, out)),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_no_entry_point_runs_the_code_of_a_checkpoint(entry, evil, trained, tmp_path, monkeypatch):
    """With torch told to unpickle fully wherever weights_only is not given, no command runs the
    checkpoint's code: each refuses it, naming its setting, before any output."""
    monkeypatch.setenv(FORCE_UNPICKLING, "1")
    path, marker = evil
    setting, run = ENTRY_POINTS[entry]
    out = tmp_path / "run" / "out"
    with pytest.raises(CheckpointError) as caught:
        run(path, trained, out)
    assert not marker.exists()
    message = str(caught.value)
    assert message.startswith(f"{setting}='{path}' was refused: ") and "could run code" in message
    assert not (out / "splits.json").exists() and not (out / "results.json").exists() and not (out / "a.png").exists()


def test_train_cli_refuses_a_malicious_resume_in_one_line(evil, tmp_path):
    path, marker = evil
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "train.py", *SYNTHETIC, *TINY, f"ckpt_path={path}", f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env={**os.environ, FORCE_UNPICKLING: "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: ckpt_path='{path}' was refused: ")
    assert "Traceback" not in done.stderr and not marker.exists() and not (run_dir / "splits.json").exists()


# --- resuming -------------------------------------------------------------------------------
def test_resume_checkpoints_are_checked_before_any_output(trained, tmp_path):
    """A damaged file, a checkpoint without the training state, or weights of another model stop
    a resume with one error before ``splits.json`` is written (not at Lightning's restore)."""
    (tmp_path / "cut.ckpt").write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    weights = torch.load(trained, weights_only=True)
    torch.save({k: weights[k] for k in ("state_dict", "safespot_config")}, tmp_path / "weights.ckpt")
    cases = {
        "cut.ckpt": ([], "is not a readable checkpoint"),
        "weights.ckpt": ([], "cannot resume a run: it lacks the training state"),
        "last.ckpt": (["model.backbone.width=16"], "its weights do not fit the model config"),
    }
    for name, (overrides, reason) in cases.items():
        path = trained if name == "last.ckpt" else tmp_path / name
        out = tmp_path / name.replace(".", "_")
        cfg = compose_config("train", [*SYNTHETIC, *TINY, *overrides, f"ckpt_path={path}"], out)
        with pytest.raises(CheckpointError, match=reason):
            train(cfg)
        assert not (out / "splits.json").exists()


def test_lightning_restores_through_the_checked_loader(trained, evil, tmp_path, monkeypatch):
    """The trainer's checkpoint plugin is the checked loader: Lightning's own restores (resume,
    testing the best checkpoint) read weights only, whatever torch's default; a resume still
    continues the run."""
    resumed = compose_config("train", [*SYNTHETIC, *TINY, "trainer.max_epochs=2", f"ckpt_path={trained}"], tmp_path)
    _, objs = train(resumed)
    assert isinstance(objs["trainer"].strategy.checkpoint_io, SafeCheckpointIO)
    assert objs["trainer"].current_epoch == 2 and objs["trainer"].global_step == 2 * 4  # 224 images, batches of 64
    monkeypatch.setenv(FORCE_UNPICKLING, "1")
    path, marker = evil
    with pytest.raises(CheckpointError, match="could run code"):
        objs["trainer"].strategy.checkpoint_io.load_checkpoint(path)
    assert not marker.exists()
