"""Instantiating callbacks and loggers from config groups (each entry a ``_target_``)."""

from __future__ import annotations

from typing import Any

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig


def _entries(cfg: DictConfig | None) -> list[Any]:
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    return _entries(cfg)


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    return _entries(cfg)
