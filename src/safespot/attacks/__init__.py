"""Attacks built on the shared threat model (:mod:`safespot.threat`)."""

from safespot.attacks.autoattack import AutoAttack
from safespot.attacks.context import attack_context
from safespot.attacks.losses import get_loss
from safespot.attacks.pgd import PGD, fgsm, fgsm_rs

__all__ = ["PGD", "AutoAttack", "attack_context", "fgsm", "fgsm_rs", "get_loss"]
