"""A logger that speaks once per job: with N processes only global rank 0 writes (as
lightning-hydra-template's ``RankedLogger``), so messages are not printed N times."""

from __future__ import annotations

import logging
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
