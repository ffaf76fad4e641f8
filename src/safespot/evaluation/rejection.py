"""Evaluation with rejection (Addepalli et al., 2021, "Boosting Adversarial Robustness using
Feature Level Stochastic Smoothing", paper 004, Sections 4.3-4.4 and 5.1-5.2).

:class:`RejectionEvaluation` runs an ensemble of attacks on every test image and records, for the
clean image and each attack's output, the prediction, its correctness and a *confidence score*
under one or more *views* of the classifier:

* ``ns``: the no-sampling prediction ``argmax C(x, 0)`` of an FLSS model, or ``argmax c(x)`` of a
  deterministic one, with the maximum softmax probability as its score: confidence thresholding,
  the paper's rejection rule for the PGD-AT, TRADES and AWP baselines (Section 5.1, after Stutz et
  al.);
* ``vote``: the majority vote over ``n_samples`` latent draws (N = 100; only the MLP head runs per
  draw, Section 4.3) with the share of draws voting for it as its score, so that an image is
  rejected when that share is below the threshold ``f``;
* ``mean``: the argmax of the mean softmax over the same draws, with its mean probability as the
  score (the "sample mean" rejection the paper compares the vote with).

Thresholds are not fixed here: the per-image records hold the scores, and
:mod:`safespot.evaluation.rejection_metrics` calibrates the threshold on the clean scores and
computes the worst-case metrics of the paper's Eqs. 3-8 over the attacks.

Record fields, for each point set ``p`` (``clean`` and every attack key, plus ``<key>_ns`` for
the attacks run on the no-sampling classifier when ``attack_ns``) and view ``v``:
``<name>_<p>_<v>/pred``, ``/correct`` and ``/score``; and ``<name>_<p>/dist`` (distance of the
attacked image to the clean one). The summary's ``<name>_<p>_<v>/acc`` are the accuracies
without rejection.

Attacks run on the model as it is: on an FLSS model every forward pass draws a fresh latent
sample (at the test-time scale ``sd_scale``), so gradient attacks are randomised and
``PGD(eot=k)`` / AutoAttack's ``rand`` version with ``eot_iter`` average gradients over draws
(expectation over transformation; paper 004, Section 5.5).

Seeds. Point set ``k`` (0 the clean image, then the attacks, then the attacks on ``C(x, 0)``) is
attacked with the per-image seeds ``derive(seeds, "rejection_attack", k)`` and scored by the views
with ``derive(seeds, "rejection_view", k)`` (:mod:`safespot.utils.rng`). The latent draws inside a
seeded attack (PGD, GAMA, the multi-targeted attacks) come from the images' own streams
(:func:`safespot.smoothing.seeded_noise`), and so do the views' draws: those records depend neither
on the batch nor on the number of processes. AutoAttack's members draw from the package's
generator, seeded per batch (docs/evaluation.md). An attack that judges success by a vote
(restarts, target runs, AutoAttack's runner) judges it with the vote the points are scored with:
the vote view's seeds and its ``n_samples`` draws (:meth:`StochasticClassifier.votes`), or
``C(x, 0)`` for the attacks on the no-sampling classifier.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack

import torch
import torch.nn.functional as F
from torch import nn

from safespot.attacks.base import Attack
from safespot.evaluation.evaluations import AttackEvaluation, Evaluation
from safespot.models.stochastic import is_stochastic, vote_shares
from safespot.threat import LpBall, check_positive_int, geometry
from safespot.utils.rng import derive

VIEWS: tuple[str, ...] = ("ns", "vote", "mean")
SAMPLING_VIEWS: tuple[str, ...] = ("vote", "mean")


def check_views(views: Sequence[str]) -> list[str]:
    names = [views] if isinstance(views, str) else [str(v) for v in views]
    unknown = [v for v in names if v not in VIEWS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"views must be a non-empty list of distinct names from {list(VIEWS)}, got {views!r}")
    return names


@torch.no_grad()
def view_predictions(
    model: nn.Module, x: torch.Tensor, views: Sequence[str], n_samples: int = 100, seeds: torch.Tensor | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{view: (prediction, score)}`` for images ``x`` (see the module docstring).

    On an FLSS model the encoder runs once and the head on ``n_samples`` draws
    (:meth:`safespot.models.StochasticClassifier.sample_logits`), shared by the ``vote`` and
    ``mean`` views; a deterministic model supports the ``ns`` view only. Vote ties go to the
    lowest class index.
    """
    views = check_views(views)
    stochastic = is_stochastic(model)
    sampling = [v for v in views if v in SAMPLING_VIEWS]
    if sampling and not stochastic:
        raise ValueError(
            f"views {sampling} sample the latent of an FLSS model (safespot.models.StochasticClassifier); "
            f"a deterministic {type(model).__name__} has the 'ns' view (confidence thresholding) only"
        )
    if sampling:
        ns_logits, logits = model.sample_logits(x, n_samples, seeds)
    else:
        ns_logits, logits = (model.head(model.encode(x)[0]) if stochastic else model(x)), None
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for view in views:
        if view == "ns":
            confidence, pred = F.softmax(ns_logits.float(), dim=-1).max(-1)
        elif view == "vote":
            confidence, pred = vote_shares(logits).max(-1)
        else:
            confidence, pred = F.softmax(logits.float(), dim=-1).mean(1).max(-1)
        out[view] = (pred, confidence)
    return out


