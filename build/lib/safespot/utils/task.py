"""Running a Hydra task: the start-of-run extras, fail-fast config checks and closing loggers
whatever happens."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from omegaconf import DictConfig

from safespot.errors import ConfigError
from safespot.utils.extras import extras
from safespot.utils.logging import get_logger

log = get_logger("safespot")
T = TypeVar("T")


def close_loggers() -> None:
    """Finish the wandb run if one is open (also after a failure, and between the jobs of a
    multirun, where an open run would otherwise swallow the next job's metrics)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def task_wrapper(fn: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
    """Run the extras switched on in ``cfg.extras`` (e.g. print the config tree), then
    ``fn(cfg)``; always close loggers; log (and re-raise) failures."""

    @functools.wraps(fn)
    def wrapped(cfg: DictConfig) -> T:
        try:
            extras(cfg)
            return fn(cfg)
        except Exception as err:
            log.error("%s failed: %s", fn.__name__, err)
            raise
        finally:
            close_loggers()

    return wrapped


def report_config_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """For command-line entry points: print a :class:`ConfigError` (the base of every setting
    error) as one line and exit with status 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapped
