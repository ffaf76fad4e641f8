"""AutoAttack (Croce & Hein, 2020) through the maintained ``pyautoattack`` package.

AutoAttack is the ensemble of Croce & Hein, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks" (ICML 2020): APGD on the cross-entropy
loss, targeted APGD on the DLR loss, targeted FAB and the black-box Square attack
(``standard``), or APGD-CE and APGD-DLR with expectation over transformation for randomised
defences (``rand``). An image counts as broken when any member breaks it.

This module does not reimplement the attacks. :class:`AutoAttack` wraps
``pyautoattack.AutoAttack`` and adds what the framework needs around it: budgets and norms
validated by :class:`safespot.threat.LpBall`, outputs projected back into
``B_eps(x) ∩ [0, 1]``, no parameter gradients and the model's modes restored
(:func:`safespot.attacks.context.attack_context`), the number of target classes adapted to
models with fewer than ten classes, determinism without touching the caller's random state,
and a quiet package when ``verbose`` is off.

Smoothed (voting) models. The package decides which images are broken, and so which images
its later members still attack and which points it returns, with ``get_logits(x).argmax``
(its runner calls it on the whole batch for the clean accuracy and, after each member, on the
points of the images still robust). On a model that predicts by a vote
(:func:`safespot.utils.prediction.has_vote`, e.g. :class:`safespot.smoothing.SmoothedClassifier`)
one forward pass is one noisy soft estimate, so a "success" on noise would stop the later
members for that image although the evaluation's vote still classifies it correctly. The
adapter therefore answers the package's ``get_logits`` with the vote, seeded by the image
seeds (:class:`VoteJudge`; the evaluation scores the returned points with the same vote and
seeds), instead of re-checking the outputs afterwards: an image counts as broken only when the
vote says so, and then the next members still attack the others. The members themselves still
follow their own per-iterate bookkeeping on the forward pass (APGD keeps its best point by the
noisy estimate; ``rand``'s ``eot_iter`` averages gradients), which is the package's attack as
published.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pyautoattack import AutoAttack as _PackageAutoAttack
from pyautoattack import checks as _package_checks
from torch import nn

from safespot.attacks.context import attack_context
from safespot.smoothing.soft import unseeded_noise
from safespot.threat import LpBall, ThreatConfigError, check_positive_int
from safespot.utils.prediction import has_vote, predict_logits
from safespot.utils.rng import streams

VERSIONS: tuple[str, ...] = ("standard", "rand")
ATTACK_NAMES: tuple[str, ...] = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
#: The members of each version, in the order the package runs them.
VERSION_ATTACKS: dict[str, tuple[str, ...]] = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
#: Target classes of APGD-T and FAB-T in the standard version (for ten or more classes).
STANDARD_TARGET_CLASSES = 9
_PACKAGE_NORMS = {"linf": "Linf", "l2": "L2"}
_PACKAGE_LOGGER = "auto-attack"


@dataclass
class AutoAttack:
    """AutoAttack on the shared threat model (implements :class:`safespot.attacks.Attack`).

    Args:
        norm, eps: the threat model (see :class:`safespot.threat.LpBall`); ``eps`` may be a
            fraction string such as ``"8/255"``.
        version: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square) or ``"rand"`` (APGD-CE and
            APGD-DLR with ``eot_iter`` gradient samples, for randomised defences).
        seed: seed of every random start and of Square's random search; two calls on the
            same model and inputs return identical images, and the caller's global RNG is left
            as it was.
        attacks: run only these members (e.g. ``["apgd-ce"]``) with the version's settings;
            ``None`` runs the whole version. Names: ``apgd-ce``, ``apgd-dlr``, ``fab``,
            ``square``, ``apgd-t``, ``fab-t``.
        n_iter: iterations of APGD, APGD-T and FAB (100 in the published versions).
        square_queries: query budget of Square (5000 in the standard version).
        eot_iter: gradient samples per APGD step in the ``rand`` version (20 there); unused
            by ``standard``.
        verbose: let the package report progress through the ``auto-attack`` logger; when
            off only its sanity-check warnings (randomised or dynamic defence, probabilities
            instead of logits, Square beating the gradient attacks) get through.

    The model is attacked in eval mode and must return logits for images in [0, 1]. Images
    that are misclassified already, or that no member breaks, are returned unchanged. A model
    that predicts by a vote is judged by its vote (see the module docstring).
    """

    norm: str
    eps: float | str
    version: str = "standard"
    seed: int = 0
    attacks: Sequence[str] | None = None
    n_iter: int = 100
    square_queries: int = 5000
    eot_iter: int = 20
    verbose: bool = False
    ball: LpBall = field(init=False, repr=False)
    targeted: ClassVar[bool] = False  # the members' targets are their own (APGD-T, FAB-T)
    requires_smoothing: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.ball = LpBall(self.norm, self.eps)  # validates norm and eps
        self.norm, self.eps = self.ball.norm, self.ball.eps
        if self.version not in VERSIONS:
            raise ThreatConfigError(f"version must be one of {list(VERSIONS)}, got {self.version!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ThreatConfigError(f"seed must be an integer, got {self.seed!r}")
        check_positive_int(self.n_iter, "n_iter")
        check_positive_int(self.square_queries, "square_queries")
        check_positive_int(self.eot_iter, "eot_iter")
        if self.attacks is not None:
            names = [self.attacks] if isinstance(self.attacks, str) else [str(a) for a in self.attacks]
            unknown = [a for a in names if a not in ATTACK_NAMES]
            if not names or unknown or len(set(names)) != len(names):
                raise ThreatConfigError(
                    f"attacks must be a non-empty list of distinct names from {list(ATTACK_NAMES)}, "
                    f"got {self.attacks!r}"
                )
            self.attacks = names

    @property
    def attacks_to_run(self) -> list[str]:
        """The members that run, in order."""
        return list(self.attacks) if self.attacks is not None else list(VERSION_ATTACKS[self.version])

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        seeds: torch.Tensor | None = None,
        vote_seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return detached adversarial examples for images ``x`` in [0, 1] with labels ``y``.

        The whole batch is attacked at once on the device of ``x`` (the model must live
        there too). On a voting model success is judged by the vote seeded with
        ``vote_seeds`` (one per image; the seeds the caller scores the points with), else
        ``seeds``, else seeds derived from ``seed`` and the position in the batch. Neither
        changes the package's own random draws, which come from ``seed``.
        """
        x = x.detach()
        y = y.detach().to(device=x.device, dtype=torch.long)
        if x.shape[0] == 0:
            return x.clone()
        with (
            attack_context(model, "eval"),
            _package_output(self.verbose),
            _forked_rng(x.device),
            unseeded_noise(model),  # the package passes subsets of the batch through the model
        ):
            with torch.no_grad():
                num_classes = model(x[:1]).shape[-1]
            adversary = self.adversary(model, num_classes, x.device)
            if has_vote(model):
                judge_seeds = self.vote_seeds(x, seeds if vote_seeds is None else vote_seeds)
                adversary.get_logits = VoteJudge(model, y, judge_seeds)
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=x.shape[0])
        return self.ball.project(x_adv.detach(), x)

    def vote_seeds(self, x: torch.Tensor, seeds: torch.Tensor | None) -> torch.Tensor:
        """Per-image seeds of the vote that judges success: ``seeds``, or ``seed``-derived."""
        if seeds is not None:
            return torch.as_tensor(seeds).to(device=x.device, dtype=torch.int64).reshape(-1)
        return streams(self.seed, torch.arange(len(x), device=x.device), "autoattack_vote")

    def adversary(self, model: nn.Module, num_classes: int, device: torch.device | str = "cpu") -> _PackageAutoAttack:
        """The configured ``pyautoattack.AutoAttack`` for a model with ``num_classes`` logits.

        The package object is always built as a ``custom`` version and given the settings of
        the chosen version explicitly (the package's own ``_set_version`` for Linf and L2),
        so that a subset of members runs exactly as it would inside the full version.
        """
        attacks = self.attacks_to_run
        self._check_num_classes(num_classes, attacks)
        adversary = _PackageAutoAttack(
            model,
            attacks=attacks,
            device=device,
            eps=self.eps,
            norm=_PACKAGE_NORMS[self.norm],
            seed=self.seed,
            version="custom",
        )
        adversary.verbose = self.verbose
        adversary.version = self.version  # after construction: the package skips its randomness check for "rand"
        # Version settings (pyautoattack.AutoAttack._set_version, Linf/L2): one restart each.
        adversary.apgd.n_restarts = 1
        adversary.apgd_targeted.n_restarts = 1
        adversary.fab.n_restarts = 1
        targets = min(STANDARD_TARGET_CLASSES, num_classes - 1)
        adversary.apgd_targeted.n_target_classes = targets
        adversary.fab.n_target_classes = targets
        adversary.square.n_queries = self.square_queries
        adversary.fab.n_iter = self.n_iter
        eot_iter = self.eot_iter if self.version == "rand" else 1
        for apgd in (adversary.apgd, adversary.apgd_targeted):
            _set_apgd_iterations(apgd, self.n_iter)
            apgd.eot_iter = eot_iter
        return adversary

    @staticmethod
    def _check_num_classes(num_classes: int, attacks: list[str]) -> None:
        if num_classes < 2:
            raise ValueError(f"AutoAttack needs a model with at least 2 classes, got {num_classes}")
        needs = {"apgd-dlr": 3, "apgd-t": 4}  # the (targeted) DLR loss reads the 3rd (4th) largest logit
        for name, minimum in needs.items():
            if name in attacks and num_classes < minimum:
                raise ValueError(
                    f"attacks: {name} needs at least {minimum} classes, the model has {num_classes}; "
                    f"choose a subset without it, e.g. attacks=['apgd-ce', 'fab-t', 'square']"
                )