class RejectionEvaluation(Evaluation):
    """Attacks scored with rejection views (paper 004, Sections 4.3-4.4).

    Args:
        name: prefix of every output (no ``/``).
        attacks: ``{key: attack}``, each an :class:`~safespot.attacks.Attack` (PGD with ce / cw
            / dlr loss and ``eot``, AutoAttack members such as ``apgd-ce`` and ``apgd-dlr``, GAMA-PGD,
            GAMA-MT, MultiTargeted PGD), called with per-image seeds; ``None`` entries are skipped.
        views: any of ``ns``, ``vote``, ``mean`` (sampling views need an FLSS model).
        n_samples: latent draws of the sampling views (paper 004: N = 100).
        sd_scale: test-time scale of the latent standard deviation for attacks and views (paper
            004: SD = 1 or 2); ``None`` keeps the model's.
        attack_ns: also run attacks on the no-sampling classifier ``C(x, 0)`` (outputs
            ``<key>_ns``), a deterministic surrogate whose adversarial examples join the
            ensemble: ``True`` for every attack, or a list of attack keys (expectation over
            transformation is pointless there); FLSS models only.
    """

    def __init__(
        self,
        name: str = "rejection",
        attacks: Mapping[str, Attack | None] | None = None,
        views: Sequence[str] = ("ns",),
        n_samples: int = 100,
        sd_scale: float | None = None,
        attack_ns: bool | Sequence[str] = False,
    ) -> None:
        members = {str(k): a for k, a in (attacks or {}).items() if a is not None}
        first = next(iter(members.values()), None)
        self.ball = LpBall(first.norm, first.eps) if first is not None else None
        super().__init__(name, self.ball.norm if self.ball is not None else "linf")
        self.views = check_views(views)
        self.n_samples = check_positive_int(n_samples, "n_samples")
        if sd_scale is not None and not float(sd_scale) >= 0:
            raise ValueError(f"sd_scale must be >= 0, got {sd_scale}")
        self.sd_scale = None if sd_scale is None else float(sd_scale)
        self.attacks = {key: AttackEvaluation(f"{name}_{key}", attack) for key, attack in members.items()}
        if isinstance(attack_ns, bool):
            self.ns_attacks = list(self.attacks) if attack_ns else []
        else:
            self.ns_attacks = [str(k) for k in attack_ns]
            unknown = [k for k in self.ns_attacks if k not in self.attacks]
            if unknown:
                raise ValueError(f"evaluation {name!r}: attack_ns names unknown attacks {unknown}")
        for key, attack in self.attacks.items():
            if attack.ball.norm != self.norm:
                raise ValueError(f"evaluation {name!r}: attack {key!r} uses norm {attack.ball.norm}, not {self.norm}")
        self.requires_smoothing = any(a.requires_smoothing for a in self.attacks.values())

    @property
    def point_sets(self) -> list[str]:
        """``clean``, the attack keys, then ``<key>_ns`` for the attacks run on ``C(x, 0)``."""
        return ["clean", *self.attacks, *(f"{k}_ns" for k in self.ns_attacks)]

    @property
    def outputs(self) -> list[str]:
        return [f"{self.name}_{p}_{v}" for p in self.point_sets for v in self.views]

    def _check_model(self, model: nn.Module) -> None:
        if not is_stochastic(model):
            needs = [v for v in self.views if v in SAMPLING_VIEWS]
            if needs or self.ns_attacks or self.sd_scale is not None:
                raise ValueError(
                    f"evaluation {self.name!r}: views {needs}, attack_ns and sd_scale need an FLSS model "
                    f"(model=flss_*); for a deterministic classifier use views=[ns], attack_ns=false, sd_scale=null"
                )

    @staticmethod
    def view_seeds(seeds: torch.Tensor, point: int) -> torch.Tensor:
        """The seeds of the views that score point set number ``point`` (0: the clean image, then
        the attacks in :attr:`point_sets` order)."""
        return derive(seeds, "rejection_view", point)

    def _attack(
        self, attack: AttackEvaluation, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor, k: int
    ) -> torch.Tensor:
        """Point set ``k``: the attack's outputs, drawn with the seeds ``derive(seeds,
        "rejection_attack", k)``, its success judged (a vote judges it on an FLSS model: restarts,
        target runs, AutoAttack's runner) with the seeds of the views that score the set."""
        return attack.points(model, x, y, derive(seeds, "rejection_attack", k), vote_seeds=self.view_seeds(seeds, k))

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        self._check_model(model)
        with ExitStack() as stack:
            if is_stochastic(model):
                stack.enter_context(model.scaled(self.sd_scale))
                stack.enter_context(model.votes(self.n_samples))  # the vote that judges is the vote view's
            points: dict[str, torch.Tensor] = {"clean": x}
            for k, (key, attack) in enumerate(self.attacks.items(), start=1):
                points[key] = self._attack(attack, model, x, y, seeds, k)
            if self.ns_attacks:
                with model.no_sampling():
                    for k, key in enumerate(self.ns_attacks, start=len(self.attacks) + 1):
                        points[f"{key}_ns"] = self._attack(self.attacks[key], model, x, y, seeds, k)
            fields: dict[str, torch.Tensor] = {}
            for j, (point, x_p) in enumerate(points.items()):
                if point != "clean":
                    fields[f"{self.name}_{point}/dist"] = geometry(self.norm).size(x_p - x)
                scored = view_predictions(model, x_p, self.views, self.n_samples, self.view_seeds(seeds, j))
                for view, (pred, score) in scored.items():
                    prefix = f"{self.name}_{point}_{view}"
                    fields[f"{prefix}/pred"] = pred
                    fields[f"{prefix}/correct"] = pred == y
                    fields[f"{prefix}/score"] = score.float()
        return fields, points[list(points)[-1]]
