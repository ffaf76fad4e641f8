"""Preemptive defences: the safe-spot search (paper 002, Algorithm 1) and its baselines."""

from safespot.defenses.robustifier import (
    NoRobustification,
    Robustifier,
    RobustifierBase,
    RobustifyResult,
    SafeSpotFGSM,
    SafeSpotPGD,
    SafeSpotSearch,
    reconstruction,
)

__all__ = [
    "NoRobustification",
    "Robustifier",
    "RobustifierBase",
    "RobustifyResult",
    "SafeSpotFGSM",
    "SafeSpotPGD",
    "SafeSpotSearch",
    "reconstruction",
]
