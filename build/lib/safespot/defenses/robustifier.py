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

All of them implement the :class:`Robustifier` protocol, the one way the evaluations, the OOD
detector and ``robustify.py`` call a robustifier: ``robustifier(model, x_o, y, seeds=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from safespot.attacks import PGD, attack_context, fgsm
from safespot.attacks.context import AttackMode
from safespot.defenses.quantize import project_to_8bit
from safespot.smoothing.soft import seeded_noise, smoothing_draws
from safespot.threat import (
    LpBall,
    SearchVariables,
    ThreatConfigError,
    check_budget,
    check_norm,
    check_positive_int,
    parse_budget,
)
from safespot.utils.prediction import predict_logits
from safespot.utils.rng import derive

_OUTER_NOISE = 1  # a smoothed model's noise outside the inner PGD: not the PGD's own draws (salt 0)
OUTPUTS: tuple[str, ...] = ("last", "best")


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
    output: str = "last"  # which iterate was returned: "last" (Algorithm 1) or "best"


@runtime_checkable
class Robustifier(Protocol):
    """What the framework requires of a preemptive robustifier (papers 000 and 002).

    Attributes:
        norm: the norm of both balls (``"linf"`` or ``"l2"``).
        delta: the defender's budget: ``x_r`` lies in ``B_delta(x_o) ∩ [0, 1]``.
        eps: the attacker's budget the robustifier prepares ``x_r`` for.
        protect: ``"prediction"`` (protect ``c(x_o)``) or ``"label"`` (the ground truth ``y``).
        quantize: whether ``x_r`` ends on the 8-bit grid inside ``B_delta(x_o)`` (re-checked), so
            that a saved image is the one evaluated.
    """

    norm: str
    delta: float
    eps: float
    protect: str
    quantize: bool

    def __call__(
        self, model: nn.Module, x_o: torch.Tensor, y: torch.Tensor | None = None, *, seeds: torch.Tensor | None = None
    ) -> RobustifyResult:
        """Robustify the images ``x_o`` (``y``: the labels, needed by ``protect="label"``);
        ``seeds`` (one per image) make each image's result independent of its batch."""
        ...


def check_robustifier(robustifier: object, name: str = "robustifier") -> Robustifier:
    """``robustifier`` if it implements :class:`Robustifier`, else a :class:`ThreatConfigError`
    naming the setting and the declarations it lacks."""
    if isinstance(robustifier, Robustifier):
        return robustifier
    members = ("norm", "delta", "eps", "protect", "quantize", "__call__")
    missing = [m for m in members if not hasattr(robustifier, m)]
    raise ThreatConfigError(
        f"{name} must be a robustifier (safespot.defenses.robustifier.Robustifier: callable as "
        f"robustifier(model, x_o, y, seeds=...) and declaring {list(members[:-1])}), got {robustifier!r}; "
        f"missing {missing}"
    )


class RobustifierBase:
    """Shared implementation of the robustifiers below (each implements :class:`Robustifier`):
    protected labels, the inner worst-case check, the 8-bit finish and the result records."""

    norm: str
    delta: float
    eps: float
    inner_steps: int = 20
    quantize: bool = False
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
        with seeded_noise(model, seeds, salt=_OUTER_NOISE):
            x_a = self.inner_attack()(model, x_r, labels, seeds=seeds)
            with torch.no_grad():
                logits = model(x_a)
        return F.cross_entropy(logits.float(), labels, reduction="none"), logits.argmax(1) != labels

    def finish(self, x_r: torch.Tensor, x_o: torch.Tensor) -> torch.Tensor:
        """The final step: project onto the 8-bit grid inside B_delta(x_o) when ``quantize``."""
        if self.quantize:
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
    """``(delta, eps)`` checked as budgets of the ``norm`` ball (eps defaults to delta)."""
    d = check_budget(delta, check_norm(norm), "delta")
    return d, (d if eps is None else check_budget(eps, norm, "eps"))


@dataclass
class NoRobustification(RobustifierBase):
    """``x_r = x_o`` (the "None" column of the papers' tables)."""

    norm: str = "linf"
    delta: float | str = "8/255"
    eps: float | str | None = None
    protect: str = "prediction"
    quantize: bool = False

    def __post_init__(self) -> None:
        self.delta, self.eps = _budgets(self.norm, self.delta, self.eps)

    def __call__(
        self, model: nn.Module, x_o: torch.Tensor, y: torch.Tensor | None = None, *, seeds: torch.Tensor | None = None
    ) -> RobustifyResult:
        seeds = _on(seeds, x_o)
        with attack_context(model, self.mode), smoothing_draws(model, "robustify"):
            labels = self.protected_labels(model, x_o, y, self.protect, seeds)
            return self.result(model, x_o, x_o.clone(), labels, seeds)


@dataclass
class SafeSpotFGSM(NoRobustification):
    """S-FGSM: one targeted FGSM step of size delta that lowers CE(c(x), protected)."""

    def __call__(
        self, model: nn.Module, x_o: torch.Tensor, y: torch.Tensor | None = None, *, seeds: torch.Tensor | None = None
    ) -> RobustifyResult:
        seeds = _on(seeds, x_o)
        with attack_context(model, self.mode), smoothing_draws(model, "robustify"):
            labels = self.protected_labels(model, x_o, y, self.protect, seeds)
            x_r = fgsm(self.norm, self.delta, targeted=True)(model, x_o, labels, target=labels, seeds=seeds)
            return self.result(model, x_o, x_r, labels, seeds)


@dataclass
class SafeSpotPGD(NoRobustification):
    """S-PGD: ``steps``-step targeted PGD (step delta/4) descending CE(c(x), protected)."""

    steps: int = 20

    def __call__(
        self, model: nn.Module, x_o: torch.Tensor, y: torch.Tensor | None = None, *, seeds: torch.Tensor | None = None
    ) -> RobustifyResult:
        seeds = _on(seeds, x_o)
        with attack_context(model, self.mode), smoothing_draws(model, "robustify"):
            labels = self.protected_labels(model, x_o, y, self.protect, seeds)
            attack = PGD(
                self.norm, self.delta, steps=self.steps, step_size=self.delta / 4, random_start=False, targeted=True
            )
            return self.result(model, x_o, attack(model, x_o, labels, target=labels, seeds=seeds), labels, seeds)


@dataclass
class SafeSpotSearch(RobustifierBase):
    """Algorithm 1 of paper 002 (see the module docstring).

    Args:
        norm, delta: the defender's ball; eps: the attacker's budget (default delta).
        max_iter: outer iterations (MAXITER = 100); inner_steps: T = 20; restarts: N = 1.
        inner_step_size: alpha (default eps/4); beta: outer step (default 0.1 for l_inf,
            0.001 for l_2, paper 002 Appendix C.1).
        init: ``random`` (uniform in B_delta(x_o), the default: the start point of paper 002,
            Section 3.7, that defeats the reconstruction of Figure 3, and of its authors' code)
            or ``original`` (x_r = x_o, easy to reverse). The random start is drawn from its
            own per-image stream, never the one of the first inner attack.
        protect: ``prediction`` (c(x_o)) or ``label`` (ground truth).
        output: which iterate is returned. ``last`` (the default; Algorithm 1 outputs the last
            x_r) or ``best``: among the iterates visited, first one where the inner attack
            failed, then the lowest worst-case loss (an improvement over the paper, named).
            With N > 1 restarts an iterate's loss is the worst (max) over the N inner runs and
            it counts as broken when any run broke it.
        early_exit: leave the search once the inner attack has failed to change the
            prediction for this many consecutive iterations (``None``: never). An image that
            leaves early returns an iterate where the inner attack failed (with ``quantize``,
            one whose re-check after quantisation failed too, else it is not reported as an
            early exit).
        second_order: exact gradient through the unrolled inner PGD (l_2 only).
        quantize: finish by projecting x_r onto the 8-bit grid inside B_delta(x_o) and
            re-checking its worst-case loss (so the saved image is the one evaluated).
        ascend: run the dynamics in reverse, *ascending* the worst-case loss and returning
            the last iterate: the original-image reconstruction of paper 002, Algorithm 3
            (use :func:`reconstruction`).
        active_batch: most images searched at once (``None``: all given). Finished images
            leave the active set and waiting ones take their rows (active-set compaction), so
            with ``early_exit`` the device stays full of images still being searched.
    """

    norm: str = "linf"
    delta: float | str = "8/255"
    eps: float | str | None = None
    max_iter: int = 100
    inner_steps: int = 20
    restarts: int = 1
    inner_step_size: float | str | None = None
    beta: float | str | None = None
    init: Literal["original", "random"] = "random"
    protect: Literal["prediction", "label"] = "prediction"
    output: Literal["last", "best"] = "last"
    early_exit: int | None = None
    second_order: bool = False
    quantize: bool = False
    ascend: bool = False
    active_batch: int | None = None
    mode: AttackMode = "eval"

    def __post_init__(self) -> None:
        self.delta, self.eps = _budgets(self.norm, self.delta, self.eps)
        for name in ("max_iter", "inner_steps", "restarts"):
            check_positive_int(getattr(self, name), name)
        if self.active_batch is not None:
            check_positive_int(self.active_batch, "active_batch")
        if self.early_exit is not None:
            check_positive_int(self.early_exit, "early_exit")
        self.inner_step_size = (
            self.eps / 4 if self.inner_step_size is None else parse_budget(self.inner_step_size, "inner_step_size")
        )
        ball = LpBall(self.norm, self.delta)
        self.beta = ball.search_beta if self.beta is None else parse_budget(self.beta, "beta")
        if self.init not in ("original", "random"):
            raise ThreatConfigError(f"init must be 'original' or 'random', got {self.init!r}")
        if self.output not in OUTPUTS:
            raise ThreatConfigError(f"output must be one of {list(OUTPUTS)}, got {self.output!r}")
        if self.protect not in ("prediction", "label"):
            raise ThreatConfigError(f"protect must be 'prediction' or 'label', got {self.protect!r}")
        if self.ascend and (self.early_exit is not None or self.quantize):
            raise ThreatConfigError("the reconstruction (ascend=True) takes neither early_exit nor quantize")
        if self.second_order and not ball.smooth_steps:
            raise ThreatConfigError("second_order is only defined for norm l2 (sign steps have zero derivative)")

    def inner_attack(self) -> PGD:
        return PGD(self.norm, self.eps, steps=self.inner_steps, step_size=self.inner_step_size, random_start=True)

    # --- the outer gradient ------------------------------------------------------------
    def _first_order(
        self, model: nn.Module, x_r: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean over N inner runs of grad CE at the final x_a (box-clamped pixels masked),
        the worst (max) loss over the runs and whether any run changed the prediction."""
        grad, loss = torch.zeros_like(x_r), torch.full((len(x_r),), -torch.inf, device=x_r.device)
        success = torch.zeros(len(x_r), dtype=torch.bool, device=x_r.device)
        for n in range(self.restarts):
            g, run_loss, run_success = self._inner_run(
                model, x_r, labels, None if seeds is None else derive(seeds, "inner_run", n)
            )
            grad += g
            loss = torch.maximum(loss, run_loss)
            success |= run_success
        return grad / self.restarts, loss, success

    def _inner_run(
        self, model: nn.Module, x_r: torch.Tensor, labels: torch.Tensor, run_seeds: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One inner run: T-step PGD from a seeded random start in B_eps(x_r), then the CE gradient
        at its end (box-clamped pixels masked), its loss and whether it changed the prediction."""
        with seeded_noise(model, run_seeds, salt=_OUTER_NOISE):  # a smoothed model's noise per image
            x_a = self.inner_attack()(model, x_r, labels, seeds=run_seeds).requires_grad_(True)
            logits = model(x_a)
        per_image = F.cross_entropy(logits.float(), labels, reduction="none")
        (g,) = torch.autograd.grad(per_image.sum(), x_a)
        return g * ((x_a > 0) & (x_a < 1)), per_image.detach(), logits.detach().argmax(1) != labels

    def _second_order(
        self, model: nn.Module, x_r: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact d CE(x_a^T) / d x_r through the unrolled l_2 PGD (create_graph)."""
        ball = LpBall(self.norm, self.eps)
        grad, loss = torch.zeros_like(x_r), torch.full((len(x_r),), -torch.inf, device=x_r.device)
        success = torch.zeros(len(x_r), dtype=torch.bool, device=x_r.device)
        for n in range(self.restarts):
            run_seeds = None if seeds is None else derive(seeds, "inner_run", n)
            center = x_r.detach().requires_grad_(True)
            x_a = ball.random_init(center.detach(), seeds=run_seeds) - center.detach() + center
            with seeded_noise(model, run_seeds, salt=_OUTER_NOISE):
                for _ in range(self.inner_steps):
                    step_loss = F.cross_entropy(model(x_a).float(), labels, reduction="sum")
                    (g,) = torch.autograd.grad(step_loss, x_a, create_graph=True)
                    x_a = ball.project(x_a + self.inner_step_size * ball.steepest_direction(g), center)
                logits = model(x_a)
            per_image = F.cross_entropy(logits.float(), labels, reduction="none")
            (g,) = torch.autograd.grad(per_image.sum(), center)
            grad += g
            loss = torch.maximum(loss, per_image.detach())
            success |= logits.detach().argmax(1) != labels
        return grad / self.restarts, loss, success

    # --- the search --------------------------------------------------------------------
    def __call__(
        self, model: nn.Module, x_o: torch.Tensor, y: torch.Tensor | None = None, *, seeds: torch.Tensor | None = None
    ) -> RobustifyResult:
        """Robustify ``x_o`` (protecting ``y`` or ``c(x_o)``); ``seeds`` (one per image, moved to
        the images' device) make each image's result independent of the batch it is searched in.

        The images are searched in an active set of at most ``active_batch`` rows: an image
        leaves it when it is done (MAXITER reached, or ``early_exit``) and the next waiting
        image takes its row, so that no model evaluation is spent on finished images.
        """
        x_o = x_o.detach()
        n, device = len(x_o), x_o.device
        seeds = _on(seeds, x_o)
        y = None if y is None else y.to(device)
        with attack_context(model, self.mode), smoothing_draws(model, "robustify"):
            labels = torch.cat(
                [
                    self.protected_labels(
                        model, x_o[rows], None if y is None else y[rows], self.protect, _at(seeds, rows)
                    )
                    for rows in self._row_chunks(n, device)
                ]
            )
            out = _Outcome.empty(x_o, self.max_iter)
            outer_grad = self._second_order if self.second_order else self._first_order
            capacity = n if self.active_batch is None else self.active_batch
            waiting = torch.arange(n, device=device)
            pool: _Pool | None = None
            rounds = 0  # outer iterations of the current pool (fixed schedule)
            while pool is not None or len(waiting):
                if len(waiting) and (pool is None or len(pool) < capacity):
                    free = capacity - (0 if pool is None else len(pool))
                    joining = self._start(x_o, labels, seeds, waiting[:free])
                    waiting = waiting[free:]
                    pool = joining if pool is None else pool.join(joining)
                assert pool is not None
                iter_seeds = None if pool.seeds is None else derive(pool.seeds, "outer_iteration", pool.it)
                grad, loss, success = outer_grad(model, pool.x_r, pool.labels, iter_seeds)
                out.record_history(pool.it, loss)
                pool.keep(loss, success, "last" if self.ascend else self.output)
                pool.streak = torch.where(success, torch.zeros_like(pool.streak), pool.streak + 1)
                if self.early_exit is None:  # the pool's images are all at the same iteration:
                    rounds += 1  # decide on the host, without a device sync
                    if rounds > self.max_iter:
                        out.finish(pool, None, self.max_iter)
                        pool, rounds = None, 0
                        continue
                else:
                    done = (pool.it >= self.max_iter) | (pool.streak >= self.early_exit)
                    if done.any():
                        out.finish(pool, done, self.max_iter)
                        keep = ~done
                        if not keep.any():
                            pool = None
                            continue
                        pool, grad = pool.select(keep), grad[keep]
                self._step(pool, -grad if self.ascend else grad)
            if self.quantize:
                out.x = self.finish(out.x, x_o)
                for rows in self._row_chunks(n, device):
                    out.loss[rows], out.success[rows] = self.worst_case(
                        model, out.x[rows], labels[rows], _at(seeds, rows)
                    )
                out.early &= ~out.success  # never "done early" with a broken returned image
        return RobustifyResult(
            out.x,
            labels,
            out.loss,
            out.success,
            out.iterations,
            out.early,
            LpBall(self.norm, self.delta).distance(out.x, x_o),
            out.history(fixed_schedule=self.early_exit is None),
            "last" if self.ascend else self.output,
        )

    def _row_chunks(self, n: int, device: torch.device) -> list[torch.Tensor]:
        size = n if self.active_batch is None else self.active_batch
        return list(torch.arange(n, device=device).split(max(size, 1)))

    def _start(self, x_o: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor | None, rows: torch.Tensor) -> _Pool:
        """Initial search state of the images ``rows`` (x_r = x_o or uniform in B_delta(x_o))."""
        origin = x_o[rows]
        ball = LpBall(self.norm, self.delta)
        row_seeds = _at(seeds, rows)
        x_r = (
            ball.random_init(origin, seeds=None if row_seeds is None else derive(row_seeds, "search_start"))
            if self.init == "random"
            else origin.clone()
        )
        zeros = torch.zeros(len(rows), dtype=torch.long, device=x_o.device)
        return _Pool(
            index=rows,
            x_o=origin,
            labels=labels[rows],
            seeds=row_seeds,
            x_r=x_r,
            var=ball.search_variables(x_r, origin),  # x_r stays exactly the start point
            best_x=x_r.clone(),
            best_loss=torch.full((len(rows),), torch.inf, device=x_o.device),
            best_success=torch.ones(len(rows), dtype=torch.bool, device=x_o.device),
            it=zeros,
            streak=zeros.clone(),
        )

    def _step(self, pool: _Pool, grad: torch.Tensor) -> None:
        """One outer update of every image in ``pool`` along ``-grad``, as the ball defines it
        (:meth:`safespot.threat.LpBall.search_update`): RMSProp on the tanh box variable for
        l_inf (paper 002, Appendix C), a projected gradient step for l_2."""
        pool.it += 1
        pool.x_r = LpBall(self.norm, self.delta).search_update(pool.x_r, pool.var, grad, self.beta)


@dataclass
class _Pool:
    """The active set of :meth:`SafeSpotSearch.__call__`: one row per image being searched."""

    index: torch.Tensor  # row of each image in the caller's batch
    x_o: torch.Tensor
    labels: torch.Tensor
    seeds: torch.Tensor | None
    x_r: torch.Tensor
    var: SearchVariables  # the outer update's variables (the tanh box for l_inf)
    best_x: torch.Tensor
    best_loss: torch.Tensor
    best_success: torch.Tensor
    it: torch.Tensor  # outer iterations taken
    streak: torch.Tensor  # consecutive iterations without a successful inner attack

    def __len__(self) -> int:
        return len(self.index)

    def keep(self, loss: torch.Tensor, success: torch.Tensor, output: str) -> None:
        """Remember the iterate just evaluated: always (``last``), or (``best``) when the inner
        attack failed on it and not on the kept one, or both agree and its loss is lower."""
        if output == "last":
            better = torch.ones_like(success)
        else:
            better = (~success & self.best_success) | ((success == self.best_success) & (loss < self.best_loss))
        self.best_x = torch.where(better.view(-1, *[1] * (self.x_r.dim() - 1)), self.x_r, self.best_x)
        self.best_loss = torch.where(better, loss, self.best_loss)
        self.best_success = torch.where(better, success, self.best_success)

    def _map(self, fn: Callable[..., torch.Tensor], other: _Pool | None = None) -> _Pool:
        values: dict[str, object] = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), None if other is None else getattr(other, f.name)
            if mine is None:
                values[f.name] = None
            elif isinstance(mine, SearchVariables):
                values[f.name] = mine.map(fn, theirs)
            else:
                values[f.name] = fn(mine) if other is None else fn(mine, theirs)
        return _Pool(**values)

    def select(self, keep: torch.Tensor) -> _Pool:
        return self._map(lambda t: t[keep])

    def join(self, other: _Pool) -> _Pool:
        return self._map(lambda a, b: torch.cat([a, b]), other)


@dataclass
class _Outcome:
    """The per-image results of :meth:`SafeSpotSearch.__call__`, filled as images finish, and
    the loss history (kept on the images' device: no host sync per iteration)."""

    x: torch.Tensor
    loss: torch.Tensor
    success: torch.Tensor
    iterations: torch.Tensor
    early: torch.Tensor
    hist_sum: torch.Tensor
    hist_count: torch.Tensor

    @classmethod
    def empty(cls, x_o: torch.Tensor, max_iter: int) -> _Outcome:
        n, device = len(x_o), x_o.device
        return cls(
            x=x_o.clone(),
            loss=torch.zeros(n, device=device),
            success=torch.zeros(n, dtype=torch.bool, device=device),
            iterations=torch.zeros(n, dtype=torch.long, device=device),
            early=torch.zeros(n, dtype=torch.bool, device=device),
            hist_sum=torch.zeros(max_iter + 1, device=device),
            hist_count=torch.zeros(max_iter + 1, device=device),
        )

    def record_history(self, it: torch.Tensor, loss: torch.Tensor) -> None:
        self.hist_sum.index_add_(0, it, loss.detach().float())
        self.hist_count.index_add_(0, it, torch.ones_like(loss, dtype=torch.float32))

    def finish(self, pool: _Pool, done: torch.Tensor | None, max_iter: int) -> None:
        """Store the images of ``pool`` marked ``done`` (``None``: all of them)."""
        if done is not None:
            pool = pool.select(done)
        rows = pool.index
        self.x[rows], self.loss[rows], self.success[rows] = pool.best_x, pool.best_loss, pool.best_success
        self.iterations[rows], self.early[rows] = pool.it, pool.it < max_iter

    def history(self, fixed_schedule: bool) -> list[torch.Tensor]:
        """Mean worst-case loss per iteration over the images that reached it (with a fixed
        schedule all of them reach every iteration: no device sync)."""
        seen = len(self.hist_count) if fixed_schedule else int((self.hist_count > 0).sum())
        return list((self.hist_sum / self.hist_count.clamp_min(1))[:seen].unbind())


def _on(seeds: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """Per-image seeds on the images' device (row indices created there index them)."""
    return None if seeds is None else torch.as_tensor(seeds, dtype=torch.long).to(like.device)


def _at(seeds: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if seeds is None else seeds[rows]


def reconstruction(robustifier: Robustifier) -> SafeSpotSearch:
    """The white-box adversary's reconstruction of x_o from x_r (paper 002, Algorithm 3):
    the robustifier's dynamics and hyperparameters, started at x_r, ascending the
    worst-case loss of c(x_r) within B_delta(x_r). For a baseline robustifier the search's
    defaults are used with its norm and budgets."""
    if isinstance(robustifier, SafeSpotSearch):
        return replace(robustifier, ascend=True, init="original", protect="prediction", early_exit=None, quantize=False)
    return SafeSpotSearch(robustifier.norm, robustifier.delta, robustifier.eps, ascend=True, init="original")
