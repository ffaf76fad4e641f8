"""RobustBench zoo models as the classifier of evaluate.py, robustify.py and ood.py, offline: the
weights are a checkpoint written locally in the layout ``robustbench.utils.load_model`` reads
(``model_dir/<dataset>/<threat_model>/<name>.pt``), for the zoo's smallest CIFAR-10 model
(Ding2020MMA, a WRN-28-4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import compose_config
from safespot.errors import ConfigError
from safespot.evaluate import evaluate
from safespot.models.zoo import ZooClassifier, ZooError, _import_robustbench, robustbench_model, zoo_checkpoint_path
from safespot.ood.detectors import stage_modules
from safespot.ood.evaluate import evaluate_ood
from safespot.robustify_files import robustify_files

NAME, DATASET, THREAT = "Ding2020MMA", "cifar10", "Linf"
ENTRY = f"robustbench:{DATASET}/{THREAT}/{NAME}"
# the zoo model on synthetic 32x32 images with its 10 classes (no dataset files in tests)
ZOO = [
    "model=robustbench",
    f"model.name={NAME}",
    f"model.dataset={DATASET}",
    f"model.threat_model={THREAT}",
    "model.data=synthetic",
    "+data.num_classes=10",
    "+data.image_size=32",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A zoo checkpoint with seeded random weights, saved as the package saves its downloads."""
    _import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    torch.manual_seed(0)
    net = model_dicts[BenchmarkDataset(DATASET)][ThreatModel(THREAT)][NAME]["model"]()
    folder = tmp_path_factory.mktemp("zoo")
    path = zoo_checkpoint_path(folder, NAME, DATASET, THREAT)
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return folder


def test_the_zoo_loader_reads_the_local_checkpoint_with_the_packages_load_model(model_dir):
    net = robustbench_model(NAME, DATASET, THREAT, model_dir=model_dir)
    assert isinstance(net, ZooClassifier) and net.num_classes == 10 and not net.training
    saved = torch.load(zoo_checkpoint_path(model_dir, NAME, DATASET, THREAT))["state_dict"]
    for key, value in net.model.state_dict().items():
        assert torch.equal(value, saved[f"module.{key}"]), key
    x = torch.rand(2, 3, 32, 32)
    assert net(x).shape == (2, 10)
    # Mahalanobis' default layers (`stages`) on the zoo's WRN-28-4: the stem and the ends of its three
    # stages (the last after the final batch norm + ReLU), as for this framework's WRNs
    assert stage_modules(net, x) == ["model.conv1", "model.block1", "model.block2", "model.relu"]


def test_evaluate_runs_a_zoo_model_without_a_training_checkpoint(model_dir, tmp_path):
    out = tmp_path / "eval"
    overrides = [*ZOO, f"paths.model_dir={model_dir}", "evaluation=[clean,pgd]", "evaluation.pgd.attack.steps=2"]
    cfg = compose_config("evaluate", [*overrides, "data.test_subset=8", "trainer.enable_progress_bar=false"], out)
    results = evaluate(cfg)
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["ckpt_path"] == ENTRY and meta["model"] == ENTRY
    assert (meta["norm"], meta["eps"]) == ("linf", pytest.approx(8 / 255))  # the benchmark's threat model
    records = pd.read_csv(out / "records.csv")
    assert len(records) == 8 and results["n_images"] == 8
    # the records are the zoo model's own predictions on the evaluated images
    from safespot.utils.instantiate import instantiate

    data = instantiate(
        compose_config(
            "train", ["data=synthetic", "data.num_classes=10", "data.image_size=32", "data.test_subset=8"], tmp_path
        ).data
    )
    data.setup("test")
    x, _, index = next(iter(data.test_dataloader()))
    net = robustbench_model(NAME, DATASET, THREAT, model_dir=model_dir)
    with torch.no_grad():
        predicted = dict(zip(index.tolist(), net(x).argmax(1).tolist(), strict=True))
    assert records.set_index("index")["clean/pred"].to_dict() == predicted
    assert (records["pgd/dist"] <= 8 / 255 + 1e-6).all()


def test_robustify_and_ood_take_a_zoo_model(model_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(inputs / f"{name}.png")
    fast = ["robustifier.max_iter=2", "robustifier.inner_steps=2", "check_steps=2", "trainer.enable_progress_bar=false"]
    overrides = [*ZOO[:4], f"paths.model_dir={model_dir}", f"input={inputs}", f"output={tmp_path / 'out'}", *fast]
    records = robustify_files(compose_config("robustify", overrides, tmp_path / "run"))
    assert [r["status"] for r in records] == ["ok", "ok"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["meta"]["ckpt_path"] == ENTRY and report["meta"]["input_size"] == [3, 32, 32]
    for name in ("a", "b"):
        before = np.asarray(Image.open(inputs / f"{name}.png"), dtype=np.int16)
        after = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"), dtype=np.int16)
        assert np.abs(after - before).max() <= 8

    ood = [
        *[o.replace("model.data=synthetic", "model.data=synthetic_ood") for o in ZOO],
        f"paths.model_dir={model_dir}",
        "detector=[msp,energy]",
        "fit_subset=16",
        "tune_subset=8",
        "outlier_subset=8",
        "data.test_subset=8",
        "histograms=false",
    ]
    result = evaluate_ood(compose_config("ood", ood, tmp_path / "ood"))
    assert set(result["metrics"]) >= {"msp", "energy"} and result["ckpt_path"] == ENTRY


def test_zoo_settings_are_refused_in_one_line_before_any_work(model_dir, tmp_path, monkeypatch):
    cases = {
        "not both": [*ZOO, "ckpt_path=x.ckpt"],
        "model.dataset must be one of": [*ZOO, "model.dataset=mnist"],
        "model.threat_model must be one of": [*ZOO, "model.threat_model=corruptions"],
        "names no data config": [*ZOO, "model.data=nowhere"],
        "ckpt_path is required": [],
    }
    for message, overrides in cases.items():
        cfg = compose_config("evaluate", [*overrides, f"paths.model_dir={model_dir}"], tmp_path / "run")
        with pytest.raises(ConfigError, match=message):
            evaluate(cfg)
    # offline with no weights: the package's download fails, and the error names where to put them
    utils = _import_robustbench()

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(utils, "download_gdrive_new", offline)
    empty = tmp_path / "empty"
    with pytest.raises(ZooError, match=r"place its weights at .*empty/cifar10/Linf/Wong2020Fast\.pt"):
        robustbench_model("Wong2020Fast", DATASET, THREAT, model_dir=empty)
    with pytest.raises(ZooError, match="has no model"):
        robustbench_model("NoSuchModel2099", DATASET, THREAT, model_dir=empty)
