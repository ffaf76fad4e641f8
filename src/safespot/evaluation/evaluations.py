"""Evaluations: small objects that take a batch (images, labels, dataset indices) and return
per-image fields for the records table.

Each evaluation produces the points it evaluates (the clean images, or adversarial examples),
and :meth:`Evaluation.__call__` scores them the same way for all: prediction, correctness,
cross-entropy and l_p distance to the original image, under keys ``<name>/<field>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from safespot.attacks.base import Attack, CountsQueries, check_attack
from safespot.defenses.quantize import round_trip_8bit
from safespot.defenses.robustifier import Robustifier, check_robustifier, reconstruction
from safespot.evaluation.records import sweep_name
from safespot.smoothing.smoothed import SmoothedClassifier, check_alpha
from safespot.threat import LpBall, check_positive_int, geometry, parse_budget
from safespot.utils.prediction import predict_logits
from safespot.utils.rng import derive


class Evaluation:
    """Base class. Subclasses implement :meth:`points`.

    ``requires_smoothing`` declares whether the evaluation needs a smoothed classifier
    (``smoothing.sigma``); the entry point refuses to run it without one. ``ball`` is the threat
    ball of its points when it perturbs the images (scales the difference panels), ``certify``
    the CERTIFY step it runs on its points when it has one (certified-accuracy files)."""

    requires_smoothing: bool = False
    ball: LpBall | None = None
    certify: CertifyEvaluation | None = None

    def __init__(self, name: str, norm: str = "linf") -> None:
        if not name or "/" in name:
            raise ValueError(f"evaluation name must be a non-empty string without '/', got {name!r}")
        self.name = name
        self.norm = norm

    @property
    def outputs(self) -> list[str]:
        """The names under which this evaluation writes fields (one per scored point set)."""
        return [self.name]

    @property
    def groups(self) -> dict[str, list[str]]:
        """Grey-box groups ``{robustified name: [attack names]}`` for the safe-spot rate."""
        return {}

    def points(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_target(self, num_classes: int, input_shape: tuple[int, int]) -> None:
        """Refuse a model this evaluation cannot run on (``num_classes``, ``(channels, size)`` of
        its input), before any image is evaluated; every evaluation but the transfer attack runs on
        any classifier."""

    def score(
        self,
        model: nn.Module,
        x_eval: torch.Tensor,
        x_ref: torch.Tensor,
        y: torch.Tensor,
        name: str | None = None,
        seeds: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Prediction, correctness, cross-entropy and distance to ``x_ref`` of ``x_eval``.

        A smoothed model is scored by its vote (:func:`predict_logits`), not by one noisy
        forward pass; ``seeds`` (one per image) then seed its noise."""
        return self.score_logits(predict_logits(model, x_eval, seeds), x_eval, x_ref, y, name)

    def score_logits(
        self,
        logits: torch.Tensor,
        x_eval: torch.Tensor,
        x_ref: torch.Tensor,
        y: torch.Tensor,
        name: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """:meth:`score` from already computed ``logits`` of ``x_eval``."""
        pred = logits.argmax(1)
        distance = geometry(self.norm).size(x_eval - x_ref)
        fields = {
            "pred": pred,
            "correct": pred == y,
            "loss": F.cross_entropy(logits.float(), y, reduction="none"),
            "dist": distance,
        }
        return {f"{name or self.name}/{k}": v for k, v in fields.items()}

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x_eval = self.points(model, x, y, seeds)
        return self.score(model, x_eval, x, y, seeds=seeds), x_eval


class Clean(Evaluation):
    """The unmodified test images."""

    def __init__(self, name: str = "clean", norm: str = "linf") -> None:
        super().__init__(name, norm)

    def points(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        return x


class AttackEvaluation(Evaluation):
    """Adversarial examples from any :class:`~safespot.attacks.Attack` (PGD, FGSM, AutoAttack,
    the noisy-view attacks). Every attack gets the per-image ``seeds``, which makes its records
    independent of batching; it needs a smoothed classifier when the attack declares so."""

    def __init__(self, name: str, attack: Attack) -> None:
        attack = check_attack(attack, f"evaluation {name!r}: attack")
        self.ball = LpBall(attack.norm, attack.eps)
        super().__init__(name, self.ball.norm)
        self.attack = attack
        self.requires_smoothing = attack.requires_smoothing

    def points(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        seeds: torch.Tensor,
        vote_seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attack's points; ``vote_seeds``: the seeds the caller scores them with, when they
        are not ``seeds`` (an attack that judges success by a vote judges with them)."""
        x_adv = self.attack(model, x, y, seeds=seeds, vote_seeds=vote_seeds)
        if not self.ball.contains(x_adv, x, tol=1e-5).all():
            raise RuntimeError(f"evaluation {self.name!r}: the attack left its threat model")
        return x_adv

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        fields, x_eval = super().__call__(model, x, y, seeds)
        if isinstance(self.attack, CountsQueries) and self.attack.last_queries is not None:
            fields[f"{self.name}/queries"] = self.attack.last_queries  # a black-box attack's queries per image
        return fields, x_eval


def radius_key(radius: float) -> str:
    """The field suffix for certified correctness at ``radius``: ``cert_0.25``, ``cert_1``."""
    return f"cert_{float(radius):g}"


class CertifyEvaluation(Evaluation):
    """Cohen et al.'s (2019) CERTIFY on the clean test images of a smoothed classifier
    (:class:`safespot.smoothing.SmoothedClassifier`; paper 002, Table 7).

    Fields: ``<name>/pred`` (-1 on abstention), ``<name>/correct`` (certified class is the
    label, not abstained), ``<name>/radius`` (the l_2 radius ``sigma * Phi^{-1}(pA_lower)``),
    ``<name>/pA_lower`` and, for each ``r`` in ``radii``, ``<name>/cert_<r>`` (correct with
    radius >= r); the summary's ``<name>/cert_<r>`` is then the certified accuracy at r.
    Noise is seeded by the engine's per-image seeds, so records do not depend on batching
    or on the number of processes. ``max_batch`` (optional) overrides the model's
    noisy-samples-per-pass budget during certification.
    """

    requires_smoothing = True

    def __init__(
        self,
        name: str = "certify",
        n0: int = 100,
        n: int = 100_000,
        alpha: float = 0.001,
        radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
        max_batch: int | None = None,
    ) -> None:
        super().__init__(name, "l2")
        self.n0, self.n = check_positive_int(n0, "n0"), check_positive_int(n, "n")
        self.alpha = check_alpha(alpha)
        self.radii = [parse_budget(r, "radii", allow_zero=True) for r in radii]
        self.max_batch = None if max_batch is None else check_positive_int(max_batch, "max_batch")

    def points(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        return x

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if not isinstance(model, SmoothedClassifier):
            raise ValueError(
                f"evaluation {self.name!r} certifies a smoothed classifier: set smoothing.sigma (e.g. 0.25)"
            )
        budget = model.max_batch
        model.max_batch = self.max_batch or budget
        try:
            cert = model.certify(x, n0=self.n0, n=self.n, alpha=self.alpha, seed=seeds)
        finally:
            model.max_batch = budget
        correct = cert.pred == y
        fields = {"pred": cert.pred, "correct": correct, "radius": cert.radius, "pA_lower": cert.pA_lower}
        fields.update({radius_key(r): correct & (cert.radius >= r) for r in self.radii})
        return {f"{self.name}/{k}": v for k, v in fields.items()}, x


class PreemptiveEvaluation(Evaluation):
    """Grey-box evaluation of preemptive robustification (paper 002, Section 3.1).

    The defender robustifies each test image x_o into x_r (any robustifier: none, S-FGSM,
    S-PGD, the safe-spot search); each attack then runs on x_r inside ``B_eps(x_r)``, unaware
    of the modification. Fields: ``<name>/...`` for x_r itself (distance to x_o, plus the
    robustifier's worst-case loss, iterations and early-exit flag) and ``<name>_<attack>/...``
    per attack (distance to x_r); ``<name>/protected`` holds the label the robustifier
    protected (``y`` with ``protect: label``, else the prediction c(x_o)). With ``white_box``
    settings, the white-box fields of :class:`WhiteBox` (paper 002, Algorithm 4): per eps'
    ``<name>_white_<attack>_f<frac>/...``, the paper's lowest accuracy over eps'
    ``<name>_white_<attack>/...``, the per-image unions ``<name>_white_<attack>_union/...``,
    ``<name>_white_<attack>_union_strict/correct`` and ``<name>_white_union/correct``, and
    ``<name>/recon_dist`` (reconstruction error). With ``certify`` settings (the arguments of
    :class:`CertifyEvaluation`) and a smoothed classifier, x_r is also certified:
    ``<name>_certify/...`` (certified accuracy after robustification, paper 002 Table 7).
    """

    def __init__(
        self,
        name: str,
        robustifier: Robustifier,
        attacks: Mapping[str, Attack | None] | None = None,
        white_box: dict[str, Any] | None = None,
        eight_bit: bool = False,
        certify: dict[str, Any] | None = None,
    ) -> None:
        robustifier = check_robustifier(robustifier, f"evaluation {name!r}: robustifier")
        self.ball = LpBall(robustifier.norm, robustifier.eps)
        super().__init__(name, self.ball.norm)
        self.robustifier = robustifier
        self.white_box = WhiteBox(**white_box) if white_box else None
        self.eight_bit = bool(eight_bit)
        self.certify = CertifyEvaluation(f"{name}_certify", **certify) if certify else None
        self.attacks = [
            AttackEvaluation(f"{name}_{key}", attack) for key, attack in (attacks or {}).items() if attack is not None
        ]
        white = list(self.white_box.attacks.values()) if self.white_box is not None else []
        self.requires_smoothing = self.certify is not None or any(
            a.requires_smoothing for a in [*(e.attack for e in self.attacks), *white]
        )

    @property
    def outputs(self) -> list[str]:
        white = self.white_box.outputs(self.name) if self.white_box else []
        grey = [self.name, *(a.name for a in self.attacks)]
        saved = [f"{self.name}_8bit", *(f"{self.name}_8bit{a.name[len(self.name) :]}" for a in self.attacks)]
        certified = [self.certify.name] if self.certify else []
        return [*grey, *white, *(saved if self.eight_bit else []), *certified]

    @property
    def groups(self) -> dict[str, list[str]]:
        groups = {self.name: [a.name for a in self.attacks]}
        if self.eight_bit:
            groups[f"{self.name}_8bit"] = [f"{self.name}_8bit{a.name[len(self.name) :]}" for a in self.attacks]
        return groups

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        result = self.robustifier(model, x, y, seeds=seeds)  # y: needed by ``protect: label``
        x_r = result.x_r
        fields = self.score(model, x_r, x, y, seeds=seeds)
        fields[f"{self.name}/protected"] = result.protected
        fields[f"{self.name}/worst_loss"] = result.worst_loss
        fields[f"{self.name}/iterations"] = result.iterations
        fields[f"{self.name}/early_exit"] = result.early_exit
        for k, attack in enumerate(self.attacks, start=1):
            attack_fields, _ = attack(model, x_r, y, derive(seeds, "grey_box_attack", k))
            fields.update(attack_fields)
        if self.white_box is not None:
            fields.update(self.white_box(self, model, x, x_r, y, seeds))
        if self.certify is not None:
            fields.update(self.certify(model, x_r, y, seeds)[0])
        if self.eight_bit:  # the same checks after saving x_r as an 8-bit image
            x_q = round_trip_8bit(x_r)
            fields.update(self.score(model, x_q, x, y, name=f"{self.name}_8bit", seeds=seeds))
            for k, attack in enumerate(self.attacks, start=1):
                attack_fields, _ = attack(model, x_q, y, derive(seeds, "grey_box_attack", k))
                suffix = attack.name[len(self.name) :]
                fields.update(
                    {key.replace(attack.name, f"{self.name}_8bit{suffix}", 1): v for key, v in attack_fields.items()}
                )
        return fields, x_r


def scaled_attack(attack: Attack, fraction: float) -> Attack:
    """A copy of a dataclass attack with budget ``fraction * eps`` (and, if it has a
    ``step_size`` field that is set, a step size scaled alike)."""
    if not dataclasses.is_dataclass(attack) or isinstance(attack, type):
        raise ValueError(f"white_box attacks are rescaled with dataclasses.replace; got {attack!r}")
    changes: dict[str, Any] = {"eps": attack.eps * fraction}
    has_step_size = any(f.name == "step_size" for f in dataclasses.fields(attack))
    if has_step_size and attack.step_size is not None:  # type: ignore[attr-defined]
        changes["step_size"] = attack.step_size * fraction  # type: ignore[attr-defined]
    return dataclasses.replace(attack, **changes)


class WhiteBox:
    """The adaptive white-box attack of paper 002 (Section 4, Algorithms 3 and 4).

    The adversary reconstructs x_o from x_r by running the robustification dynamics in
    reverse (:func:`safespot.defenses.reconstruction`, Algorithm 3), then attacks the
    reconstruction with budget eps' = f * eps for each fraction f (Algorithm 4). An output
    counts as an adversarial example only if it is misclassified AND lies within
    ``B_eps(x_o)`` (Definition 3, up to ``tolerance``). x_r itself is a point the adversary
    could output: a misclassified x_r inside ``B_eps(x_o)`` counts as broken at every eps'.

    Fields, for each white-box attack ``<a>`` of evaluation ``<name>`` (``out = <name>_white_<a>``):

    * ``<out>_f<frac>/{pred,correct,loss,dist,invalid}``, one set per eps' (e.g.
      ``_f0.25``): the adversary's output at that budget. ``correct`` is False when that
      output is a valid adversarial example or x_r is misclassified inside ``B_eps(x_o)``;
      ``pred``, ``loss``, ``dist`` (to x_o) describe the output that decided it (x_r when
      only x_r counts, else the attack output), so ``pred != label`` with ``correct`` True
      means an invalid example: ``invalid`` = misclassified but outside ``B_eps(x_o)``.
    * ``<out>/...``: the paper's number, the lowest accuracy over eps'. Choosing that eps' is a
      dataset-level decision, made when the records are summarised
      (:func:`safespot.evaluation.records.resolve_budget_sweeps`): ``<out>/<field>`` is
      ``<out>_f<frac*>/<field>`` at the fraction of lowest accuracy (summary
      ``<out>/fraction``), so ``<out>/acc = min_f <out>_f<frac>/acc``.
    * ``<out>_union/{pred,correct,loss,dist,invalid}``: per image, broken if broken at ANY
      eps'. Stricter than the paper (picking each image's best eps' needs x_o, which no
      adversary has); the point scored is the first valid example, else x_r when it counts,
      else the reconstruction; ``invalid`` is set when any eps' gave an invalid example.
    * ``<out>_union_strict/correct``: the union counting only examples that also lie within
      ``B_eps(x_r)`` (an adversary who must stay near the image it received).
    * ``<name>_white_union/correct``: broken by any white-box attack at any eps' (the union
      over attacks of ``<out>_union/correct``).
    """

    def __init__(
        self,
        attacks: Mapping[str, Attack | None],
        eps_fractions: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        tolerance: float = 1e-6,
    ) -> None:
        if not attacks:
            raise ValueError("white_box needs at least one attack")
        if not eps_fractions or any(not 0 < f <= 1 for f in eps_fractions):
            raise ValueError(f"white_box.eps_fractions must lie in (0, 1], got {list(eps_fractions)}")
        if len({sweep_name("", f) for f in eps_fractions}) != len(eps_fractions):
            raise ValueError(f"white_box.eps_fractions must be distinct, got {list(eps_fractions)}")
        self.attacks = {k: check_attack(a, f"white_box.attacks.{k}") for k, a in attacks.items() if a is not None}
        if "union" in self.attacks:
            raise ValueError("white_box.attacks: 'union' is reserved for the union over attacks")
        self.fractions = [float(f) for f in eps_fractions]
        self.tolerance = float(tolerance)

    def __call__(
        self,
        evaluation: PreemptiveEvaluation,
        model: nn.Module,
        x_o: torch.Tensor,
        x_r: torch.Tensor,
        y: torch.Tensor,
        seeds: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        x_hat = reconstruction(evaluation.robustifier)(model, x_r, seeds=derive(seeds, "reconstruction")).x_r
        return self.attack_reconstruction(evaluation, model, x_o, x_r, x_hat, y, seeds)

    def attack_reconstruction(
        self,
        evaluation: PreemptiveEvaluation,
        model: nn.Module,
        x_o: torch.Tensor,
        x_r: torch.Tensor,
        x_hat: torch.Tensor,
        y: torch.Tensor,
        seeds: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Algorithm 4 on a given reconstruction ``x_hat``, with the validity rule: the
        per-eps' and union fields of the class docstring (``<out>/...`` is added when the
        records are summarised)."""
        name, ball = evaluation.name, evaluation.ball
        rows = (-1, *[1] * (x_o.dim() - 1))
        radius = ball.eps + self.tolerance
        fields: dict[str, torch.Tensor] = {f"{name}/recon_dist": ball.distance(x_hat, x_o)}
        # paper 002, Figure 3: the reconstruction error in both norms, whatever the threat model's
        for norm in ("l2", "linf"):
            fields[f"{name}/recon_{norm}"] = geometry(norm).size(x_hat - x_o)
        any_broken = torch.zeros(len(x_o), dtype=torch.bool, device=x_o.device)
        # x_r itself is a candidate: a misclassified x_r inside B_eps(x_o) counts, at every eps'
        logits_r = predict_logits(model, x_r, seeds)
        r_broken = (logits_r.argmax(1) != y) & (ball.distance(x_r, x_o) <= radius)
        for k, (key, attack) in enumerate(self.attacks.items()):
            out = f"{name}_white_{key}"
            broken, broken_strict = r_broken.clone(), r_broken.clone()
            invalid = torch.zeros_like(any_broken)
            chosen = torch.where(r_broken.view(rows), x_r, x_hat)
            for j, fraction in enumerate(self.fractions):
                run = AttackEvaluation(out, scaled_attack(attack, fraction))
                # success (restarts, AutoAttack's members) judged by the vote that scores the points
                x_adv = run.attack(model, x_hat, y, seeds=derive(seeds, "white_box_attack", k, j), vote_seeds=seeds)
                logits = predict_logits(model, x_adv, seeds)
                wrong = logits.argmax(1) != y
                near_o = ball.distance(x_adv, x_o) <= radius
                near_r = ball.distance(x_adv, x_r) <= radius
                valid = wrong & near_o
                # this eps' alone (paper 002, Section 4): the attack output, or x_r when only x_r counts
                by_r = (r_broken & ~valid).view(-1, 1)
                member = sweep_name(out, fraction)
                point = torch.where(by_r.view(rows), x_r, x_adv)
                fields.update(evaluation.score_logits(torch.where(by_r, logits_r, logits), point, x_o, y, member))
                fields[f"{member}/correct"] = ~(r_broken | valid)
                fields[f"{member}/invalid"] = wrong & ~near_o
                # the per-image union over eps'
                chosen = torch.where((valid & ~broken).view(rows), x_adv, chosen)
                broken |= valid
                broken_strict |= valid & near_r
                invalid |= wrong & ~near_o
            scored = evaluation.score(model, chosen, x_o, y, name=f"{out}_union", seeds=seeds)
            scored[f"{out}_union/correct"] = ~broken
            fields.update(scored)
            fields[f"{out}_union/invalid"] = invalid
            fields[f"{out}_union_strict/correct"] = ~broken_strict
            any_broken |= broken
        fields[f"{name}_white_union/correct"] = ~any_broken
        return fields

    def outputs(self, name: str) -> list[str]:
        """Per attack: the paper's minimum over eps', one name per eps', the union and the
        strict union; then the union over attacks."""
        names = []
        for key in self.attacks:
            out = f"{name}_white_{key}"
            names += [out, *(sweep_name(out, f) for f in self.fractions), f"{out}_union", f"{out}_union_strict"]
        return [*names, f"{name}_white_union"]
