"""Loading a run: the checkpoint (safely), its stored config, the model, the data overrides and
the device. The evaluation, robustification and OOD commands all start here; no entry module
imports another."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from safespot.errors import ConfigError
from safespot.utils.checkpoint import CheckpointError, load_checkpoint, net_state_dict
from safespot.utils.checks import check_threat
from safespot.utils.instantiate import instantiate


def _merge_set(base: DictConfig, overrides: DictConfig | None) -> DictConfig:
    """``base`` with every non-null entry of ``overrides`` written over it."""
    merged = OmegaConf.create(OmegaConf.to_container(base, resolve=True))
    for key, value in (overrides or {}).items():
        if value is not None:
            merged[key] = value
    return merged


def load_run_settings(cfg: DictConfig) -> tuple[dict[str, Any], DictConfig, DictConfig]:
    """Load ``cfg.ckpt_path`` safely and return ``(checkpoint, run_cfg, data_cfg)``: the
    training run's config stored in the checkpoint, its data config with the non-null
    ``cfg.data`` entries written over it, and ``cfg.threat`` completed from the checkpoint's
    threat model (checked), all before any data is read."""
    checkpoint = load_checkpoint(cfg.ckpt_path)
    run_cfg = OmegaConf.create(checkpoint["safespot_config"])
    data_cfg = _merge_set(run_cfg.data, cfg.get("data"))
    threat = _merge_set(run_cfg.threat, cfg.get("threat"))
    check_threat(threat)
    with open_dict(cfg):
        cfg.threat.norm, cfg.threat.eps = threat.norm, threat.eps
    return checkpoint, run_cfg, data_cfg


def load_model(checkpoint: dict[str, Any], run_cfg: DictConfig, num_classes: int) -> Any:
    """Instantiate the checkpoint's classifier and load its weights, refusing a mismatch."""
    trained_classes = int(run_cfg.data.num_classes)
    if trained_classes != num_classes:
        raise CheckpointError(f"the checkpoint's model has {trained_classes} classes but the data has {num_classes}")
    net = instantiate(run_cfg.model)
    try:
        net.load_state_dict(net_state_dict(checkpoint))
    except RuntimeError as err:
        raise CheckpointError(f"the checkpoint's weights do not fit its model config: {err}") from None
    return net.eval()


def describe_model(run_cfg: DictConfig) -> str:
    backbone = run_cfg.model.get("backbone", run_cfg.model)
    name = str(backbone.get("_target_", "model")).rsplit(".", 1)[-1]
    args = [f"{k}={backbone[k]}" for k in ("depth", "widen_factor", "width") if k in backbone]
    return f"{name}({', '.join(args)})" if args else name


def resolve_device(name: Any) -> torch.device:
    """``auto``: cuda if available, else cpu; otherwise any device torch knows and has."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(name))
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available (use device=auto or cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name!r} but MPS is not available (use device=auto or cpu)")
    return device
