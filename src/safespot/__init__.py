"""safespot: preemptive adversarial robustness with PyTorch Lightning and Hydra."""

from safespot.utils.resolvers import register_resolvers

register_resolvers()

__version__ = "0.1.0"
