"""Attacks built on the shared threat model (:mod:`safespot.threat`), all implementing the one
:class:`Attack` interface (:mod:`safespot.attacks.base`)."""

from safespot.attacks.autoattack import AutoAttack
from safespot.attacks.base import (
    Attack,
    AttackFactory,
    AttackSpec,
    CountsQueries,
    attack_config,
    build_attack,
    check_attack,
)
from safespot.attacks.context import attack_context
from safespot.attacks.gama import GAMA
from safespot.attacks.losses import get_loss
from safespot.attacks.multitargeted import MultiTargetedPGD
from safespot.attacks.nattack import NAttack
from safespot.attacks.noisy_view import NoisyViewAttack, VotingNoisyView
from safespot.attacks.pgd import PGD, fgsm, fgsm_rs
from safespot.attacks.safe_spot import SafeSpotStep
from safespot.attacks.trades import TradesKL, trades_kl

__all__ = [
    "GAMA",
    "PGD",
    "Attack",
    "AttackFactory",
    "AttackSpec",
    "AutoAttack",
    "CountsQueries",
    "MultiTargetedPGD",
    "NAttack",
    "NoisyViewAttack",
    "SafeSpotStep",
    "TradesKL",
    "VotingNoisyView",
    "attack_config",
    "attack_context",
    "build_attack",
    "check_attack",
    "fgsm",
    "fgsm_rs",
    "get_loss",
    "trades_kl",
]
