"""Every config group option and every experiment preset composes and instantiates."""

from pathlib import Path
from typing import Any

import hydra
import pytest
from omegaconf import OmegaConf
from PIL import Image

from safespot.checks import check_train_config
from safespot.errors import ConfigError
from safespot.paths import CONFIG_DIR
from safespot.train import build_method


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
    if cfg.get("scheduler"):  # the schedule's factory takes the composed settings (e.g. a scale's other scheduler)
        optimizer = method.optimizer_factory(params=net.parameters())
        epochs = int(cfg.trainer.max_epochs)
        hydra.utils.instantiate(cfg.scheduler)(optimizer=optimizer, max_epochs=epochs, total_steps=100)
    for group in ("callbacks", "logger"):
        for entry in (cfg.get(group) or {}).values():
            assert "_target_" in entry
            hydra.utils.get_object(entry["_target_"])  # a class or a factory function
    trainer_cls = hydra.utils.get_class(cfg.trainer._target_)
    return dm, net, method, trainer_cls


GROUPS = ["data", "model", "method", "threat", "optimizer", "scheduler", "trainer", "callbacks", "logger", "debug"]
GROUPS += ["scale", "extras", "local", "hparams_search"]


# zoo models (model=robustbench) load their weights from a model directory: tests/test_zoo.py
@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g) if o != "robustbench"])
def test_group_option_composes_and_instantiates(make_cfg, monkeypatch, data_root, group, option):
    monkeypatch.setenv("DATA_DIR", str(data_root))
    base = ["data=synthetic", "model=small_cnn", "model.backbone.width=8"]
    if group == "model" and option != "small_cnn":
        base = ["data=synthetic"]
    if group == "method" and option == "flss":  # FLSS trains (and refuses all but) a stochastic classifier
        base = ["data=synthetic", "model=flss_small_cnn"]
    cfg = make_cfg(*[o for o in base if not o.startswith(f"{group}=")], f"{group}={option}", synthetic=False)
    dm, net, method, _ = _instantiate_all(cfg)
    assert method.net is net and dm.num_classes == net.num_classes


RESNET20_PRESETS = ("cifar10_cni_w", "cifar10_pni_w", "cifar10_adv_resnet20", "cifar10_cni_iw_finetune")


def _preset_scales() -> list:
    """(preset, scale) for every preset at both scales. scale=reduced selects the plain small CNN,
    which FLSS cannot train: its reduced model is another option of the model group, which only
    experiment=reduced_cifar10_flss (without scale=reduced, whose model wins) selects."""
    cases = []
    for experiment in _options("experiment"):
        for scale in ("full", "reduced"):
            if "flss" in experiment and scale == "reduced":
                continue  # the scale's small_cnn replaces the stochastic model: see the test below
            if experiment in RESNET20_PRESETS and scale == "reduced":
                scale = "reduced_resnet20"  # keeps the noise-injected ResNet-20 (conf/scale/reduced_resnet20.yaml)
            cases.append(pytest.param(experiment, scale, id=f"{experiment}-{scale}"))
    return cases


@pytest.mark.parametrize("experiment", ["cifar10_flss", "reduced_cifar10_flss"])
def test_reduced_flss_is_its_own_preset_and_scale_reduced_refuses_it(make_cfg, monkeypatch, data_root, experiment):
    """FLSS trains a stochastic classifier; ``scale=reduced`` selects the plain small CNN, whose
    choice wins over the preset's, so reduced FLSS is the delta preset ``reduced_cifar10_flss``
    and the combination with ``scale=reduced`` stops with one clear error before any work."""
    monkeypatch.setenv("DATA_DIR", str(data_root))
    with pytest.raises(ConfigError, match="stochastic classifier"):
        _instantiate_all(make_cfg(f"experiment={experiment}", "scale=reduced", synthetic=False))
    reduced = make_cfg("experiment=reduced_cifar10_flss", synthetic=False)
    _, net, _, _ = _instantiate_all(reduced)
    assert type(net).__name__ == "StochasticClassifier" and reduced.scale == "reduced"


