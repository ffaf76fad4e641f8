"""A logger that speaks once per job: with N processes only global rank 0 writes (as
lightning-hydra-template's ``RankedLogger``), so messages are not printed N times."""

from __future__ import annotations

import logging
import warnings
from collections.abc import MutableMapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_only


class RankedLogger(logging.LoggerAdapter):
    """``logging.getLogger(name)`` that drops records on every rank but 0 (the rank Lightning
    sets in ``rank_zero_only.rank``, from the launcher's environment)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.getLogger(name), {})

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if getattr(rank_zero_only, "rank", 0) == 0:
            super().log(level, msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return msg, kwargs


def get_logger(name: str) -> RankedLogger:
    return RankedLogger(name)


#: messages of the dependencies a user can do nothing about: advertisements for other products and
#: notes on the framework's own callback choices
UNACTIONABLE = ("💡 Tip:", "Trainer already configured with model summary callbacks")
#: deprecation warnings raised inside the dependencies (not by the user's code or settings)
DEPENDENCY_WARNINGS = (r".*isinstance\(treespec, LeafSpec\).*",)


class _DropUnactionable(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(text) for text in UNACTIONABLE)


def quiet_dependencies() -> None:
    """Drop the dependencies' messages a user cannot act on (:data:`UNACTIONABLE`,
    :data:`DEPENDENCY_WARNINGS`); every warning about the user's own settings stays."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropUnactionable) for f in logger.filters):
            logger.addFilter(_DropUnactionable())
    for message in DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
