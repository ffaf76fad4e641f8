"""The Gaussian-smoothed classifier: voting, Cohen et al.'s PREDICT and CERTIFY.

For a base classifier ``c`` (images in [0, 1] -> logits) and ``xi ~ N(0, sigma^2 I)``, the
smoothed classifier is ``g(x) = argmax_y P(c(x + xi) = y)`` (Cohen et al., 2019, Eq. 1;
paper 002, Section 3.6; paper 003, Eqs. 7-10). :class:`SmoothedClassifier` offers three views:

* ``forward(x)``: the differentiable soft smoothed classifier ``log mean_m softmax(c(x + xi_m))``
  of Salman et al. (2019) (paper 002, Eq. 3), inherited from :class:`SoftSmoothed`. Every
  gradient attack run on it is a randomised attack on the smoothed loss (paper 002's
  "randomized PGD"), and the robustifier optimises it.
* ``vote_logits(x)``: non-differentiable scores over ``n_vote`` draws whose ``argmax`` is the
  smoothed prediction, with one of paper 003's voting functions ``v`` (Eq. 8):

  - ``majority`` (prediction smoothing, Eqs. 9-10): each draw votes for its top class; the
    scores are the class frequencies. This is ``g`` of Cohen et al. and the 50-sample
    majority vote of paper 002 (Appendix C.2).
  - ``soft`` (soft prediction smoothing, Eq. 13): the mean of the softmax probabilities.
  - ``weighted`` (weighted smoothing, Eqs. 11-12): each draw gives the class it ranks r-th
    (r = 1 for its most probable class) the weight ``w_r`` of ``rank_weights``. The default
    (``rank_weights=None``, or ``"geometric"``) weights every rank ``r = 1..K`` by
    ``2^-(r-1)``, as the authors' reference implementation does (yanemcovsky/SIAM,
    ``models/resnet_cpni_smooth_logits.py``: the per-class weights ``2 ** -x`` for
    ``x = 0..K-1`` scattered onto each draw's classes sorted by decreasing logit, and
    ``run_attack.py``'s ``--logits`` default). ``"top2"`` is ``(1, 0.5)``: the top class and
    the runner-up, whose role in the smoothed prediction Cohen et al. point out. An explicit
    list gives ranks below its length nothing: ``(1,)`` is the majority vote, ``(1,) * k``
    the top-k vote. The scores are normalised to sum to 1.

* :meth:`SmoothedClassifier.predict` and :meth:`SmoothedClassifier.certify`: Cohen et al.'s
  PREDICT (a two-sided binomial test that abstains on near ties) and CERTIFY (a one-sided
  Clopper-Pearson lower bound ``pA_lower`` on ``P(c(x + xi) = c_A)`` and the l_2 radius
  ``sigma * Phi^{-1}(pA_lower)`` of their Theorem 1).

Noise for Monte Carlo estimates comes from the counter-based per-image streams of
:mod:`safespot.utils.rng`: draw j of image i is the j-th piece of the stream of ``(image seed,
purpose)``, made for a whole chunk of (image, draw) rows at once on the input's device (no
per-image loop, no host generator). The draws an image receives therefore depend only on its
seed, never on how many samples go through the base classifier at once (``max_batch``) or on
which other images share a batch. The noise of ``forward`` (the soft smoothed classifier) is seeded per image
inside :func:`safespot.smoothing.seeded_noise` (see :mod:`safespot.smoothing.soft`).

Draws per forward pass (paper 002, Appendix C.2: 5 draws to robustify, 50 to attack):
``m_robustify`` and ``m_attack``. ``forward`` uses ``m_attack`` at rest, and
``smoothing_draws(model, "robustify")`` switches to ``m_robustify`` for a block (the
robustifier's search); ``m``, when given, sets both (one value for everything).

Noise-injected base models (PNI, CNI-W; :mod:`safespot.models.noise_injection`): each noisy
sample of a vote also draws the model's own noise afresh, seeded by the image, the purpose and the
draw number, so the vote averages over both the input noise and the model's noise (paper 003's
smoothed inference) and does not depend on the batch or the chunking; ``sigma = 0`` then averages
the model's own noise only (paper 003, Table 4, "CNI-W, sigma 0"; CERTIFY needs ``sigma > 0``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import nn

from safespot.smoothing.soft import DrawRole, SoftSmoothed, seeded_noise
from safespot.threat import ThreatConfigError, check_positive_int
from safespot.utils.prediction import VotingClassifier
from safespot.utils.rng import derive, image_seeds, seeded_normal_at

VOTES: tuple[str, ...] = ("majority", "soft", "weighted")
_MAX_WORDS = 2**25  # numbers hashed at once (256 MiB per int64 temporary)
_FLOOR = 1e-12
# the estimates' counters below the "monte_carlo_noise" purpose: the same image seed gives
# independent draws for each; a number belongs to its estimate for good (like rng.PURPOSES)
_COUNTS = 0  # sample_counts
_SELECT = 1  # CERTIFY's guess of the top class (n0 draws)
_ESTIMATE = 2  # CERTIFY's count of the guess (n draws)
_PREDICT = 3  # PREDICT
_VOTE = 4  # vote_logits and vote_sweep

SeedLike = int | Sequence[int] | torch.Tensor | None
#: Named rank weights of the ``weighted`` vote; ``None`` weights rank r of K by 2^-(r-1).
RANK_WEIGHTS: dict[str, tuple[float, ...] | None] = {"geometric": None, "top2": (1.0, 0.5)}


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """A significance level in (0, 1), else a :class:`ThreatConfigError` naming it."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < float(alpha) < 1:
        raise ThreatConfigError(f"{name} must lie in (0, 1), got {alpha!r}")
    return float(alpha)


