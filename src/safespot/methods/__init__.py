"""Training methods: LightningModules sharing :class:`ClassifierModule`."""

from safespot.methods.adversarial import AdversarialTraining, FastAdversarialTraining
from safespot.methods.awp import AWPTraining
from safespot.methods.base import ClassifierModule
from safespot.methods.flss import FLSSTraining
from safespot.methods.gaussian import GaussianTraining
from safespot.methods.natural import NaturalTraining
from safespot.methods.ood import OutlierExposure, SafeSpotOE
from safespot.methods.preemptive import PreemptiveFastTraining, PreemptiveTraining
from safespot.methods.trades import TradesTraining

__all__ = [
    "AWPTraining",
    "AdversarialTraining",
    "ClassifierModule",
    "FLSSTraining",
    "FastAdversarialTraining",
    "GaussianTraining",
    "NaturalTraining",
    "OutlierExposure",
    "PreemptiveFastTraining",
    "PreemptiveTraining",
    "SafeSpotOE",
    "TradesTraining",
]