class VoteJudge:
    """The package's ``get_logits`` answered by the model's vote (:func:`predict_logits`).

    ``pyautoattack``'s runner (``run_standard_evaluation`` with ``batch_size`` the whole
    batch, as :class:`AutoAttack` calls it) asks ``get_logits`` about the whole batch (its
    sanity checks and the clean accuracy) and, after each member, about the points of the
    images it still counts as robust, in batch order. The judge mirrors those robust flags to
    know which images, hence which seeds and labels, each call is about, and refuses any other
    call pattern instead of guessing.
    """

    def __init__(self, model: nn.Module, y: torch.Tensor, seeds: torch.Tensor) -> None:
        if len(seeds) != len(y):
            raise ValueError(f"expected {len(y)} per-image seeds, got {len(seeds)}")
        self.model, self.y, self.seeds = model, y, seeds
        self.robust = torch.ones(len(y), dtype=torch.bool, device=y.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows: torch.Tensor | None = None
        if len(x) != len(self.y):
            rows = self.robust.nonzero().squeeze(1)
            if len(rows) != len(x):
                raise RuntimeError(
                    f"AutoAttack vote judge: a call with {len(x)} points matches neither the batch "
                    f"({len(self.y)}) nor the {len(rows)} images still robust; pyautoattack's runner changed?"
                )
        seeds = self.seeds if rows is None else self.seeds[rows]
        labels = self.y if rows is None else self.y[rows]
        logits = predict_logits(self.model, x, seeds)
        wrong = logits.argmax(1) != labels
        if rows is None:
            self.robust = ~wrong
        else:
            self.robust[rows[wrong]] = False
        return logits


def _set_apgd_iterations(apgd: object, n_iter: int) -> None:
    """Set an APGD attack's iterations and the step-size checkpoints derived from them.

    The package derives the checkpoint schedule (Croce & Hein, 2020, Section 3.2) from
    ``n_iter`` in the constructor only, so assigning ``n_iter`` alone would keep the
    schedule of 100 iterations.
    """
    apgd.n_iter = n_iter
    apgd.n_iter_orig = n_iter
    apgd.n_iter_2 = max(int(0.22 * n_iter), 1)
    apgd.n_iter_min = max(int(0.06 * n_iter), 1)
    apgd.size_decr = max(int(0.03 * n_iter), 1)


@contextmanager
def _package_output(verbose: bool) -> Iterator[None]:
    """Quiet the package's logger unless ``verbose`` and undo its global side effects.

    ``pyautoattack.checks.check_dynamic`` installs a tracing function and then calls
    ``sys.settrace(None)``, which would switch off a debugger or coverage tracer; the
    previous one is reinstalled on exit. Its call counters are module-global and never
    reset, so one dynamic model would flag every later model; they are reset per call.
    """
    logger = logging.getLogger(_PACKAGE_LOGGER)
    level = logger.level
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    tracer = sys.gettrace()
    for name in _package_checks.funcs:
        _package_checks.funcs[name] = 0
    try:
        yield
    finally:
        logger.setLevel(level)
        if sys.gettrace() is not tracer:
            sys.settrace(tracer)


def _forked_rng(device: torch.device) -> AbstractContextManager[None]:
    """Fork the CPU RNG and the CUDA RNGs the package may reseed.

    The package calls ``torch.random.manual_seed(seed)`` and ``torch.cuda.manual_seed(seed)``
    (global state) before every attack.
    """
    devices: set[int] = set()
    if torch.cuda.is_available():
        if device.type == "cuda":
            devices.add(device.index if device.index is not None else torch.cuda.current_device())
        if torch.cuda.is_initialized():
            devices.add(torch.cuda.current_device())
    return torch.random.fork_rng(devices=sorted(devices), device_type="cuda")
