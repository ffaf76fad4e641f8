"""Differentiable views of a Gaussian-smoothed classifier, and where their noise comes from.

``g(x) = argmax_y P(c(x + xi) = y)``, ``xi ~ N(0, sigma^2 I)`` (Cohen et al., 2019) is not
differentiable. Attacks and the robustifier therefore use the *soft* smoothed classifier of
Salman et al. (2019), ``C~(x) = E_xi[softmax(c(x + xi))]`` (paper 002, Eq. 3), estimated with
``m`` noise draws: :class:`SoftSmoothed` returns ``log C~(x)`` as its "logits", so the
cross-entropy any attack computes on it is the soft smoothed loss
``-log mean_m softmax(c(x + xi_m))_y`` and its input gradient is the gradient of the mean.
:class:`NoisyClassifier` adds one fresh draw per forward pass; averaging its gradients over
``m`` passes (``PGD(eot=m)``) is EPGD, the mean of gradients of paper 003 (Eq. 25).

Noise sources. Outside any context both modules draw from the global torch RNG (as before).
Inside :func:`seeded_noise` (``with seeded_noise(model, seeds): ...``) every module of ``model``
that holds a :class:`NoiseSeeding` draws from per-image counter-based streams
(:func:`safespot.utils.rng.seeded_normal_at`) on the images' device: image ``i``'s noise at the
``t``-th forward pass of the block depends only on ``(seeds[i], t)`` (and the context's
``salt``), never on the other images of the batch, their order, or the DDP rank. Attacks
(:class:`safespot.attacks.PGD`) open this context with their per-image seeds; the ``t``
counter gives every step and every EOT pass its own draws.

Noise shared by a forward pass. A noise-injected network with ``noise_per=forward`` (paper 003:
one weight draw per forward pass, :mod:`safespot.models.noise_injection`) asks instead for one
draw per *pass* (:meth:`NoiseSeeding.pass_keys`, :meth:`NoiseSeeding.pass_normal`): the images of
a call form one pass (a batch repeated ``k`` times, as a smoothed classifier's ``m`` noisy copies,
is ``k`` passes), seeded by the first image's seed, or by the ``passes`` keys of
:func:`seeded_noise` (the smoothed vote: draw ``j`` of every image of the batch is one pass).
Such draws depend on which images share a pass, i.e. on the batching, as in the paper.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from safespot.threat import ThreatConfigError, check_positive_int, parse_budget
from safespot.utils.rng import derive, seeded_normal_at

_MAX_WORDS = 2**25  # numbers hashed at once by NoiseSeeding.normal (256 MiB per int64 temporary)
DrawRole = Literal["robustify", "attack"]
DRAW_ROLES: tuple[str, ...] = ("robustify", "attack")


class NoiseSeeding:
    """Where a stochastic module's noise comes from: the global RNG (``seeds is None``), or,
    inside :func:`seeded_noise`, per-image seeded streams with a per-forward counter.

    A module takes part by holding one as its ``noise_seeding`` attribute and asking
    :meth:`normal` (one draw per image) or :meth:`pass_keys` / :meth:`pass_normal` (one draw per
    forward pass) for its draws when :attr:`active`.
    """

    def __init__(self) -> None:
        self.seeds: torch.Tensor | None = None
        self.calls = 0
        self.salt = 0
        self.passes: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return self.seeds is not None

    def state(self) -> tuple[torch.Tensor | None, int, int, torch.Tensor | None]:
        return self.seeds, self.calls, self.salt, self.passes

    def restore(self, state: tuple[torch.Tensor | None, int, int, torch.Tensor | None]) -> None:
        self.seeds, self.calls, self.salt, self.passes = state

    def _seeds_on(self, rows: int, device: torch.device) -> torch.Tensor:
        """The context's seeds on ``device`` (moved once per context), checked against a call of
        ``rows`` rows: the seeded images, or whole copies of them."""
        if self.seeds is None:
            raise RuntimeError("NoiseSeeding draws need seeds: use them inside seeded_noise(...)")
        if self.seeds.device != torch.device(device):
            self.seeds = self.seeds.to(device)  # once per context: the seeds then live on the images' device
        n_seeds = len(self.seeds)
        if n_seeds == 0 or rows % n_seeds:
            raise ValueError(
                f"seeded noise: a batch of {rows} rows for {n_seeds} per-image seeds "
                "(the batch must be the seeded images, or whole copies of them)"
            )
        return self.seeds

    def normal(self, rows: int, count: int, purpose: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``(rows, count)`` standard normal draws for the next forward pass (counter ``t``).

        With ``S`` seeds, ``rows`` must be a multiple ``k * S``; row ``r`` belongs to image
        ``r % S`` and takes elements ``(r // S) * count ..`` of that image's stream
        ``derive(seed, purpose, salt, t)`` (:func:`safespot.utils.rng.derive`; ``purpose`` names
        the noise source, e.g. ``"soft_noise"``)
        (a batch repeated ``k`` times, as a smoothed classifier's ``m * B`` noisy copies, gives
        each copy its own draws). Not valid outside :func:`seeded_noise`.
        """
        seeds = self._seeds_on(rows, device)
        n_seeds = len(seeds)
        keys = derive(seeds, purpose, self.salt, self.calls)
        self.calls += 1
        copies = rows // n_seeds
        keys = keys if copies == 1 else keys.repeat(copies)
        starts = torch.arange(copies, device=device).repeat_interleave(n_seeds) * count
        return _stream_pieces(keys, starts, count, device, dtype)

    def pass_keys(self, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The forward passes among a call's ``rows`` rows, for noise every image of a pass shares:
        ``(keys, which)``, one key per pass and the pass of every row. Row ``r`` (image ``r % S``,
        copy ``r // S``) belongs to the pass of its image's ``passes`` key (:func:`seeded_noise`)
        and its copy; without ``passes`` every image of the call shares one key (the first
        image's seed), so the ``k`` copies are the passes, in order, and ``which`` is ``None``."""
        seeds = self._seeds_on(rows, device)
        copies = rows // len(seeds)
        copy = torch.arange(copies, device=device)
        if self.passes is None:
            return derive(seeds[:1].expand(copies), "pass_noise", copy), None
        if self.passes.device != torch.device(device):
            self.passes = self.passes.to(device)
        base = self.passes.repeat(copies)
        keys, which = torch.unique(derive(base, "pass_noise", copy.repeat_interleave(len(seeds))), return_inverse=True)
        return keys, which

    def pass_normal(
        self, keys: torch.Tensor, count: int, purpose: str, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """``(len(keys), count)`` standard normal draws for the next forward pass (counter
        ``t``), one row per pass key of :meth:`pass_keys`: the stream ``derive(key, purpose,
        salt, t)``."""
        draws = derive(keys, purpose, self.salt, self.calls)
        self.calls += 1
        return _stream_pieces(draws, torch.zeros_like(draws), count, device, dtype)


def _stream_pieces(
    keys: torch.Tensor, starts: torch.Tensor, count: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``(len(keys), count)`` elements ``starts[r] ..`` of the streams ``keys``
    (:func:`safespot.utils.rng.seeded_normal_at`), hashed in pieces of at most ``_MAX_WORDS``
    numbers (the 64-bit hash needs a few int64 temporaries per number)."""
    rows = len(keys)
    step = max(1, _MAX_WORDS // max(count, 1))
    if rows <= step:
        return seeded_normal_at(keys, starts, count, 0, device, dtype)
    out = torch.empty((rows, count), device=device, dtype=dtype)
    for lo in range(0, rows, step):
        out[lo : lo + step] = seeded_normal_at(keys[lo : lo + step], starts[lo : lo + step], count, 0, device, dtype)
    return out


def _noise_sources(model: object) -> list[NoiseSeeding]:
    if not isinstance(model, nn.Module):
        return []
    found: dict[int, NoiseSeeding] = {}
    for module in model.modules():
        source = getattr(module, "noise_seeding", None)
        if isinstance(source, NoiseSeeding):
            found[id(source)] = source
    return list(found.values())


@contextmanager
def seeded_noise(
    model: nn.Module, seeds: torch.Tensor | None, salt: int = 0, passes: torch.Tensor | None = None
) -> Iterator[nn.Module]:
    """Within the block, every noise source of ``model`` (:class:`SoftSmoothed`,
    :class:`NoisyClassifier`, any module with a :class:`NoiseSeeding`) draws from per-image
    streams: image ``i``'s noise at the block's ``t``-th forward pass is a function of
    ``(seeds[i], salt, t)`` alone. ``seeds`` is one integer per image of every batch the block
    passes through ``model`` (it may live on the CPU; it is moved to the images' device on the
    first draw). ``seeds=None`` leaves the noise as it is (global RNG, or an enclosing context).

    Contexts nest: an inner one starts its own counter and the outer one's state (seeds,
    counter, salt) is restored on exit, so use a different ``salt`` when an inner block with
    the same seeds must not reuse the outer draws (e.g. the safe-spot search's outer forward
    pass after its inner PGD).

    ``passes`` (one integer key per seed, optional) names the forward pass each image belongs to
    for noise shared by a pass (``noise_per=forward``, :meth:`NoiseSeeding.pass_keys`): images
    with the same key share its draw; by default all images of a call share one.
    """
    if seeds is None:
        yield model
        return
    seeds = torch.as_tensor(seeds).reshape(-1)
    if not isinstance(salt, int) or salt < 0:
        raise ValueError(f"seeded noise: salt must be an integer >= 0, got {salt!r}")
    if passes is not None:
        passes = torch.as_tensor(passes).reshape(-1)
        if len(passes) != len(seeds):
            raise ValueError(f"seeded noise: {len(passes)} pass keys for {len(seeds)} seeds (one per seed)")
    sources = _noise_sources(model)
    saved = [source.state() for source in sources]
    for source in sources:
        source.restore((seeds, 0, salt, passes))
    try:
        yield model
    finally:
        for source, state in zip(sources, saved, strict=True):
            source.restore(state)


@contextmanager
def unseeded_noise(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the noise sources of ``model`` draw from the global RNG again, even
    inside an enclosing :func:`seeded_noise` (for code that passes batches unrelated to the
    seeded images, such as the smoothed vote's chunks or AutoAttack's subsets)."""
    sources = _noise_sources(model)
    saved = [source.state() for source in sources]
    for source in sources:
        source.restore((None, 0, 0, None))
    try:
        yield model
    finally:
        for source, state in zip(sources, saved, strict=True):
            source.restore(state)


class NoisyClassifier(nn.Module):
    """``c(x + xi)`` with one fresh ``xi ~ N(0, sigma^2 I)`` per call (paper 003's noisy
    model; seeded per image inside :func:`seeded_noise`)."""

    def __init__(self, base: nn.Module, sigma: float) -> None:
        super().__init__()
        self.base = base
        self.sigma = parse_budget(sigma, "sigma")
        self.num_classes = getattr(base, "num_classes", None)
        self.noise_seeding = NoiseSeeding()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.noise_seeding.active:
            z = self.noise_seeding.normal(len(x), x[0].numel(), "noisy_noise", x.device, x.dtype).view_as(x)
            return self.base(x + self.sigma * z)
        return self.base(x + self.sigma * torch.randn_like(x))


class SoftSmoothed(nn.Module):
    """``log mean_m softmax(c(x + xi_m))`` with ``m`` draws per image (Salman et al., 2019;
    paper 002, Eq. 3).

    Inside :meth:`fixed_noise` the same ``m`` draws are reused by every forward pass of the
    block (Salman et al.'s SmoothAdv fixes the noise for the whole inner attack of a
    minibatch); otherwise each call draws afresh: from the global RNG, or inside
    :func:`seeded_noise` from image ``i``'s stream at the call's counter (draw ``j`` of image
    ``i`` is the ``j``-th block of ``d`` numbers of that stream, so the first ``m'`` draws do
    not depend on ``m >= m'``). :meth:`draws` changes ``m`` for a block.
    """

    def __init__(self, base: nn.Module, sigma: float, m: int = 5) -> None:
        super().__init__()
        self.base = base
        self.sigma = parse_budget(sigma, "sigma", allow_zero=bool(_noise_sources(base)))
        # sigma 0 only for a noise-injected base (PNI, CNI): its own noise is then all that is averaged
        self.m = check_positive_int(m, "m")
        self.num_classes = getattr(base, "num_classes", None)
        self.noise_seeding = NoiseSeeding()
        self._fixed: torch.Tensor | None = None
        self._fixing = False

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        """``(m, *x.shape)`` noise draws, reused inside :meth:`fixed_noise`."""
        if self._fixing and self._fixed is not None and self._fixed.shape[1:] == x.shape:
            return self._fixed
        if self.noise_seeding.active:
            z = self.noise_seeding.normal(len(x), self.m * x[0].numel(), "soft_noise", x.device, x.dtype)
            draws = self.sigma * z.view(len(x), self.m, *x.shape[1:]).transpose(0, 1)
        else:
            draws = self.sigma * torch.randn((self.m, *x.shape), device=x.device, dtype=x.dtype)
        if self._fixing:
            self._fixed = draws
        return draws

    @contextmanager
    def fixed_noise(self) -> Iterator[SoftSmoothed]:
        self._fixing, self._fixed = True, None
        try:
            yield self
        finally:
            self._fixing, self._fixed = False, None

    def draws_for(self, role: DrawRole) -> int | None:
        """The draws per forward pass this classifier declares for ``role`` (:data:`DRAW_ROLES`)
        in :func:`smoothing_draws`; ``None``: it keeps its ``m`` (a plain soft smoothed classifier)."""
        return None

    @contextmanager
    def draws(self, m: int) -> Iterator[SoftSmoothed]:
        """Within the block each forward pass averages ``m`` draws (restored on exit)."""
        previous, self.m = self.m, check_positive_int(m, "m")
        try:
            yield self
        finally:
            self.m = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noisy = (x.unsqueeze(0) + self.noise(x)).flatten(0, 1)  # (m * B, ...)
        probs = torch.softmax(self.base(noisy).float(), dim=1).view(self.m, x.shape[0], -1)
        return probs.mean(0).clamp_min(1e-12).log()


@contextmanager
def smoothing_draws(model: nn.Module, role: DrawRole) -> Iterator[nn.Module]:
    """Within the block every smoothed classifier in ``model`` that declares draws for ``role``
    (:meth:`SoftSmoothed.draws_for`, i.e. :class:`safespot.smoothing.SmoothedClassifier`)
    averages ``m_robustify`` or ``m_attack`` draws per forward pass: paper 002 (Appendix C.2)
    robustifies with 5 draws and attacks with 50. A plain model is left alone, so callers need
    not know whether the model is smoothed. The robustifier wraps its search in
    ``smoothing_draws(model, "robustify")``; attacks run at the resting value, ``m_attack``.
    """
    if role not in DRAW_ROLES:
        raise ThreatConfigError(f"draw role must be one of {list(DRAW_ROLES)}, got {role!r}")
    modules = [mod for mod in model.modules() if isinstance(mod, SoftSmoothed)] if isinstance(model, nn.Module) else []
    targets = [(mod, m) for mod in modules if (m := mod.draws_for(role)) is not None]
    saved = [(mod, mod.m) for mod, _ in targets]
    for mod, m in targets:
        mod.m = check_positive_int(m, f"m_{role}")
    try:
        yield model
    finally:
        for mod, m in saved:
            mod.m = m
