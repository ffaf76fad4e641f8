"""Instantiating callbacks and loggers from config groups (each entry a ``_target_``)."""

from __future__ import annotations

from typing import Any

import hydra
from hydra.errors import InstantiationException
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from safespot.errors import ConfigError


def instantiate(cfg: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets the framework's own setting errors (bad data
    root, threat, checkpoint ...) through unwrapped, so they read as one clear message."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None:
            if isinstance(cause, ConfigError):
                raise cause from None
            cause = cause.__cause__
        raise


def _entries(cfg: DictConfig | None) -> list[Any]:
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def instantiate_callbacks(cfg: DictConfig | None, trainer_cfg: Any = None) -> list[Callback]:
    """The ``callbacks`` group's callbacks, without a progress bar when ``trainer.enable_progress_bar``
    is false and without a model summary when ``trainer.enable_model_summary`` is (Lightning refuses
    them then)."""
    callbacks = _entries(cfg)
    switches = trainer_cfg or {}
    if not switches.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not switches.get("enable_model_summary", True):
        callbacks = [c for c in callbacks if not isinstance(c, ModelSummary)]
    return callbacks


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    return _entries(cfg)
