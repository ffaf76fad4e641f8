"""Loading checkpoints safely: ``torch.load(weights_only=True)`` only, so a checkpoint
cannot execute code; every setting it carries is stored as plain Python types."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from safespot.errors import ConfigError


class CheckpointError(ConfigError):
    """A missing, unsafe or incompatible checkpoint."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"ckpt_path={str(path)!r} was refused: it holds objects other than tensors and plain "
            f"Python types, which could run code when loaded ({first})"
        ) from None
    except Exception as err:  # corrupt or not a torch file
        raise CheckpointError(f"ckpt_path={str(path)!r} is not a readable checkpoint: {err}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"ckpt_path={str(path)!r} has no 'state_dict'; is it a Lightning checkpoint?")
    if not isinstance(checkpoint.get("safespot_config"), dict):
        raise CheckpointError(f"ckpt_path={str(path)!r} carries no run config; was it written by train.py?")
    return checkpoint


def net_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The classifier's weights (the ``net.`` entries of the module's state dict)."""
    return {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
