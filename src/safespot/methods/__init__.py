"""Training methods: LightningModules sharing :class:`ClassifierModule`."""

from safespot.methods.adversarial import AdversarialTraining, FastAdversarialTraining
from safespot.methods.base import ClassifierModule
from safespot.methods.gaussian import GaussianTraining
from safespot.methods.natural import NaturalTraining
from safespot.methods.preemptive import PreemptiveFastTraining, PreemptiveTraining
from safespot.methods.trades import TradesTraining

__all__ = [
    "AdversarialTraining",
    "ClassifierModule",
    "FastAdversarialTraining",
    "GaussianTraining",
    "NaturalTraining",
    "PreemptiveFastTraining",
    "PreemptiveTraining",
    "TradesTraining",
]
