"""Loading a run: the checkpoint (safely), its stored config, the model and the data overrides.
The evaluation, robustification and OOD commands all start here (each then runs on Lightning's
Trainer, built from the ``trainer`` config group); no entry module imports another."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from safespot.checks import check_threat, input_shape
from safespot.errors import ConfigError
from safespot.models.noise_injection import check_noise_per
from safespot.models.zoo import is_zoo_model, zoo_run_config
from safespot.paths import CONFIG_DIR
from safespot.utils.checkpoint import CheckpointError, load_checkpoint, net_state_dict
from safespot.utils.instantiate import instantiate


def _merge_set(base: DictConfig, overrides: DictConfig | None) -> DictConfig:
    """``base`` with every non-null entry of ``overrides`` written over it."""
    merged = OmegaConf.create(OmegaConf.to_container(base, resolve=True))
    for key, value in (overrides or {}).items():
        if value is not None:
            merged[key] = value
    return merged


def _given(cfg: DictConfig, key: str) -> Any:
    return None if key not in cfg or OmegaConf.is_missing(cfg, key) else cfg.get(key)


def load_training_run(cfg: DictConfig, command: str = "evaluate.py") -> tuple[dict[str, Any], DictConfig]:
    """``(checkpoint, run_cfg)`` of the classifier a command runs on: the checkpoint at
    ``cfg.ckpt_path`` (loaded safely) and the training config stored in it, or, for a zoo model
    (``model=robustbench model.name=...``, :mod:`safespot.models.zoo`), a checkpoint without
    weights (``{"zoo": entry, "safespot_config": ...}``; the zoo loader brings the weights) and
    the settings the zoo entry implies. Exactly one of the two must be given."""
    ckpt_path, model = _given(cfg, "ckpt_path"), _given(cfg, "model")
    if model is not None:
        if not is_zoo_model(model):
            raise ConfigError("model= selects a zoo model here (model=robustbench); trained models come as ckpt_path")
        if ckpt_path is not None:
            raise ConfigError("give either ckpt_path (a trained run) or model=robustbench (a zoo model), not both")
        run_cfg = zoo_run_config(cfg, CONFIG_DIR)
        return {"zoo": str(run_cfg.zoo), "safespot_config": OmegaConf.to_container(run_cfg)}, run_cfg
    if ckpt_path is None:
        raise ConfigError(
            f"ckpt_path is required: python {command} ckpt_path=PATH (or a zoo model: model=robustbench model.name=X)"
        )
    return load_run_checkpoint(ckpt_path)


def load_run_checkpoint(ckpt_path: str | Path, setting: str = "ckpt_path") -> tuple[dict[str, Any], DictConfig]:
    """``(checkpoint, run_cfg)``: a training run's checkpoint (loaded safely,
    :func:`safespot.utils.checkpoint.load_checkpoint`; ``setting`` names it in errors) and the
    training config stored in it."""
    checkpoint = load_checkpoint(ckpt_path, setting)
    return checkpoint, OmegaConf.create(checkpoint["safespot_config"])


def training_preset(run_cfg: DictConfig) -> str | None:
    """The preset a run was trained with (the first of its ``tags``; ``task_name`` is only
    ``train``), for reports and wandb tags."""
    return (list(run_cfg.get("tags") or []) or [run_cfg.get("task_name")])[0]


def run_source(cfg: DictConfig, checkpoint: dict[str, Any]) -> str:
    """What the classifier came from, for reports: the resolved checkpoint path or the zoo entry."""
    return str(checkpoint["zoo"]) if "zoo" in checkpoint else str(Path(cfg.ckpt_path).resolve())


def load_run_settings(cfg: DictConfig, command: str = "evaluate.py") -> tuple[dict[str, Any], DictConfig, DictConfig]:
    """Return ``(checkpoint, run_cfg, data_cfg)`` (:func:`load_training_run`): the training
    run's config, its data config with the non-null ``cfg.data`` entries written over it, and
    ``cfg.threat`` completed from the run's threat model (checked), all before any data is read."""
    checkpoint, run_cfg = load_training_run(cfg, command)
    data_cfg = _merge_set(run_cfg.data, cfg.get("data"))
    if "root" in data_cfg and _given(cfg.get("data") or {}, "root") is None:
        with open_dict(data_cfg):
            data_cfg.root = data_root_here(run_cfg, cfg)
    run_threat(cfg, run_cfg)
    return checkpoint, run_cfg, data_cfg


