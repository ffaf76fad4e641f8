"""safespot: preemptive adversarial robustness with PyTorch Lightning and Hydra."""

from safespot.utils.logging import quiet_dependencies
from safespot.utils.resolvers import register_resolvers

register_resolvers()
quiet_dependencies()

__version__ = "0.1.0"