def check_vote(vote: str) -> str:
    if vote not in VOTES:
        raise ThreatConfigError(f"vote must be one of {list(VOTES)}, got {vote!r}")
    return vote


def check_rank_weights(weights: Sequence[float] | str | None) -> tuple[float, ...] | None:
    """``None`` or ``"geometric"`` (every rank r of K weighted ``2^-(r-1)``, returned as
    ``None``), a name of :data:`RANK_WEIGHTS` (``"top2"``: ``(1, 0.5)``), or a non-empty list
    of finite, non-negative weights with a positive weight for the top rank."""
    if weights is None:
        return None
    if isinstance(weights, str):
        if weights not in RANK_WEIGHTS:
            raise ThreatConfigError(
                f"rank_weights must be one of {list(RANK_WEIGHTS)}, null or a list of weights, got {weights!r}"
            )
        return RANK_WEIGHTS[weights]
    try:
        values = tuple(float(w) for w in weights)
    except (TypeError, ValueError):
        raise ThreatConfigError(f"rank_weights must be a list of numbers, got {weights!r}") from None
    if not values or values[0] <= 0 or any(not math.isfinite(w) or w < 0 for w in values):
        raise ThreatConfigError(
            f"rank_weights must be a non-empty list of finite weights >= 0 with the first > 0, got {weights!r}"
        )
    return values


