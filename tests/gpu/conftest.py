"""The device of the ``cuda`` suite and the hook that skips it where there is none.

``SAFESPOT_TEST_DEVICE`` picks the device (default ``cuda``; ``cuda:N`` for another GPU).
``SAFESPOT_TEST_DEVICE=cpu`` runs the same tests on the CPU (bf16 as CPU autocast): a dry run
of the suite on a machine without a GPU. Otherwise ``cuda``-marked tests are skipped when
``torch.cuda.is_available()`` is false, so the default ``pytest`` run passes without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

ENV = "SAFESPOT_TEST_DEVICE"


def selected_device() -> torch.device:
    """The device named by ``SAFESPOT_TEST_DEVICE`` (``cuda``, ``cuda:N`` or ``cpu``)."""
    name = os.environ.get(ENV, "cuda").strip().lower() or "cuda"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise pytest.UsageError(f"{ENV} must be cuda, cuda:N or cpu, got {name!r}") from None
    if device.type not in ("cuda", "cpu"):
        raise pytest.UsageError(f"{ENV} must be cuda, cuda:N or cpu, got {name!r}")
    return device


def unavailable_reason(device: torch.device) -> str | None:
    if device.type == "cpu":
        return None
    if not torch.cuda.is_available():
        return f"CUDA is not available (set {ENV}=cpu for a dry run on the CPU)"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"{ENV}={device} but only {torch.cuda.device_count()} CUDA device(s) are visible"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    reason = unavailable_reason(selected_device())
    if reason is not None:
        skip = pytest.mark.skip(reason=reason)
        for item in marked:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return selected_device()
