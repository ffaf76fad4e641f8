"""The one interface every attack implements, and the helpers that build attacks from configs.

An attack maps a batch of images ``x`` in [0, 1] with labels ``y`` to adversarial examples inside
``B_eps(x) ∩ [0, 1]`` (Madry et al., 2018: the inner maximisation of the robust loss). The
framework calls every attack the same way, ``attack(model, x, y, seeds=..., vote_seeds=...)``,
and reads what it needs from attributes each attack *declares* (:class:`Attack`), never from
its call signature:

* ``seeds``: one integer per image. An attack that draws random numbers (random starts, the
  noise of a smoothed or noisy model) draws them from per-image streams, so an image's result
  does not depend on its batch or the DDP rank (:func:`safespot.smoothing.seeded_noise`); an
  attack that has its own seed (AutoAttack) may ignore them for its draws.
* ``vote_seeds``: the seeds of the vote that judges success on a model that predicts by a vote
  (:func:`safespot.utils.prediction.has_vote`; paper 002, Appendix C.2: points are scored by
  the smoothed vote): pass the seeds the caller scores the returned points with when they
  differ from ``seeds`` (default: ``seeds``). Attacks that never judge success ignore them.

Configs. ``conf/attack/`` holds one ``_target_`` config per attack; evaluations compose them
through their defaults lists, and methods take them as ``_partial_: true`` configs, which
Hydra instantiates into a :class:`functools.partial` (an :data:`AttackFactory`) that the
method calls (:func:`build_attack`). A method records the attack's *config* with its
hyperparameters (:func:`attack_config`), so checkpoints hold plain data only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from safespot.threat import ThreatConfigError
from safespot.utils.plain import to_plain


@runtime_checkable
class Attack(Protocol):
    """What the framework requires of an attack (PGD, FGSM, AutoAttack, the noisy-view attacks).

    Attributes:
        norm: ``"linf"`` or ``"l2"``, the norm of the threat model.
        eps: the budget (a float): outputs lie in ``B_eps(x) ∩ [0, 1]``.
        targeted: whether the attack moves towards target labels (given as its own ``target``
            argument, as :class:`~safespot.attacks.PGD` takes them) rather than away from ``y``;
            evaluations and detectors run untargeted attacks.
        requires_smoothing: whether the attack needs a smoothed classifier to attack (the
            evaluation then refuses to run without ``smoothing.sigma``).
    """

    norm: str
    eps: float
    targeted: bool
    requires_smoothing: bool

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        seeds: torch.Tensor | None = None,
        vote_seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Detached adversarial examples of ``x`` (see the module docstring for the seeds)."""
        ...


@runtime_checkable
class CountsQueries(Protocol):
    """A black-box attack that counts the model queries it spent on each image of its last call
    (``last_queries``, one integer per image; the evaluation records them as ``<name>/queries``)."""

    last_queries: torch.Tensor | None


#: A partially applied attack (Hydra's ``_partial_: true``): called, it returns the attack.
AttackFactory = Callable[..., Attack]
#: What a method accepts for an attack setting: an attack, a factory, or (the settings of
#: earlier configs) a plain mapping of PGD settings, or ``None`` for none.
AttackSpec = Attack | AttackFactory | Mapping[str, Any] | None

_MEMBERS: tuple[str, ...] = ("norm", "eps", "targeted", "requires_smoothing")


def check_attack(attack: object, name: str = "attack") -> Attack:
    """``attack`` if it implements :class:`Attack`, else a :class:`ThreatConfigError` naming
    the setting and the declarations it lacks."""
    if isinstance(attack, Attack):
        return attack
    missing = [m for m in (*_MEMBERS, "__call__") if not hasattr(attack, m)]
    raise ThreatConfigError(
        f"{name} must be an attack (safespot.attacks.Attack: callable as attack(model, x, y, seeds=..., "
        f"vote_seeds=...) and declaring {list(_MEMBERS)}), got {attack!r}; missing {missing}"
    )


def build_attack(spec: Attack | AttackFactory | None, name: str = "attack") -> Attack | None:
    """The attack a setting stands for: ``None`` stays ``None``; a factory (a
    :class:`functools.partial`, as Hydra's ``_partial_: true`` produces) is called; an attack is
    used as it is. Either way the result must implement :class:`Attack` (``name`` names the
    setting in the error)."""
    if spec is None:
        return None
    return check_attack(spec() if isinstance(spec, functools.partial) else spec, name)


def _qualified_name(target: Any) -> str:
    return f"{target.__module__}.{target.__qualname__}"


def _plain(value: Any) -> Any:
    """Attack settings as plain data (nested attacks as their configs)."""
    value = to_plain(value)  # OmegaConf containers
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, functools.partial) or dataclasses.is_dataclass(value):
        return attack_config(value)
    return value


def attack_config(spec: Any) -> dict[str, Any] | None:
    """The plain config an attack setting was built from (for hyperparameters and checkpoints,
    which hold no callables): ``None`` for ``None``; a mapping as given; for a factory
    ``{"_target_": ..., "_partial_": True, **its keyword arguments}``; for a dataclass attack
    ``{"_target_": ..., **its init fields}`` (as found after validation)."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return _plain(spec)
    if isinstance(spec, functools.partial):
        if spec.args:
            raise ThreatConfigError(f"an attack factory takes keyword arguments only, got {spec!r}")
        return {"_target_": _qualified_name(spec.func), "_partial_": True, **_plain(spec.keywords)}
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        fields = {f.name: _plain(getattr(spec, f.name)) for f in dataclasses.fields(spec) if f.init}
        return {"_target_": _qualified_name(type(spec)), **fields}
    raise ThreatConfigError(f"cannot record the config of {spec!r}: give a config, a factory or a dataclass attack")
