"""Fail-fast checks of a composed config, run before anything is instantiated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from safespot.data.base import per_process_batch_size
from safespot.errors import ConfigError
from safespot.threat import ThreatConfigError, check_budget, check_norm, parse_budget
from safespot.utils.performance import refuse_float16


def input_shape(data: Any) -> tuple[int, int, int]:
    """``(C, H, W)`` of a data config's images: ``channels`` and ``image_size`` where it has them
    (ImageFolder, synthetic), else 3 x 32 x 32 (CIFAR-10/100, SVHN)."""
    channels, size = int(data.get("channels", 3) or 3), int(data.get("image_size", 32) or 32)
    return channels, size, size


def check_threat(threat: Any, prefix: str = "threat", image_shape: tuple[int, int, int] | None = None) -> None:
    """Norm in {linf, l2}, eps > 0, step_size > 0 and steps >= 1, each named on failure; eps at
    most the largest distance of two images (:func:`safespot.threat.check_budget`: 1 for l_inf,
    ``sqrt(C H W)`` of ``image_shape`` for l_2)."""
    try:
        norm = check_norm(threat.get("norm"))
    except ThreatConfigError as err:
        raise ConfigError(f"{prefix}.{err}") from None
    check_budget(threat.get("eps"), norm, f"{prefix}.eps", image_shape)
    if threat.get("step_size") is not None:
        try:
            parse_budget(threat.get("step_size"), "step_size")
        except ThreatConfigError as err:
            raise ConfigError(f"{prefix}.{err}") from None
    steps = threat.get("steps", 1)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"{prefix}.steps must be an integer >= 1, got {steps!r}")


def world_size(trainer_cfg: Any) -> int | None:
    """Processes the trainer config will start, or ``None`` when it cannot be known yet."""
    devices, nodes = trainer_cfg.get("devices", 1), trainer_cfg.get("num_nodes", 1) or 1
    if isinstance(devices, str):
        return int(devices) * nodes if devices.isdigit() else None
    if isinstance(devices, int):
        return devices * nodes if devices > 0 else None
    try:
        return len(devices) * nodes
    except TypeError:
        return None


def check_batch_size(cfg: DictConfig) -> None:
    processes = world_size(cfg.trainer)
    if processes is None:
        return
    for key in ("batch_size", "eval_batch_size"):
        value = cfg.data.get(key)
        if value is not None:
            try:
                per_process_batch_size(int(value), processes, f"data.{key}")
            except ValueError as err:
                raise ConfigError(str(err)) from None


def check_eval_subsets(cfg: DictConfig, splits: tuple[str, ...] = ("val", "test")) -> None:
    """Every process evaluates at least one image (:class:`safespot.data.samplers.ShardSampler`):
    refuse a ``data.{split}_subset`` (or, for ``val``, a ``data.val_size``) smaller than the
    processes the trainer config starts, before they start."""
    processes = world_size(cfg.trainer)
    if processes is None or processes < 2:
        return
    for split in splits:
        key = f"{split}_subset"
        value = cfg.data.get(key)
        if value is None and split == "val":
            key, value = "val_size", cfg.data.get("val_size")
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < processes:
            raise ConfigError(
                f"data.{key}={value} is fewer images than the {processes} processes of the trainer, and "
                f"every process evaluates at least one: use at least {processes} images or fewer devices"
            )


def check_file(path: str | None, name: str) -> None:
    if path is None:
        return
    if Path(path).is_dir():
        raise ConfigError(f"{name}={path!r} is a directory, not a checkpoint file")
    if not Path(path).is_file():
        raise ConfigError(f"{name}={path!r} does not exist")


_ATTACK_FREE_METHODS = ("safespot.methods.NaturalTraining", "safespot.methods.OutlierExposure")


def method_runs_attacks(method: Any) -> bool:
    """Whether a method config attacks the network anywhere: a training attack (every method but
    natural training and Outlier Exposure) or a validation/test PGD."""
    if method.get("_target_") not in _ATTACK_FREE_METHODS:
        return True
    return method.get("val_attack") is not None or method.get("test_attack") is not None


def check_train_config(cfg: DictConfig) -> None:
    check_threat(cfg.threat, image_shape=input_shape(cfg.data))
    check_batch_size(cfg)
    check_eval_subsets(cfg, ("val", "test") if cfg.get("test", True) else ("val",))
    check_file(cfg.get("ckpt_path"), "ckpt_path")
    check_file(cfg.get("init_from"), "init_from")
    if cfg.get("ckpt_path") and cfg.get("init_from"):
        raise ConfigError("give ckpt_path (resume a run) or init_from (fine-tune its weights), not both")
    if method_runs_attacks(cfg.method):
        refuse_float16(cfg.trainer.get("precision", "32-true"), "trainer.precision", "training that runs attacks")
    check_one_step_per_batch(cfg)


#: methods that change the weights around the optimiser step of each batch (AWP's perturbation)
_ONE_STEP_PER_BATCH = ("safespot.methods.AWPTraining",)


def check_one_step_per_batch(cfg: DictConfig) -> None:
    """Refuse gradient accumulation for a method that perturbs the weights for each batch's step."""
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1) or 1
    if cfg.method.get("_target_") in _ONE_STEP_PER_BATCH and accumulate != 1:
        raise ConfigError(
            f"method {cfg.method.get('_target_')} perturbs the weights for the one optimiser step of each "
            f"batch: trainer.accumulate_grad_batches must be 1, got {accumulate}"
        )
