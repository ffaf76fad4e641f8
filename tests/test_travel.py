"""Checkpoints that travel: a run trained in one directory is evaluated from another directory (or
machine), where the data lives elsewhere; the data location is the machine's (``DATA_DIR``), not
the checkpoint's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import compose_config
from safespot.data.errors import DataConfigError
from safespot.evaluate import evaluate
from safespot.robustify_files import robustify_files
from safespot.train import train

TINY = ["data=imagefolder", "data.num_classes=2", "data.image_size=16", "data.val_size=4", "data.batch_size=4",
        "data.eval_batch_size=4", "data.num_workers=0", "model=small_cnn", "model.backbone.width=4", "method=natural",
        "trainer=cpu", "trainer.max_epochs=1", "logger=none", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "test=false"]  # fmt: skip


def _image_folders(root: Path) -> None:
    for split, n in (("train", 8), ("test", 4)):
        for label, colour in enumerate(((200, 30, 30), (30, 30, 200))):
            folder = root / "imagefolder" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (16, 16), tuple(c + 5 * i for c in colour)).save(folder / f"{i}.png")


def test_a_checkpoint_copied_elsewhere_is_evaluated_with_this_machines_data_dir(tmp_path, monkeypatch):
    (tmp_path / "lab" / "data").mkdir(parents=True)
    _image_folders(tmp_path / "lab" / "data")
    (tmp_path / "lab" / "project").mkdir()
    monkeypatch.chdir(tmp_path / "lab" / "project")
    monkeypatch.setenv("DATA_DIR", "../data")  # relative to where training runs
    _, objects = train(compose_config("train", TINY, tmp_path / "lab" / "run"))
    stored = Path(objects["trainer"].checkpoint_callback.last_model_path)

    # another machine: the data under another path, the checkpoint copied, the command run from a third place
    shutil.copytree(tmp_path / "lab" / "data", tmp_path / "cluster" / "datasets")
    (tmp_path / "cluster" / "models").mkdir()
    ckpt = Path(shutil.copy(stored, tmp_path / "cluster" / "models" / "model.ckpt"))
    shutil.rmtree(tmp_path / "lab")
    (tmp_path / "cluster" / "work").mkdir()
    monkeypatch.chdir(tmp_path / "cluster" / "work")
    monkeypatch.setenv("DATA_DIR", "../datasets")
    quiet = ["evaluation=[clean]", "trainer=cpu", "trainer.enable_progress_bar=false"]
    results = evaluate(compose_config("evaluate", [f"ckpt_path={ckpt}", *quiet], tmp_path / "eval"))
    assert results["n_images"] == 8

    inputs = tmp_path / "cluster" / "datasets" / "imagefolder" / "test" / "class0"
    files = [f"ckpt_path={ckpt}", f"input={inputs}", f"output={tmp_path / 'out'}"]
    cfg = compose_config(
        "robustify",
        [*files, "robustifier=none", "check_steps=1", "trainer.enable_progress_bar=false"],
        tmp_path / "rob",
    )
    robustify_files(cfg)
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert len(pngs) == 5 and "contact_sheet.png" in pngs  # 4 robustified images and the contact sheet

    # without DATA_DIR here, the stored root (../data from the training directory) is not found: one
    # error naming what works
    monkeypatch.delenv("DATA_DIR")
    with pytest.raises(DataConfigError, match="set DATA_DIR"):
        evaluate(
            compose_config("evaluate", [f"ckpt_path={ckpt}", "evaluation=[clean]", "trainer=cpu"], tmp_path / "e2")
        )
    # data.root on the command line wins
    root = tmp_path / "cluster" / "datasets" / "imagefolder"
    results = evaluate(compose_config("evaluate", [f"ckpt_path={ckpt}", *quiet, f"data.root={root}"], tmp_path / "e3"))
    assert results["n_images"] == 8