def data_root_here(run_cfg: DictConfig, cfg: DictConfig) -> str | None:
    """Where the data of a trained run is on this machine. The checkpoint stores ``data.root`` as
    it resolved where the run trained (``${paths.data_dir}``, i.e. ``DATA_DIR``, plus the dataset's
    own part); the data location belongs to the machine, not to the model. So: with ``DATA_DIR``
    set here, the stored root moved from the training run's data directory to this one; without
    it, the stored root when it exists from here, else the same move onto this command's default
    data directory (``./data``). ``data.root=`` on the command line wins over all of them."""
    stored = run_cfg.data.get("root")
    if stored is None:
        return None
    stored_dir = OmegaConf.select(run_cfg, "paths.data_dir")
    here_dir = OmegaConf.select(cfg, "paths.data_dir")
    moved = str(stored)
    if stored_dir is not None and here_dir is not None:
        stored_dir, rest = str(stored_dir).rstrip("/"), str(stored)
        if rest == stored_dir or rest.startswith(stored_dir + "/"):
            moved = str(here_dir).rstrip("/") + rest[len(stored_dir) :]
    if os.environ.get("DATA_DIR") or not Path(str(stored)).exists():
        return moved
    return str(stored)


def run_threat(cfg: DictConfig, run_cfg: DictConfig) -> DictConfig:
    """The threat model of a command on a trained run: the run's, with the non-null ``cfg.threat``
    entries written over it, checked (the budget against the run's image size, too); its norm
    and eps are written back into ``cfg.threat``."""
    threat = _merge_set(run_cfg.threat, cfg.get("threat"))
    check_threat(threat, image_shape=input_shape(run_cfg.data))
    with open_dict(cfg):
        cfg.threat.norm, cfg.threat.eps = threat.norm, threat.eps
    return threat


#: the noise kinds whose weight noise ``noise_per`` chooses how to draw (paper 003's PNI-W, CNI-W)
WEIGHT_NOISE = ("pni_w", "cni_w")


def with_noise_per(run_cfg: DictConfig, noise_per: str | None) -> DictConfig:
    """``run_cfg`` with its noise-injected model drawing its weight noise per ``noise_per``
    (``forward``: one draw per forward pass, paper 003; ``image``: one per image, exact records;
    ``None``: as the run stored it, :mod:`safespot.models.noise_injection`). A model without weight
    noise is refused (checked before any work)."""
    if noise_per is None:
        return run_cfg
    check_noise_per(str(noise_per))
    backbone = run_cfg.model.get("backbone") if isinstance(run_cfg.get("model"), DictConfig) else None
    if backbone is None or backbone.get("noise", "none") not in WEIGHT_NOISE:
        raise ConfigError(
            f"noise_per={noise_per}: the run's model has no weight noise "
            f"(model.backbone.noise is one of {list(WEIGHT_NOISE)} for paper 003's noise-injected models)"
        )
    with open_dict(run_cfg):
        run_cfg.model.backbone.noise_per = str(noise_per)
    return run_cfg


def load_model(checkpoint: dict[str, Any], run_cfg: DictConfig, num_classes: int) -> Any:
    """Instantiate the checkpoint's classifier and load its weights (a zoo model: load it from
    the zoo), refusing a mismatch with the data's classes."""
    if "zoo" in checkpoint:
        net = instantiate(run_cfg.model)
        if int(net.num_classes) != num_classes:
            raise CheckpointError(f"{checkpoint['zoo']} has {net.num_classes} classes but the data has {num_classes}")
        return net.eval()
    trained_classes = int(run_cfg.data.num_classes)
    if trained_classes != num_classes:
        raise CheckpointError(f"the checkpoint's model has {trained_classes} classes but the data has {num_classes}")
    net = instantiate(run_cfg.model)
    try:
        net.load_state_dict(net_state_dict(checkpoint))
    except RuntimeError as err:
        raise CheckpointError(f"the checkpoint's weights do not fit its model config: {err}") from None
    return net.eval()


def model_input(run_cfg: DictConfig) -> tuple[int, int]:
    """``(channels, size)`` the run's model takes: ``data.image_size`` where the data config has
    one (ImageFolder, synthetic), else 32 (CIFAR-10/100, SVHN)."""
    channels, size, _ = input_shape(run_cfg.data)
    return channels, size


def load_classifier(ckpt_path: str | Path, setting: str = "ckpt_path") -> tuple[nn.Module, DictConfig]:
    """A trained run's classifier (eval mode, on the CPU) and its training config, e.g. the source
    model of a transfer attack (``setting`` names the checkpoint in errors)."""
    checkpoint, run_cfg = load_run_checkpoint(ckpt_path, setting)
    return load_model(checkpoint, run_cfg, int(run_cfg.data.num_classes)), run_cfg


def describe_model(run_cfg: DictConfig) -> str:
    if run_cfg.get("zoo"):
        return str(run_cfg.zoo)
    backbone = run_cfg.model.get("backbone", run_cfg.model)
    name = str(backbone.get("_target_", "model")).rsplit(".", 1)[-1]
    args = [f"{k}={backbone[k]}" for k in ("depth", "widen_factor", "width") if k in backbone]
    return f"{name}({', '.join(args)})" if args else name