def test_flss_kl_weights_are_the_texts_unless_the_authors_option_is_named(make_cfg, monkeypatch, data_root):
    """``method/kl_weights``: the text's softmax weights (1, 1) by default, the authors' script's
    (0.01, 0.1) only when named; both keep KL1 at 0.01 and KL2's warm-up, and reach the module."""
    monkeypatch.setenv("DATA_DIR", str(data_root))
    expected = {"text": (1.0, 1.0), "authors": (0.01, 0.1)}
    for option, (kl3, kl4) in expected.items():
        extra = [] if option == "text" else [f"method/kl_weights={option}"]
        cfg = make_cfg("experiment=reduced_cifar10_flss", *extra, synthetic=False)
        _, _, method, _ = _instantiate_all(cfg)
        assert method.kl_weights == {"kl1": 0.01, "kl2": 1.0, "kl3": kl3, "kl4": kl4}, option
        assert method.kl_warmup_weights == {"kl2": 0.01} and method.kl_warmup_epochs == 5
    cfg = make_cfg("experiment=cifar10_flss", synthetic=False)  # the paper preset keeps the text's weights
    assert (cfg.method.kl_weights.kl3, cfg.method.kl_weights.kl4) == (1.0, 1.0)


@pytest.mark.parametrize("experiment,scale", _preset_scales())
def test_experiment_preset_composes_and_instantiates(make_cfg, monkeypatch, data_root, experiment, scale):
    monkeypatch.setenv("DATA_DIR", str(data_root))
    cfg = make_cfg(f"experiment={experiment}", f"scale={scale}", "extras.print_config=false", synthetic=False)
    dm, net, method, _ = _instantiate_all(cfg)
    # runs land in logs/train/runs/ whatever the preset; the preset (or the one it aliases) is the first tag
    assert cfg.task_name == "train"
    assert cfg.tags[0] in (experiment, experiment.removeprefix("reduced_"))
    assert method.monitor == cfg.callbacks.model_checkpoint.monitor
    if experiment.startswith("reduced_"):
        scale = "reduced"  # these presets choose their scale: /scale/reduced in their defaults
    assert cfg.scale == scale and cfg.tags[-1] == scale
    if "flss" in experiment:
        assert hasattr(net, "latent_dim"), "FLSS needs the stochastic classifier (model=flss_*)"


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """A resolved config as ``{"a.b.c": leaf}``."""
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def _settings(cfg) -> dict[str, Any]:
    """What a training run does: its resolved config without names, tags, scale and run paths."""
    flat = _flat(OmegaConf.to_container(cfg, resolve=True))
    names = ("task_name", "tags", "scale", "wandb_group", "paths.", "logger.", "extras.")
    return {k: v for k, v in flat.items() if not k.startswith(names) and not k.endswith(("dirpath", "root_dir"))}


# The settings of the old conf/experiment/reduced_cifar10_*.yaml presets that differ from their full
# presets' (read off their resolved configs, dumped before they were replaced by conf/scale/reduced.yaml).
REDUCED = {
    "data.train_subset": 20000,
    "data.val_size": 1000,
    "data.val_subset": 500,
    "data.test_subset": 1000,
    "data.batch_size": 128,
    "data.num_workers": 2,
    "trainer.max_epochs": 8,
    "model.backbone._target_": "safespot.models.SmallCNN",
    "model.backbone.num_classes": 10,
    "model.backbone.width": 16,
    "scheduler._target_": "safespot.optim.one_cycle",
    "scheduler._partial_": True,
    "scheduler.max_lr": 0.1,
    "scheduler.pct_start": 0.4,
    "threat.step_size": None,
    "threat.steps": 5,
    "method.threat.step_size": None,
    "method.threat.steps": 5,
    "method.val_attack.steps": 5,
}
# nodes the reduced scale replaces rather than edits (the WRN's depth, the step decay's milestones)
REPLACED = ("model.backbone", "scheduler")
# old preset -> (its command line now, the full preset's command line, its settings beyond REDUCED)
OLD_REDUCED: dict[str, tuple[list[str], list[str], dict[str, Any]]] = {
    "reduced_cifar10_natural": (
        ["experiment=cifar10_natural", "scale=reduced"],
        ["experiment=cifar10_natural"],
        {"method.val_attack.steps": 10},
    ),
    "reduced_cifar10_gaussian_0.25": (
        ["experiment=cifar10_gaussian", "scale=reduced"],
        ["experiment=cifar10_gaussian"],
        {"method.sigma": 0.25},
    ),
    "reduced_cifar10_gaussian_0.1": (
        ["experiment=cifar10_gaussian", "method.sigma=0.1", "scale=reduced"],
        ["experiment=cifar10_gaussian", "method.sigma=0.1"],
        {"method.sigma": 0.1},
    ),
    "reduced_cifar10_flss": (
        ["experiment=reduced_cifar10_flss"],
        ["experiment=cifar10_flss"],
        {
            "model._target_": "safespot.models.build_stochastic_classifier",
            "model.latent_dim": None,
            "model.hidden": [128],
            "method.awp": None,
        },
    ),
}
for _preset in ("adv", "preemptive", "sfgsm_adv", "spgd_adv"):
    for _norm in ("linf", "l2"):
        _name = f"cifar10_{_preset}_{_norm}"
        OLD_REDUCED[f"reduced_{_name}"] = ([f"experiment={_name}", "scale=reduced"], [f"experiment={_name}"], {})
