"""safespot: preemptive adversarial robustness with PyTorch Lightning and Hydra.

From Python: ``safespot.load_classifier``, ``safespot.robustify`` and ``safespot.attack``
(:mod:`safespot.api`, loaded on first use so that ``import safespot`` stays light)."""

import importlib

from safespot.utils.logging import quiet_dependencies
from safespot.utils.resolvers import register_resolvers

register_resolvers()
quiet_dependencies()

__version__ = "0.1.0"

#: the notebook API (:mod:`safespot.api`), loaded on first use
API = ("load_classifier", "robustify", "attack")


def __getattr__(name: str):  # PEP 562: the API's functions as attributes of the package
    if name in API:
        return getattr(importlib.import_module("safespot.api"), name)
    raise AttributeError(f"module 'safespot' has no attribute {name!r}")
