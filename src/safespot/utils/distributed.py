"""Collectives shared by the commands' epoch-end and writer hooks (evaluation, robustification, OOD)."""

from __future__ import annotations

from typing import Any

import torch


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every process in rank order (:func:`torch.distributed.all_gather_object`),
    in every process; ``[obj]`` without a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