OLD_REDUCED["reduced_cifar10_trades_linf"] = (
    ["experiment=cifar10_trades_linf", "scale=reduced"],
    ["experiment=cifar10_trades_linf"],
    {},
)


@pytest.mark.parametrize("old", list(OLD_REDUCED))
def test_reduced_scale_reproduces_the_old_reduced_presets(make_cfg, monkeypatch, old):
    """``experiment=<preset> scale=reduced`` composes to what ``experiment=reduced_<preset>`` did:
    the full preset's settings with the old reduced ones (REDUCED plus the preset's own) in place."""
    monkeypatch.setenv("DATA_DIR", "/data")
    overrides, full_overrides, own = OLD_REDUCED[old]
    reduced = _settings(make_cfg(*overrides, synthetic=False))
    full = _settings(make_cfg(*full_overrides, synthetic=False))
    expected = {**REDUCED, **own}
    replaced = tuple(f"{node}." for node in (*REPLACED, *expected))
    for key in sorted(set(reduced) | set(full)):
        if key in expected:
            assert reduced.get(key, "<absent>") == expected[key], key
        elif key in ("method.train_attack.steps", "method.train_attack.step_size"):  # follows the threat model
            assert reduced[key] == reduced[key.replace("method.train_attack", "threat")], key
        elif key.startswith(replaced):
            assert key not in reduced, key
        else:
            assert reduced.get(key, "<absent>") == full.get(key, "<absent>"), key
    assert set(expected) <= set(reduced)


OOD_PRESETS = {
    "reduced_cifar10_oe": {"method._target_": "safespot.methods.OutlierExposure", "method.val_attack": None},
    "reduced_cifar10_safe_spot_oe": {"method._target_": "safespot.methods.SafeSpotOE", "method.val_attack.steps": 5},
}


@pytest.mark.parametrize("old", list(OOD_PRESETS))
def test_reduced_ood_presets_keep_their_settings(make_cfg, monkeypatch, old):
    """The OOD presets have no full-size counterpart: they stay delta presets on scale=reduced."""
    monkeypatch.setenv("DATA_DIR", "/data")
    cfg = _settings(make_cfg(f"experiment={old}", synthetic=False))
    expected = {k: v for k, v in REDUCED.items() if not k.startswith("method.val_attack")}
    expected |= {
        "model.backbone.num_classes": 6,
        "data._target_": "safespot.data.ood.ClassSplitOODDataModule",
        "data.root": "/data/cifar10-jpeg",
        "optimizer.lr": 0.1,
        "optimizer.weight_decay": 5.0e-4,
        "threat.eps": "8/255",
        **OOD_PRESETS[old],
    }
    assert {k: cfg.get(k, "<absent>") for k in expected} == expected


