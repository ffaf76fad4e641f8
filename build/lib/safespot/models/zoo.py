"""Public robust models from the RobustBench model zoo (Croce et al., 2021, "RobustBench: a
standardized adversarial robustness benchmark"; package ``robustbench==1.1.1``).

A zoo model stands in for a training checkpoint: ``python evaluate.py model=robustbench
model.name=Carmon2019Unlabeled model.dataset=cifar10 model.threat_model=Linf`` evaluates it with
this framework's attacks, robustifiers and records (the same for ``robustify.py`` and
``ood.py``). The weights are loaded by the package's own ``robustbench.utils.load_model`` from
``model_dir/<dataset>/<threat_model>/<name>.pt`` (``paths.model_dir``, ``$MODEL_DIR``, default
``./models``), which the package downloads there first when it is missing (internet needed).
Zoo models take images in [0, 1] and normalise inside, as this framework's classifiers do.

The run settings a checkpoint would carry come from the zoo entry (:func:`zoo_run_config`): the
data config ``conf/data/<data>.yaml`` (``model.data``, by default the model's dataset) and the
threat model of the benchmark (RobustBench's budgets: l_inf 8/255 and l_2 0.5 on CIFAR-10/100,
l_inf 4/255 on ImageNet), which ``threat.*`` overrides as usual.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from safespot.errors import ConfigError

#: RobustBench's datasets (``model.dataset``) and their class counts.
ZOO_DATASETS = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
#: RobustBench's l_p threat models (``model.threat_model``), as this framework's norms.
ZOO_NORMS = {"Linf": "linf", "L2": "l2"}
#: The benchmark's budgets per (dataset, threat model), the default of ``threat.eps``.
ZOO_BUDGETS = {
    ("cifar10", "Linf"): "8/255",
    ("cifar10", "L2"): 0.5,
    ("cifar100", "Linf"): "8/255",
    ("cifar100", "L2"): 0.5,
    ("imagenet", "Linf"): "4/255",
}


class ZooError(ConfigError):
    """A zoo model that cannot be named or loaded."""


def check_zoo_entry(name: str, dataset: str, threat_model: str) -> None:
    """Refuse an unknown dataset or a threat model that is not an l_p ball, in one line."""
    if not name or name == "???":
        raise ZooError("model.name is required: a RobustBench model name, e.g. model.name=Carmon2019Unlabeled")
    if dataset not in ZOO_DATASETS:
        raise ZooError(f"model.dataset must be one of {sorted(ZOO_DATASETS)}, got {dataset!r}")
    if (dataset, threat_model) not in ZOO_BUDGETS:
        allowed = sorted(t for d, t in ZOO_BUDGETS if d == dataset)
        raise ZooError(f"model.threat_model must be one of {allowed} for {dataset} (l_p balls), got {threat_model!r}")


def zoo_checkpoint_path(model_dir: str | Path, name: str, dataset: str, threat_model: str) -> Path:
    """Where ``robustbench.utils.load_model`` reads (and downloads) the model's weights."""
    return Path(model_dir) / dataset / threat_model / f"{name}.pt"


def _import_robustbench() -> Any:
    """``robustbench.utils``. RobustBench 1.1.1 imports the reference AutoAttack code under its
    repository's module name ``autoattack``; the PyPI packaging of that code this project pins
    (``pyautoattack==0.2.0``) names it ``pyautoattack``, so that name is provided as an alias."""
    for module in ("", ".state"):
        if f"autoattack{module}" not in sys.modules:
            sys.modules[f"autoattack{module}"] = importlib.import_module(f"pyautoattack{module}")
    try:
        with warnings.catch_warnings():  # the package's own import of pkg_resources
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
            return importlib.import_module("robustbench.utils")
    except ImportError as err:
        raise ZooError(f"model=robustbench needs the robustbench package ({err}): pip install -e '.[zoo]'") from None


class ZooClassifier(nn.Module):
    """A zoo model as this framework's classifier: images in [0, 1] -> logits, with
    ``num_classes`` and the zoo entry it came from."""

    def __init__(self, model: nn.Module, num_classes: int, name: str, dataset: str, threat_model: str) -> None:
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.zoo = {"name": name, "dataset": dataset, "threat_model": threat_model}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def extra_repr(self) -> str:
        return f"robustbench {self.zoo['dataset']}/{self.zoo['threat_model']}/{self.zoo['name']}"


def robustbench_model(
    name: str,
    dataset: str = "cifar10",
    threat_model: str = "Linf",
    model_dir: str | Path = "./models",
    data: str | None = None,
) -> ZooClassifier:
    """Hydra target of ``conf/model/robustbench.yaml``: the zoo model loaded by
    ``robustbench.utils.load_model(name, model_dir, dataset, threat_model)``, in eval mode.
    A missing weights file is downloaded by the package; a failed download is reported with the
    path to place the file at. ``data`` names the data config of runs (:func:`zoo_run_config`)."""
    check_zoo_entry(name, dataset, threat_model)
    utils = _import_robustbench()
    path = zoo_checkpoint_path(model_dir, name, dataset, threat_model)
    try:
        model = utils.load_model(model_name=name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model)
    except KeyError:
        raise ZooError(f"RobustBench has no model {name!r} for {dataset}/{threat_model}") from None
    except Exception as err:  # the package's download (gdown, requests) fails in many ways offline
        if path.is_file():
            raise
        raise ZooError(
            f"could not load RobustBench model {name} ({dataset}/{threat_model}): {type(err).__name__}: {err}. "
            f"Without internet, place its weights at {path}"
        ) from None
    return ZooClassifier(model.eval(), ZOO_DATASETS[dataset], name, dataset, threat_model).eval()


def is_zoo_model(model_cfg: DictConfig | None) -> bool:
    return model_cfg is not None and str(model_cfg.get("_target_", "")).endswith("zoo.robustbench_model")


def zoo_run_config(cfg: DictConfig, config_dir: Path) -> DictConfig:
    """The settings a training checkpoint would carry, for a zoo model (``cfg.model``): the model
    config, the data config ``conf/data/<model.data>.yaml`` (interpolations resolved against
    ``cfg.paths`` and ``cfg.seed``), the benchmark's threat model, and the zoo entry as the run's
    name and tag."""
    model = cfg.model
    name, dataset, threat_model = str(model.get("name")), str(model.get("dataset")), str(model.get("threat_model"))
    check_zoo_entry(name, dataset, threat_model)
    data_name = str(model.get("data") or dataset)
    data_file = config_dir / "data" / f"{data_name}.yaml"
    if not data_file.is_file():
        options = sorted(p.stem for p in (config_dir / "data").glob("*.yaml"))
        raise ZooError(f"model.data={data_name!r} names no data config; one of {options}")
    scope = OmegaConf.create({"paths": OmegaConf.to_container(cfg.paths), "seed": cfg.get("seed", 0)})
    scope.data = OmegaConf.load(data_file)
    data = OmegaConf.to_container(scope.data, resolve=True)
    entry = f"robustbench:{dataset}/{threat_model}/{name}"
    return OmegaConf.create(
        {
            "model": OmegaConf.to_container(model, resolve=True),
            "data": data,
            "threat": {"norm": ZOO_NORMS[threat_model], "eps": ZOO_BUDGETS[(dataset, threat_model)]},
            "task_name": "robustbench",
            "tags": [entry],
            "zoo": entry,
        }
    )
