"""Preemptive robustification: the bi-level safe-spot search and its baselines.

The defender moves an image x_o inside ``B_delta(x_o)`` to a point x_r whose worst case under
an attacker with budget eps is still classified as the protected label (papers 000 and 002):

    x_r = argmin_{x in B_delta(x_o)} max_{x_a in B_eps(x)} CE(c(x_a), c(x_o))        (002, Eq. 2)

:class:`SafeSpotSearch` is Algorithm 1 of paper 002: the inner maximisation is T-step PGD from
a uniform random start (alpha = eps/4), repeated N times; the outer step uses the
first-order approximation of Section 3.4 (the gradient of the loss at the final x_a,
pixels clamped at 0 or 1 excluded) averaged over the N runs. For l_inf, x_r is
parameterised as ``lower + (tanh(w) + 1) / 2 * (upper - lower)`` with
``lower/upper = clamp(x_o -/+ delta, 0, 1)`` and w is updated by RMSProp (Appendix C); for
l_2, x_r takes projected gradient-descent steps. An exact second-order option (``l2`` only)
back-propagates through the unrolled inner PGD, for the ablation of the supplementary.

Baselines (paper 000, Section 4.2): :class:`NoRobustification`, :class:`SafeSpotFGSM`
(one targeted FGSM step towards the protected label) and :class:`SafeSpotPGD` (20-step
targeted PGD with step delta/4).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from safespot.attacks import PGD, attack_context, fgsm
from safespot.attacks.context import AttackMode
from safespot.defenses.quantize import project_to_8bit
from safespot.threat import LpBall, ThreatConfigError, check_positive_int, parse_budget
from safespot.utils.prediction import predict_logits

DEFAULT_BETA = {"linf": 0.1, "l2": 0.001}  # paper 002, Appendix C.1 (CIFAR-10)
_ITER_SEED_STRIDE = 104_729
_RUN_SEED_STRIDE = 7_919_003
_TANH_LIMIT = 1 - 1e-6


@dataclass
class RobustifyResult:
    """Robustified images and one record per image."""

    x_r: torch.Tensor
    protected: torch.Tensor  # the labels protected (c(x_o) by default)
    worst_loss: torch.Tensor  # worst-case loss (inner attack) at the returned x_r
    attack_succeeded: torch.Tensor  # whether the inner attack changed the prediction at x_r
    iterations: torch.Tensor  # outer iterations run per image
    early_exit: torch.Tensor  # whether the image left the search early
    distance: torch.Tensor  # ||x_r - x_o||_p
    loss_history: list[torch.Tensor] = field(default_factory=list)  # mean worst-case loss per iteration


class Robustifier:
    """Base class: protected labels, the inner worst-case check, result records."""

    norm: str
    delta: float
    eps: float
    inner_steps: int = 20
    mode: AttackMode = "eval"

    def protected_labels(
        self,
        model: nn.Module,
        x_o: torch.Tensor,
        y: torch.Tensor | None,
        protect: str,
        seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The labels to protect: ``y``, or the model's prediction ``c(x_o)`` (for a
        smoothed classifier its vote, paper 002 Section 3.6)."""
        if protect == "label":
            if y is None:
                raise ValueError("protect='label' needs the ground-truth labels")
            return y
        return predict_logits(model, x_o, seeds).argmax(1)

    def inner_attack(self) -> PGD:
        return PGD(self.norm, self.eps, steps=self.inner_steps, step_size=self.eps / 4, random_start=True)

    def worst_case(
        self, model: nn.Module, x_r: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and success of one inner attack run at ``x_r`` (records of the baselines)."""
        x_a = self.inner_attack()(model, x_r, labels, seeds=seeds)
        with torch.no_grad():
            logits = model(x_a)
        return F.cross_entropy(logits.float(), labels, reduction="none"), logits.argmax(1) != labels

    def finish(self, x_r: torch.Tensor, x_o: torch.Tensor) -> torch.Tensor:
        """The final step: project onto the 8-bit grid inside B_delta(x_o) when ``quantize``."""
        if getattr(self, "quantize", False):
            return project_to_8bit(x_r, x_o, LpBall(self.norm, self.delta))
        return x_r

    def result(
        self, model: nn.Module, x_o: torch.Tensor, x_r: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor | None
    ) -> RobustifyResult:
        x_r = self.finish(x_r, x_o)
        loss, success = self.worst_case(model, x_r, labels, seeds)
        zeros = torch.zeros(len(x_o), dtype=torch.long, device=x_o.device)
        return RobustifyResult(
            x_r.detach(), labels, loss, success, zeros, zeros.bool(), LpBall(self.norm, self.delta).distance(x_r, x_o)
        )


def _budgets(norm: str, delta: float | str, eps: float | str | None) -> tuple[float, float]:
    d = LpBall(norm, delta).eps
    return d, (d if eps is None else LpBall(norm, eps).eps)


@dataclass
class NoRobustification(Robustifier):
    """``x_r = x_o`` (the "None" column of the papers' tables)."""

    norm: str = "linf"
    delta: float | str = "8/255"
    eps: float | str | None = None
    protect: str = "prediction"
    quantize: bool = False

    def __post_init__(self) -> None:
        self.delta, self.eps = _budgets(self.norm, self.delta, self.eps)

    def __call__(
        self, model: nn.Module, x_o: torch.Tensor, y: torch.Tensor | None = None, seeds: torch.Tensor | None = None
    ) -> RobustifyResult:
        with attack_context(model, self.mode):
            labels = self.protected_labels(model, x_o, y, self.protect, seeds)
            return self.result(model, x_o, x_o.clone(), labels, seeds)


@dataclass
class SafeSpotFGSM(NoRobustification):
    """S-FGSM: one targeted FGSM step of size delta that lowers CE(c(x), protected)."""

    def __call__(
        self, model: nn.Module, x_o: torch.Tensor, y: torch.Tensor | None = None, seeds: torch.Tensor | None = None
    ) -> RobustifyResult:
        with attack_context(model, self.mode):
            labels = self.protected_labels(model, x_o, y, self.protect, seeds)
            x_r = fgsm(self.norm, self.delta, targeted=True)(model, x_o, labels, target=labels)
            return self.result(model, x_o, x_r, labels, seeds)


@dataclass
class SafeSpotPGD(NoRobustification):
    """S-PGD: ``steps``-step targeted PGD (step delta/4) descending CE(c(x), protected)."""

    steps: int = 20

    def __call__(
        self, model: nn.Module, x_o: torch.Tensor, y: torch.Tensor | None = None, seeds: torch.Tensor | None = None
    ) -> RobustifyResult:
        with attack_context(model, self.mode):
            labels = self.protected_labels(model, x_o, y, self.protect, seeds)
            attack = PGD(
                self.norm, self.delta, steps=self.steps, step_size=self.delta / 4, random_start=False, targeted=True
            )
            return self.result(model, x_o, attack(model, x_o, labels, target=labels), labels, seeds)


@dataclass
class SafeSpotSearch(Robustifier):
    """Algorithm 1 of paper 002 (see the module docstring).

    Args:
        norm, delta: the defender's ball; eps: the attacker's budget (default delta).
        max_iter: outer iterations (MAXITER = 100); inner_steps: T = 20; restarts: N = 1.
        inner_step_size: alpha (default eps/4); beta: outer step (default 0.1 for l_inf,
            0.001 for l_2, paper 002 Appendix C.1).
        init: ``original`` (x_r = x_o) or ``random`` (uniform in B_delta(x_o)).
        protect: ``prediction`` (c(x_o)) or ``label`` (ground truth).
        early_exit: leave the search once the inner attack has failed to change the
            prediction for this many consecutive iterations (``None``: never).
        second_order: exact gradient through the unrolled inner PGD (l_2 only).
        quantize: finish by projecting x_r onto the 8-bit grid inside B_delta(x_o) and
            re-checking its worst-case loss (so the saved image is the one evaluated).
        ascend: run the dynamics in reverse, *ascending* the worst-case loss and returning
            the last iterate: the original-image reconstruction of paper 002, Algorithm 3
            (use :func:`reconstruction`).
    """

    norm: str = "linf"
    delta: float | str = "8/255"
    eps: float | str | None = None
    max_iter: int = 100
    inner_steps: int = 20
    restarts: int = 1
    inner_step_size: float | str | None = None
    beta: float | str | None = None
    init: Literal["original", "random"] = "original"
    protect: Literal["prediction", "label"] = "prediction"
    early_exit: int | None = None
    second_order: bool = False
    quantize: bool = False
    ascend: bool = False
    mode: AttackMode = "eval"

    def __post_init__(self) -> None:
        self.delta, self.eps = _budgets(self.norm, self.delta, self.eps)
        for name in ("max_iter", "inner_steps", "restarts"):
            check_positive_int(getattr(self, name), name)
        if self.early_exit is not None:
            check_positive_int(self.early_exit, "early_exit")
        self.inner_step_size = (
            self.eps / 4 if self.inner_step_size is None else parse_budget(self.inner_step_size, "inner_step_size")
        )
        self.beta = DEFAULT_BETA[self.norm] if self.beta is None else parse_budget(self.beta, "beta")
        if self.init not in ("original", "random"):
            raise ThreatConfigError(f"init must be 'original' or 'random', got {self.init!r}")
        if self.protect not in ("prediction", "label"):
            raise ThreatConfigError(f"protect must be 'prediction' or 'label', got {self.protect!r}")
        if self.ascend and (self.early_exit is not None or self.quantize):
            raise ThreatConfigError("the reconstruction (ascend=True) takes neither early_exit nor quantize")
        if self.second_order and self.norm != "l2":
            raise ThreatConfigError("second_order is only defined for norm l2 (sign steps have zero derivative)")

    def inner_attack(self) -> PGD:
        return PGD(self.norm, self.eps, steps=self.inner_steps, step_size=self.inner_step_size, random_start=True)

    # --- the outer gradient ------------------------------------------------------------
    def _first_order(
        self, model: nn.Module, x_r: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean over N inner runs of grad CE at the final x_a (box-clamped pixels masked),
        the mean worst-case loss and whether any run changed the prediction."""
        inner = self.inner_attack()
        grad, loss = torch.zeros_like(x_r), torch.zeros(len(x_r), device=x_r.device)
        success = torch.zeros(len(x_r), dtype=torch.bool, device=x_r.device)
        for n in range(self.restarts):
            run_seeds = None if seeds is None else seeds + n * _RUN_SEED_STRIDE
            x_a = inner(model, x_r, labels, seeds=run_seeds).requires_grad_(True)
            logits = model(x_a)
            per_image = F.cross_entropy(logits.float(), labels, reduction="none")
            (g,) = torch.autograd.grad(per_image.sum(), x_a)
            grad += g * ((x_a > 0) & (x_a < 1))
            loss += per_image.detach()
            success |= logits.detach().argmax(1) != labels
        return grad / self.restarts, loss / self.restarts, success

    def _second_order(
        self, model: nn.Module, x_r: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact d CE(x_a^T) / d x_r through the unrolled l_2 PGD (create_graph)."""
        ball = LpBall(self.norm, self.eps)
        grad, loss = torch.zeros_like(x_r), torch.zeros(len(x_r), device=x_r.device)
        success = torch.zeros(len(x_r), dtype=torch.bool, device=x_r.device)
        for n in range(self.restarts):
            run_seeds = None if seeds is None else seeds + n * _RUN_SEED_STRIDE
            center = x_r.detach().requires_grad_(True)
            x_a = ball.random_init(center.detach(), seeds=run_seeds) - center.detach() + center
            for _ in range(self.inner_steps):
                step_loss = F.cross_entropy(model(x_a).float(), labels, reduction="sum")
                (g,) = torch.autograd.grad(step_loss, x_a, create_graph=True)
                x_a = ball.project(x_a + self.inner_step_size * ball.steepest_direction(g), center)
            logits = model(x_a)
            per_image = F.cross_entropy(logits.float(), labels, reduction="none")
            (g,) = torch.autograd.grad(per_image.sum(), center)
            grad += g
            loss += per_image.detach()
            success |= logits.detach().argmax(1) != labels
        return grad / self.restarts, loss / self.restarts, success

    # --- the search --------------------------------------------------------------------
    def __call__(
        self, model: nn.Module, x_o: torch.Tensor, y: torch.Tensor | None = None, seeds: torch.Tensor | None = None
    ) -> RobustifyResult:
        x_o = x_o.detach()
        ball = LpBall(self.norm, self.delta)
        with attack_context(model, self.mode):
            labels = self.protected_labels(model, x_o, y, self.protect, seeds)
            x_r = ball.random_init(x_o, seeds=seeds) if self.init == "random" else x_o.clone()
            if self.norm == "linf":
                lower, upper = (x_o - self.delta).clamp(0, 1), (x_o + self.delta).clamp(0, 1)
                span = upper - lower
                ratio = (2 * (x_r - lower) / span.clamp_min(1e-12) - 1).clamp(-_TANH_LIMIT, _TANH_LIMIT)
                w = torch.atanh(ratio).requires_grad_(True)
                optimizer = torch.optim.RMSprop([w], lr=self.beta)

                def from_w() -> torch.Tensor:
                    return torch.min(torch.max(lower + (torch.tanh(w) + 1) / 2 * span, lower), upper)

                x_r = from_w().detach()
            n = len(x_o)
            best_x, best_loss = x_r.clone(), torch.full((n,), torch.inf, device=x_o.device)
            best_success = torch.ones(n, dtype=torch.bool, device=x_o.device)
            iterations = torch.zeros(n, dtype=torch.long, device=x_o.device)
            streak = torch.zeros(n, dtype=torch.long, device=x_o.device)
            active = torch.ones(n, dtype=torch.bool, device=x_o.device)
            history: list[torch.Tensor] = []
            outer_grad = self._second_order if self.second_order else self._first_order
            for i in range(self.max_iter + 1):
                iter_seeds = None if seeds is None else seeds + i * _ITER_SEED_STRIDE
                grad, loss, success = outer_grad(model, x_r, labels, iter_seeds)
                history.append(loss.mean().cpu())
                better = active & (loss < best_loss) if not self.ascend else active
                best_x[better], best_loss[better], best_success[better] = x_r[better], loss[better], success[better]
                streak = torch.where(success, torch.zeros_like(streak), streak + 1)
                if self.early_exit is not None:
                    active &= streak < self.early_exit
                if i == self.max_iter or not active.any():
                    break
                grad = (-grad if self.ascend else grad) * active.view(-1, *[1] * (x_o.dim() - 1))
                iterations += active.long()
                if self.norm == "linf":
                    optimizer.zero_grad(set_to_none=False)
                    (from_w() * grad).sum().backward()
                    optimizer.step()
                    x_r = from_w().detach()
                else:
                    x_r = torch.where(
                        active.view(-1, *[1] * (x_o.dim() - 1)), ball.project(x_r - self.beta * grad, x_o), x_r
                    )
        early = (iterations < self.max_iter) & ~active
        if self.quantize:
            best_x = self.finish(best_x, x_o)
            with attack_context(model, self.mode):
                best_loss, best_success = self.worst_case(model, best_x, labels, seeds)
        return RobustifyResult(
            best_x, labels, best_loss, best_success, iterations, early, ball.distance(best_x, x_o), history
        )


def reconstruction(robustifier: object) -> SafeSpotSearch:
    """The white-box adversary's reconstruction of x_o from x_r (paper 002, Algorithm 3):
    the robustifier's dynamics and hyperparameters, started at x_r, ascending the
    worst-case loss of c(x_r) within B_delta(x_r). For a baseline robustifier the search's
    defaults are used with its norm and budgets."""
    if isinstance(robustifier, SafeSpotSearch):
        return replace(robustifier, ascend=True, init="original", protect="prediction", early_exit=None, quantize=False)
    return SafeSpotSearch(robustifier.norm, robustifier.delta, robustifier.eps, ascend=True)