@pytest.mark.parametrize(
    "alias", [o for o in _options("experiment") if o in OLD_REDUCED and o != "reduced_cifar10_flss"]
)
def test_kept_reduced_names_equal_experiment_plus_scale(make_cfg, monkeypatch, alias):
    """The reduced_cifar10_* names still used in docs/ compose to their preset at scale=reduced."""
    monkeypatch.setenv("DATA_DIR", "/data")
    overrides = OLD_REDUCED[alias][0]
    assert _settings(make_cfg(f"experiment={alias}", synthetic=False)) == _settings(
        make_cfg(*overrides, synthetic=False)
    )


def _strings(node: Any) -> list[str]:
    """Every string in a loaded YAML document."""
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return [node] if isinstance(node, str) else []


def _recorded_experiments() -> set[str]:
    """The ``experiment=NAME`` overrides of the reproduction specs (conf/reproduce/) and of the
    kept runs (docs/records/**/.hydra/overrides.yaml): names that must keep composing."""
    import yaml

    files = [
        *(CONFIG_DIR / "reproduce").glob("*.yaml"),
        *(CONFIG_DIR.parent / "docs" / "records").rglob("overrides.yaml"),
    ]
    overrides = [s for path in files for s in _strings(yaml.safe_load(path.read_text()))]
    return {s.removeprefix("experiment=") for s in overrides if s.startswith("experiment=")}


def test_every_recorded_experiment_name_is_a_preset():
    """Reproduction specs and kept runs name presets that exist (the tests above compose each)."""
    recorded = _recorded_experiments()
    assert recorded and recorded <= set(_options("experiment")), recorded - set(_options("experiment"))


def _scale_of(experiment: str) -> tuple[str, str] | None:
    """(the preset, the scale) an experiment config lists in its defaults, if it lists both."""
    defaults = OmegaConf.load(CONFIG_DIR / "experiment" / f"{experiment}.yaml").get("defaults", [])
    names = [d for d in defaults if isinstance(d, str)]
    presets = [d for d in names if not d.startswith("/")]
    scales = [d.removeprefix("/scale/") for d in names if d.startswith("/scale/")]
    return (presets[0], scales[0]) if len(presets) == 1 and len(scales) == 1 else None


@pytest.mark.parametrize("experiment", [e for e in _options("experiment") if _scale_of(e)])
def test_a_preset_that_chooses_its_scale_changes_something_or_keeps_a_recorded_name(make_cfg, monkeypatch, experiment):
    """A preset may choose its scale (``/scale/<name>`` in its defaults); one that changes nothing
    else is a second name of ``experiment=<preset> scale=<name>``, kept only while kept runs or
    reproduction specs use it."""
    monkeypatch.setenv("DATA_DIR", "/data")
    preset, scale = _scale_of(experiment)
    own = _settings(make_cfg(f"experiment={experiment}", synthetic=False))
    if own == _settings(make_cfg(f"experiment={preset}", f"scale={scale}", synthetic=False)):
        assert experiment in _recorded_experiments(), f"{experiment}: use experiment={preset} scale={scale}"


def test_gaussian_preset_sweeps_sigma(make_cfg, monkeypatch):
    """One cifar10_gaussian preset; the noise levels are a sweep over method.sigma."""
    monkeypatch.setenv("DATA_DIR", "/data")
    default = make_cfg("experiment=cifar10_gaussian", synthetic=False)
    assert default.method.sigma == 0.25 and "sigma_0.25" in default.tags
    for sigma in (0.12, 0.5, 1.0):
        cfg = make_cfg("experiment=cifar10_gaussian", f"method.sigma={sigma}", synthetic=False)
        assert f"sigma_{sigma}" in cfg.tags
        assert {k for k, v in _settings(cfg).items() if _settings(default)[k] != v} == {"method.sigma"}
    assert make_cfg("experiment=imagenet_gaussian", synthetic=False).method.sigma == 0.25


def test_runs_of_every_preset_go_to_the_train_run_directory(make_cfg, monkeypatch, tmp_path):
    """task_name stays train: README's resume path logs/train/runs/<run>/checkpoints/last.ckpt holds."""
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setenv("LOG_DIR", str(tmp_path))
    for experiment in ("quickstart", "cifar10_adv_linf", "reduced_cifar10_oe"):
        make_cfg(f"experiment={experiment}", "scale=reduced", synthetic=False)
        assert Path(HydraConfig.get().run.dir).parent == tmp_path / "train" / "runs"
        assert Path(HydraConfig.get().sweep.dir).parent == tmp_path / "train" / "multiruns"


