"""Training methods: LightningModules sharing :class:`ClassifierModule`."""

from safespot.methods.adversarial import AdversarialTraining, FastAdversarialTraining
from safespot.methods.base import ClassifierModule
from safespot.methods.natural import NaturalTraining

__all__ = ["AdversarialTraining", "ClassifierModule", "FastAdversarialTraining", "NaturalTraining"]