def clopper_pearson_lower(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """One-sided ``(1 - alpha)`` lower confidence bound on a binomial proportion: the lower
    end of the two-sided ``(1 - 2 alpha)`` Clopper-Pearson interval,
    ``Beta^{-1}(alpha; k, n - k + 1)`` (0 when ``k = 0``), as in Cohen et al.'s CERTIFY."""
    k = np.asarray(successes, dtype=np.float64)
    safe = np.maximum(k, 1.0)  # the quantile needs a > 0; k = 0 is set to 0 below
    bound = stats.beta.ppf(alpha, safe, trials - k + 1)
    return np.where(k > 0, bound, 0.0)


def image_seed_tensor(
    batch: int, seed: SeedLike = None, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """One integer seed per image, as an int64 tensor on ``device`` (per-image seeds given as a
    tensor are moved there with no host round trip).

    ``seed`` may be per-image seeds (a sequence or 1-d tensor of ``batch`` integers), one
    integer (expanded as the streams of images ``0..batch-1`` of that seed,
    :func:`safespot.utils.rng.image_seeds`: the one seed API) or ``None`` (seeds drawn from ``generator``, or
    from the global torch RNG).
    """
    if isinstance(seed, torch.Tensor) and seed.dim() == 0:
        seed = int(seed)
    if seed is None:
        gen_device = generator.device if generator is not None else device
        return torch.randint(0, 2**62, (batch,), generator=generator, device=gen_device).to(device)
    if isinstance(seed, torch.Tensor):
        if seed.numel() != batch:
            raise ValueError(f"expected {batch} per-image seeds, got {seed.numel()}")
        return seed.reshape(-1).to(device=device, dtype=torch.int64)
    if isinstance(seed, int | np.integer) and not isinstance(seed, bool):  # image i of the batch: its stream
        return image_seeds(int(seed), torch.arange(batch, device=device))
    values = [int(s) for s in seed]
    if len(values) != batch:
        raise ValueError(f"expected {batch} per-image seeds, got {len(values)}")
    return torch.tensor([(v + 2**63) % 2**64 - 2**63 for v in values], dtype=torch.int64, device=device)


def binomial_pvalue_half(n_a: np.ndarray, n_b: np.ndarray) -> np.ndarray:
    """The two-sided binomial test of ``n_a`` successes in ``n_a + n_b`` trials against
    ``p = 1/2`` (``scipy.stats.binomtest(n_a, n_a + n_b, 0.5).pvalue``), for whole arrays: the
    distribution is symmetric, so the outcomes at most as likely as ``n_a`` are the two tails
    beyond ``min(n_a, n_b)``, and the p-value is ``min(1, 2 * P(X <= min(n_a, n_b)))``."""
    n_a, n_b = np.asarray(n_a, dtype=np.int64), np.asarray(n_b, dtype=np.int64)
    return np.minimum(1.0, 2.0 * stats.binom.cdf(np.minimum(n_a, n_b), n_a + n_b, 0.5))


def draw_rows(batch: int, n: int, max_batch: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(owner, draw)`` of the ``n`` noisy samples of each of ``batch`` images, in chunks of at
    most ``max_batch`` rows, draw-then-image order: row ``r`` of the ``batch * n`` rows is draw
    ``r // batch`` of image ``r % batch`` (so a chunk holds few draws: few forward passes of a
    network whose noise is shared by a pass, :func:`vote_passes`). Made on ``device`` by
    arithmetic: one loop step per chunk, none per image."""
    total = batch * n
    for lo in range(0, total, max_batch):
        rows = torch.arange(lo, min(lo + max_batch, total), device=device)
        yield rows % batch, rows // batch


def vote_passes(seeds: torch.Tensor, draw: torch.Tensor, purpose: int) -> torch.Tensor:
    """The forward pass of each row of a smoothed vote (``seeded_noise``'s ``passes``): draw ``j``
    of every image of the batch is one pass, keyed by the batch's first seed, the estimate
    (``purpose``) and ``j``, as paper 003 passes a batch through a noise-injected network once per
    draw (``noise_per=forward``; no effect on other noise)."""
    return derive(seeds[:1].expand(len(draw)), "smoothing_draw", purpose, draw)


@dataclass
class Certificate:
    """Per-image output of :meth:`SmoothedClassifier.certify` (Cohen et al., CERTIFY).

    ``pred``: the certified class, -1 on abstention; ``radius``: the l_2 radius
    ``sigma * Phi^{-1}(pA_lower)`` (0 on abstention); ``pA_lower``: the lower confidence bound
    on the top class's probability; ``counts``: the class counts of the ``n`` estimation draws.
    """

    pred: torch.Tensor
    radius: torch.Tensor
    pA_lower: torch.Tensor
    counts: torch.Tensor


class SmoothedClassifier(SoftSmoothed, VotingClassifier):
    """A Gaussian-smoothed classifier around ``base`` (see the module docstring).

    Args:
        base: the base classifier, images in [0, 1] -> logits.
        sigma: the noise level (> 0).
        m: when given, the draws per differentiable forward pass for everything (sets both
            ``m_robustify`` and ``m_attack``); ``None`` keeps them apart.
        n_vote: draws for :meth:`vote_logits` (paper 002 uses 50).
        vote: ``majority``, ``soft`` or ``weighted`` (paper 003, Section 3).
        max_batch: at most this many noisy samples go through ``base`` in one pass in
            :meth:`vote_logits`, :meth:`sample_counts`, :meth:`predict` and
            :meth:`certify` (the memory budget); results do not depend on it.
        rank_weights: the weights ``w_1, w_2, ...`` of the ``weighted`` vote: ``None`` (or
            ``"geometric"``) for ``2^-(r-1)`` on every rank (paper 003's reference code),
            ``"top2"`` for ``(1, 0.5)``, or a list.
        m_robustify: draws per forward pass while robustifying (paper 002, Appendix C.2: 5),
            inside ``smoothing_draws(model, "robustify")``.
        m_attack: draws per forward pass of the attacks (paper 002, Appendix C.2: 50); the
            resting value of ``m``.
    """

    def __init__(
        self,
        base: nn.Module,
        sigma: float,
        m: int | None = None,
        n_vote: int = 50,
        vote: str = "majority",
        max_batch: int = 1000,
        rank_weights: Sequence[float] | str | None = None,
        m_robustify: int = 5,
        m_attack: int = 50,
    ) -> None:
        if m is not None:
            m_robustify = m_attack = check_positive_int(m, "m")
        m_robustify = check_positive_int(m_robustify, "m_robustify")
        m_attack = check_positive_int(m_attack, "m_attack")
        super().__init__(base, sigma, m_attack)
        self.m_robustify, self.m_attack = m_robustify, m_attack
        self.n_vote = check_positive_int(n_vote, "n_vote")
        self.vote = check_vote(vote)
        self.max_batch = check_positive_int(max_batch, "max_batch")
        self.rank_weights = check_rank_weights(rank_weights)

    def draws_for(self, role: DrawRole) -> int:
        """``m_robustify`` or ``m_attack``: the draws per forward pass of the role's block."""
        return self.m_robustify if role == "robustify" else self.m_attack

    def extra_repr(self) -> str:
        weights = "geometric" if self.rank_weights is None else list(self.rank_weights)
        return (
            f"sigma={self.sigma}, m={self.m}, m_robustify={self.m_robustify}, m_attack={self.m_attack}, "
            f"n_vote={self.n_vote}, vote={self.vote!r}, rank_weights={weights}, max_batch={self.max_batch}"
        )

    # --- Monte Carlo sampling ---------------------------------------------------------
    def _noise(
        self, x: torch.Tensor, seeds: torch.Tensor, owner: torch.Tensor, draw: torch.Tensor, purpose: int
    ) -> torch.Tensor:
        """``sigma`` times the draws ``draw[r]`` of images ``owner[r]`` (one row each), shape
        ``(rows, *x.shape[1:])``: element ``draw * d .. (draw + 1) * d - 1`` of the image's stream
        for ``purpose``, in pieces of at most ``_MAX_WORDS`` numbers."""
        d = x[0].numel()
        keys = derive(seeds, "monte_carlo_noise", purpose)
        rows_at_once = max(1, _MAX_WORDS // d)
        pieces = [
            seeded_normal_at(
                keys[owner[k : k + rows_at_once]],
                draw[k : k + rows_at_once] * d,
                d,
                stream=0,
                device=x.device,
                dtype=x.dtype,
            )
            for k in range(0, len(owner), rows_at_once)
        ]
        return self.sigma * torch.cat(pieces).view(len(owner), *x.shape[1:])

    @torch.no_grad()
    def _tally(
        self,
        x: torch.Tensor,
        n: int,
        seeds: torch.Tensor,
        purpose: int,
        score: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``sum_j score(c(x + xi_j))`` over ``n`` draws per image, shape ``(B, K)``, float64."""
        n = check_positive_int(n, "n")
        if len(x) == 0:
            return torch.zeros((0, self.num_classes or 0), dtype=torch.float64, device=x.device)
        seed_words = seeds.to(x.device)
        totals: torch.Tensor | None = None
        for owner, draw in draw_rows(len(x), n, self.max_batch, x.device):
            noise = self._noise(x, seed_words, owner, draw, purpose)
            # a noise-injected base (PNI, CNI) draws its own noise per row: draw j of image i from
            # (seed_i, purpose, j), whatever the chunk, or per pass, draw j of the batch (no-op for a
            # deterministic base)
            row_seeds = derive(seed_words[owner], "smoothing_draw", purpose, draw)
            with seeded_noise(self.base, row_seeds, passes=vote_passes(seed_words, draw, purpose)):
                out = score(self.base(x[owner] + noise).float()).double()
                if totals is None:
                    totals = out.new_zeros((len(x), out.shape[1]))
                totals.index_add_(0, owner, out)
        return totals

    @staticmethod
    def _top_class(logits: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(logits.argmax(1), logits.shape[1]).to(logits.dtype)

    def rank_weight_vector(self, num_classes: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``(K,)`` weights of ranks 1..K in the ``weighted`` vote (paper 003, Eqs. 11-12):
        ``2^-(r-1)`` by default, else ``rank_weights`` padded with zeros."""
        if self.rank_weights is None:
            return torch.pow(2.0, -torch.arange(num_classes, device=device, dtype=torch.float64)).to(dtype)
        weights = torch.zeros(num_classes, dtype=dtype, device=device)
        k = min(len(self.rank_weights), num_classes)
        weights[:k] = torch.tensor(self.rank_weights[:k], dtype=dtype, device=device)
        return weights

    def _rank_scores(self, logits: torch.Tensor) -> torch.Tensor:
        weights = self.rank_weight_vector(logits.shape[1], logits.dtype, logits.device)
        order = logits.argsort(dim=1, descending=True)  # order[:, r - 1]: the class ranked r-th
        return torch.zeros_like(logits).scatter_(1, order, weights.expand(len(logits), -1))

    def _counts(self, x: torch.Tensor, n: int, seeds: torch.Tensor, purpose: int) -> torch.Tensor:
        return self._tally(x, n, seeds, purpose, self._top_class).round().long()

    def sample_counts(
        self, x: torch.Tensor, n: int, generator: torch.Generator | None = None, seed: SeedLike = None
    ) -> torch.Tensor:
        """``(B, K)`` counts of ``argmax c(x + xi)`` over ``n`` draws per image (Cohen et al.,
        SAMPLEUNDERNOISE). Seeds: see :func:`image_seed_tensor`."""
        return self._counts(x, n, image_seed_tensor(len(x), seed, generator, x.device), _COUNTS)

    def vote_logits(
        self, x: torch.Tensor, generator: torch.Generator | None = None, seed: SeedLike = None
    ) -> torch.Tensor:
        """Log of the ``vote`` scores over ``n_vote`` draws (clamped away from 0), shape ``(B, K)``;
        ``argmax`` is the smoothed prediction (paper 003, Eqs. 8-13). Not differentiable."""
        scorer = {"majority": self._top_class, "soft": lambda z: torch.softmax(z, 1), "weighted": self._rank_scores}
        seeds = image_seed_tensor(len(x), seed, generator, x.device)
        totals = self._tally(x, self.n_vote, seeds, _VOTE, scorer[self.vote])
        scores = totals / totals.sum(1, keepdim=True).clamp_min(_FLOOR)
        return scores.float().clamp_min(_FLOOR).log()

    @torch.no_grad()
    def vote_sweep(
        self,
        x: torch.Tensor,
        ns: Sequence[int],
        votes: Sequence[str] = VOTES,
        generator: torch.Generator | None = None,
        seed: SeedLike = None,
    ) -> dict[tuple[str, int], torch.Tensor]:
        """:meth:`vote_logits` for every vote rule in ``votes`` and number of draws in ``ns`` at
        once (paper 003: accuracy versus the number of samples, and the three rules compared):
        ``{(vote, n): (B, K) log scores}``. Draw ``j`` of an image is the same in every vote (its
        stream position), so the votes of ``n`` draws are the prefixes of one run of ``max(ns)``
        draws, and ``(self.vote, self.n_vote)`` equals :meth:`vote_logits`."""
        ns = sorted({check_positive_int(n, "n") for n in ns})
        votes = [check_vote(v) for v in votes]
        seeds = image_seed_tensor(len(x), seed, generator, x.device).to(x.device)
        n_max = ns[-1]
        logits: torch.Tensor | None = None
        for owner, draw in draw_rows(len(x), n_max, self.max_batch, x.device):
            noise = self._noise(x, seeds, owner, draw, _VOTE)
            row_seeds = derive(seeds[owner], "smoothing_draw", _VOTE, draw)
            with seeded_noise(self.base, row_seeds, passes=vote_passes(seeds, draw, _VOTE)):
                out = self.base(x[owner] + noise).float()
            if logits is None:
                logits = out.new_zeros((len(x), n_max, out.shape[1]))
            logits[owner, draw] = out
        assert logits is not None
        flat = logits.flatten(0, 1)
        scorer = {"majority": self._top_class, "soft": lambda z: torch.softmax(z, 1), "weighted": self._rank_scores}
        sweep = {}
        for vote in votes:
            running = scorer[vote](flat).double().view(logits.shape).cumsum(1)  # (B, n_max, K)
            for n in ns:
                totals = running[:, n - 1]
                scores = totals / totals.sum(1, keepdim=True).clamp_min(_FLOOR)
                sweep[(vote, n)] = scores.float().clamp_min(_FLOOR).log()
        return sweep

    # --- Cohen et al.'s PREDICT and CERTIFY ----------------------------------------------
    def predict(
        self,
        x: torch.Tensor,
        n: int = 100,
        alpha: float = 0.001,
        generator: torch.Generator | None = None,
        seed: SeedLike = None,
    ) -> torch.Tensor:
        """PREDICT (Cohen et al., 2019, Section 3.2): the top class of ``n`` draws if a two-sided
        binomial test of its count ``nA`` against the runner-up's ``nB`` rejects
        ``P = 1/2`` at level ``alpha``, else -1 (abstain). Wrong with probability <= alpha."""
        alpha = check_alpha(alpha)
        counts = self._counts(x, n, image_seed_tensor(len(x), seed, generator, x.device), _PREDICT)
        if counts.shape[1] < 2:
            return counts.argmax(1)
        top = counts.topk(2, dim=1)
        n_a, n_b = top.values.cpu().numpy().T
        abstain = torch.from_numpy(binomial_pvalue_half(n_a, n_b) > alpha).to(counts.device)
        return torch.where(abstain, -1, top.indices[:, 0])

    def certify(
        self,
        x: torch.Tensor,
        n0: int = 100,
        n: int = 100_000,
        alpha: float = 0.001,
        generator: torch.Generator | None = None,
        seed: SeedLike = None,
    ) -> Certificate:
        """CERTIFY (Cohen et al., 2019, Section 3.2 and Theorem 1).

        Guess ``c_A`` from ``n0`` draws, count it in ``n`` fresh draws, bound
        ``pA_lower = Beta^{-1}(alpha; nA, n - nA + 1)`` and return the l_2 radius
        ``sigma * Phi^{-1}(pA_lower)``; abstain (pred -1, radius 0) when ``pA_lower < 1/2``.
        With probability >= 1 - alpha, ``g`` is constant (= ``c_A``) on that ball.
        """
        n0, n = check_positive_int(n0, "n0"), check_positive_int(n, "n")
        alpha = check_alpha(alpha)
        if self.sigma == 0:
            raise ThreatConfigError("certify needs input noise: sigma > 0 (sigma 0 averages a model's own noise only)")
        seeds = image_seed_tensor(len(x), seed, generator, x.device)
        guess = self._counts(x, n0, seeds, _SELECT).argmax(1)
        counts = self._counts(x, n, seeds, _ESTIMATE)
        n_a = counts.gather(1, guess[:, None]).squeeze(1)
        p_lower = clopper_pearson_lower(n_a.cpu().numpy(), n, alpha)
        certified = p_lower >= 0.5
        radius = np.where(certified, self.sigma * stats.norm.ppf(np.clip(p_lower, 0.5, 1.0)), 0.0)
        as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32, device=x.device)  # noqa: E731
        ok = torch.as_tensor(certified, device=x.device)
        return Certificate(
            pred=torch.where(ok, guess, torch.full_like(guess, -1)),
            radius=as_tensor(radius),
            pA_lower=as_tensor(p_lower),
            counts=counts,
        )