def test_extras_print_the_config_tree_unless_switched_off(make_cfg, capsys):
    from safespot.utils.task import task_wrapper

    @task_wrapper
    def task(cfg) -> int:
        return 7

    assert task(make_cfg("experiment=quickstart", "extras.print_config=true")) == 7  # the tests switch it off
    out = capsys.readouterr().out
    assert "CONFIG" in out and "task_name: train" in out and "SmallCNN" in out
    assert task(make_cfg("experiment=quickstart", "extras.print_config=false")) == 7
    assert "CONFIG" not in capsys.readouterr().out
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for name in ("train", "evaluate", "robustify", "ood"):  # on by default for users
            assert compose(config_name=name).extras.print_config is True, name
    GlobalHydra.instance().clear()


def test_hparams_search_uses_the_optuna_sweeper(make_cfg):
    from hydra.core.hydra_config import HydraConfig

    cfg = make_cfg("hparams_search=adv_lr", "experiment=cifar10_adv_linf", "scale=reduced")
    sweeper = HydraConfig.get().sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"scheduler.max_lr", "optimizer.weight_decay"}
    assert cfg.scheduler.max_lr == 0.1 and HydraConfig.get().mode.name == "MULTIRUN"


def test_local_settings_are_optional(make_cfg):
    """conf/local/default.yaml is loaded when present (not in the repository); other files by name."""
    from hydra.core.hydra_config import HydraConfig

    make_cfg()  # with or without a conf/local/default.yaml
    if not (CONFIG_DIR / "local" / "default.yaml").exists():
        assert HydraConfig.get().launcher._target_.endswith("BasicLauncher")
    make_cfg("local=slurm_example")
    launcher = HydraConfig.get().launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 4
    assert HydraConfig.get().runtime.choices.local == "slurm_example"


@pytest.mark.parametrize(
    "task, example, key",
    [
        ("evaluate", "slurm_example", "trainer"),
        ("robustify", "slurm_example", "trainer"),
        ("ood", "slurm_example", "trainer"),
    ],
)
def test_every_command_takes_optional_local_settings(make_cfg, task, example, key):
    """evaluate.py, robustify.py and ood.py load conf/local/<command>.yaml when present (none is
    in the repository) and any conf/local file by name, like train.py's conf/local/default.yaml."""
    from hydra.core.hydra_config import HydraConfig

    required = {
        "evaluate": ["ckpt_path=x.ckpt"],
        "robustify": ["ckpt_path=x.ckpt", "input=in", "output=out"],
        "ood": ["ckpt_path=x.ckpt"],
    }[task]
    make_cfg(*required, name=task)
    if not (CONFIG_DIR / "local" / f"{task}.yaml").exists():
        assert HydraConfig.get().launcher._target_.endswith("BasicLauncher")
    cfg = make_cfg(*required, f"local={example}", name=task)
    assert HydraConfig.get().launcher._target_.endswith("SlurmLauncher")
    assert HydraConfig.get().runtime.choices.local == example
    assert cfg[key].devices == 4 and cfg.paths.log_dir.startswith("/scratch/")


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


@pytest.mark.parametrize("name", ["evaluate", "robustify", "ood"])
def test_a_named_threat_model_selects_norm_and_eps_in_every_checkpoint_command(make_cfg, name):
    """``threat=l2_0.5`` works after a checkpoint as in train.py (it used to fail with 'Could not
    override threat'); without it the checkpoint's own threat model stays (null here)."""
    named = make_cfg("ckpt_path=x.ckpt", "threat=l2_0.5", name=name)
    assert (named.threat.norm, named.threat.eps) == ("l2", 0.5)
    plain = make_cfg("ckpt_path=x.ckpt", name=name)
    assert plain.threat.norm is None and plain.threat.eps is None
    if name == "robustify":  # its own settings still win over the robustifier group's
        assert plain.robustifier.quantize is True


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
