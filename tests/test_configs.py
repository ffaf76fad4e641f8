"""Every config group option and every experiment preset composes and instantiates."""

from pathlib import Path

import hydra
import pytest
from PIL import Image

from safespot.paths import CONFIG_DIR
from safespot.train import build_method
from safespot.utils.checks import check_train_config


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A tiny ImageFolder tree usable as CIFAR-10/100, SVHN, ImageNet or any folder dataset."""
    root = tmp_path_factory.mktemp("data")
    layouts = {
        "cifar10-jpeg": ("train", "test", 10),
        "cifar100-jpeg": ("train", "test", 100),
        "svhn": ("train", "test", 10),
        "imagenet": ("train", "val", 1000),
        "imagefolder": ("train", "test", 10),
    }
    for name, (train, test, k) in layouts.items():
        for split in (train, test):
            for c in range(k):
                d = root / name / split / f"class{c:04d}"
                d.mkdir(parents=True)
                Image.new("RGB", (8, 8)).save(d / "0.png")
    return root


def _instantiate_all(cfg):
    check_train_config(cfg)
    dm = hydra.utils.instantiate(cfg.data)
    net = hydra.utils.instantiate(cfg.model)
    method = build_method(cfg, net)
    for group in ("callbacks", "logger"):
        for entry in (cfg.get(group) or {}).values():
            assert "_target_" in entry
            hydra.utils.get_class(entry["_target_"])
    trainer_cls = hydra.utils.get_class(cfg.trainer._target_)
    return dm, net, method, trainer_cls


GROUPS = ["data", "model", "method", "threat", "optimizer", "scheduler", "trainer", "callbacks", "logger", "debug"]


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_group_option_composes_and_instantiates(make_cfg, monkeypatch, data_root, group, option):
    monkeypatch.setenv("DATA_DIR", str(data_root))
    base = ["data=synthetic", "model=small_cnn", "model.backbone.width=8"]
    if group == "model" and option != "small_cnn":
        base = ["data=synthetic"]
    cfg = make_cfg(*[o for o in base if not o.startswith(f"{group}=")], f"{group}={option}", synthetic=False)
    dm, net, method, _ = _instantiate_all(cfg)
    assert method.net is net and dm.num_classes == net.num_classes


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_experiment_preset_composes_and_instantiates(make_cfg, monkeypatch, data_root, experiment):
    monkeypatch.setenv("DATA_DIR", str(data_root))
    cfg = make_cfg(f"experiment={experiment}", synthetic=False)
    dm, net, method, _ = _instantiate_all(cfg)
    assert cfg.task_name == experiment
    assert method.monitor == cfg.callbacks.model_checkpoint.monitor


def test_papers_schedule_in_cifar_presets(make_cfg, monkeypatch, data_root):
    monkeypatch.setenv("DATA_DIR", str(data_root))
    cfg = make_cfg("experiment=cifar10_adv_linf", synthetic=False)
    assert cfg.trainer.max_epochs == 200 and cfg.optimizer.lr == 0.1 and cfg.optimizer.weight_decay == 5e-4
    method = build_method(cfg, hydra.utils.instantiate(cfg.model))
    import torch

    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    sched = method.scheduler_factory(optimizer=opt, max_epochs=200, total_steps=1000)["scheduler"]
    assert sorted(sched.milestones) == [100, 150]
    assert method.threat["eps"] == pytest.approx(8 / 255) and method.train_attack.steps == 10


def test_unknown_group_option_lists_choices(make_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="linf_8"):
        make_cfg("threat=linf_99")


def test_evaluate_config_composes(make_cfg):
    cfg = make_cfg("ckpt_path=x.ckpt", name="evaluate")
    assert cfg.evaluation.pgd.attack.steps == 20 and cfg.trainer.inference_mode is False


def test_slurm_launcher_runs_one_task_per_gpu(make_cfg):
    make_cfg(
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
    )
    from hydra.core.hydra_config import HydraConfig

    launcher = HydraConfig.get().launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.gpus_per_node == 4 and launcher.nodes == 2
