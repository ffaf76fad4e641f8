"""The stochastic classifier of Feature Level Stochastic Smoothing (FLSS; Addepalli et al., 2021,
"Boosting Adversarial Robustness using Feature Level Stochastic Smoothing", paper 004, Section 3
and Fig. 2).

An encoder ``E = {mu, Sigma}`` maps an image to the mean and the standard deviation of a diagonal
Gaussian latent, and a multi-layer perceptron ``M`` classifies a reparameterised sample:

    C(x, e) = M(mu(x) + s * Sigma(x) ⊙ e),   e ~ N(0, I)                  (paper 004, Section 3)

with ``s = 1`` during training and a test-time scale ``s`` of the standard deviation (the
paper's "SD = 1, 2", Section 5.3). ``C(x, 0) = M(mu(x))`` is the no-sampling ("NS") classifier.

Views of the same network:

* ``forward(x)`` draws one ``e`` per image, so a gradient attack sees a stochastic model and
  expectation over transformation (``PGD(eot=k)``) averages over draws. Inside
  :func:`safespot.smoothing.seeded_noise` (every seeded attack opens it with its per-image seeds)
  image ``i``'s draw at the block's ``t``-th forward pass comes from its own stream
  (``derive(seed_i, "attack_latent", salt, t)``, :mod:`safespot.utils.rng`), so an attacked
  image does not depend on its batch or the process; outside it, from the global RNG. ``forward(x, eps=e)``
  holds the draw fixed (paper 004, Algorithm 1, line 5: the adversary of a training step is
  crafted with one fixed ``e``); with sampling switched off (:meth:`no_sampling`, or
  ``sample=False``) it is the NS classifier.
* :meth:`encode` and :meth:`head` separately, so that N-sample inference runs the encoder once
  and the head N times (:meth:`sample_logits`, paper 004, Section 4.3: "the N additional forward
  propagations are done only on the MLP").
* :meth:`vote_logits`: the class frequencies of the majority vote over ``n_vote`` draws (100 in
  the paper), whose ``argmax`` is the smoothed prediction; the evaluation engine scores every
  evaluated point of a model that has it by this vote
  (:func:`safespot.utils.prediction.predict_logits`).

Images are in [0, 1]; per-channel normalisation is the first layer of the encoder, as for every
other classifier of the framework (:class:`safespot.models.ImageClassifier`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from safespot.models.normalize import Normalize
from safespot.smoothing.soft import NoiseSeeding
from safespot.utils.prediction import VotingClassifier
from safespot.utils.rng import derive, image_seeds, seeded_normal

SIGMA_PARAMETERISATIONS: tuple[str, ...] = ("softplus", "logvar")
_LOGVAR_RANGE = (-20.0, 10.0)

SeedLike = int | Sequence[int] | torch.Tensor | None


def strip_linear_head(backbone: nn.Module) -> tuple[nn.Module, int]:
    """Replace the last ``nn.Linear`` of ``backbone`` (its classification layer) by the identity,
    in place, and return ``(backbone, in_features of that layer)``: the backbone then maps an
    image to its penultimate features (512 for PreActResNet-18, ``4 * width`` for SmallCNN)."""
    last = None
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise ValueError(f"{type(backbone).__name__} has no nn.Linear layer to use as the feature boundary")
    name, linear = last
    parent = backbone
    *path, leaf = name.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, leaf, nn.Identity())
    return backbone, int(linear.in_features)


def latent_noise(
    batch: int, n: int, dim: int, seed: SeedLike = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Standard-normal draws of shape ``(batch, n, dim)``, created on ``device``.

    With per-image ``seed`` (one integer per image, e.g. the evaluation engine's image seeds),
    image ``i``'s draws come from the counter-based stream of ``seed[i]`` alone
    (:func:`safespot.utils.rng.seeded_normal`, all images at once on the device), so they do
    not depend on which other images share the batch; with an integer seed, image ``i`` of the
    batch gets ``image_seeds(seed, i)``; with ``None``, from the global RNG of ``device``. The
    draws of a seed are its ``"latent"`` stream (:func:`safespot.utils.rng.derive`).
    """
    if seed is None:
        return torch.randn(batch, n, dim, device=device)
    if isinstance(seed, int) or (isinstance(seed, torch.Tensor) and seed.dim() == 0):
        seed = image_seeds(int(seed), torch.arange(batch, device=device))
    seeds = torch.as_tensor(seed, dtype=torch.long).to(device).reshape(-1)
    if len(seeds) != batch:
        raise ValueError(f"expected {batch} per-image seeds, got {len(seeds)}")
    return seeded_normal(derive(seeds, "latent"), n * dim, device=device).view(batch, n, dim)


class StochasticClassifier(VotingClassifier):
    """FLSS classifier ``C(x, e) = M(mu(x) + s * Sigma(x) ⊙ e)`` (paper 004, Section 3).

    Args:
        encoder: maps normalised images to features of size ``feature_dim``.
        feature_dim: size of the encoder's output.
        num_classes: number of classes.
        mean, std: per-channel normalisation applied first (images stay in [0, 1] outside).
        latent_dim: size of the Gaussian latent (``None``: ``feature_dim``).
        hidden: widths of the hidden layers of the MLP head ``M`` (ReLU between layers); ``()``
            makes ``M`` a single linear layer.
        sigma: parameterisation of the standard deviation: ``softplus`` (``Sigma = softplus(a) +
            min_sigma``) or ``logvar`` (the layer predicts ``log Sigma^2``, clamped to [-20, 10],
            as in a variational autoencoder).
        sd_scale: the test-time scale ``s`` of the standard deviation (1: the training
            distribution; paper 004 reports SD = 1 and 2).
        sample: draw ``e`` in :meth:`forward`; ``False`` gives the no-sampling classifier.
        n_vote: draws of the majority vote of :meth:`vote_logits` (paper 004: N = 100).
        min_sigma: floor of the ``softplus`` standard deviation.
    """

    def __init__(
        self,
        encoder: nn.Module,
        feature_dim: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        latent_dim: int | None = None,
        hidden: Sequence[int] = (256,),
        sigma: str = "softplus",
        sd_scale: float = 1.0,
        sample: bool = True,
        n_vote: int = 100,
        min_sigma: float = 1e-4,
    ) -> None:
        super().__init__()
        if sigma not in SIGMA_PARAMETERISATIONS:
            raise ValueError(f"sigma must be one of {list(SIGMA_PARAMETERISATIONS)}, got {sigma!r}")
        if not float(sd_scale) >= 0:
            raise ValueError(f"sd_scale must be >= 0, got {sd_scale}")
        if int(n_vote) < 1:
            raise ValueError(f"n_vote must be >= 1, got {n_vote}")
        latent = int(latent_dim or feature_dim)
        self.normalize = Normalize(mean, std)
        self.encoder = encoder
        self.to_mu = nn.Linear(int(feature_dim), latent)
        self.to_sigma = nn.Linear(int(feature_dim), latent)
        layers: list[nn.Module] = []
        width = latent
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU(inplace=True)]
            width = int(h)
        layers.append(nn.Linear(width, int(num_classes)))
        self.mlp = nn.Sequential(*layers)
        self.num_classes = int(num_classes)
        self.latent_dim = latent
        self.sigma_parameterisation = sigma
        self.sd_scale = float(sd_scale)
        self.sample = bool(sample)
        self.n_vote = int(n_vote)
        self.min_sigma = float(min_sigma)
        self.noise_seeding = NoiseSeeding()  # seeded latent draws inside seeded_noise (attacks)

    # --- the two halves ------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu(x), Sigma(x))`` for images ``x`` in [0, 1]; both ``(B, latent_dim)``, Sigma > 0."""
        features = self.encoder(self.normalize(x)).flatten(1)
        mu = self.to_mu(features)
        raw = self.to_sigma(features)
        if self.sigma_parameterisation == "softplus":
            sigma = F.softplus(raw) + self.min_sigma
        else:
            sigma = torch.exp(0.5 * raw.clamp(*_LOGVAR_RANGE))
        return mu, sigma

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """The MLP ``M``: logits for latent vectors ``z`` of shape ``(..., latent_dim)``."""
        return self.mlp(z)

    def reparameterize(
        self, mu: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, scale: float | None = None
    ) -> torch.Tensor:
        """``mu + s * sigma ⊙ eps`` with ``s = scale`` (default: :attr:`sd_scale`)."""
        s = self.sd_scale if scale is None else float(scale)
        return mu + s * sigma * eps

    # --- classifier views ------------------------------------------------------------------
    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
        """Logits of ``C(x, e)``: with ``eps`` given, that draw (``zeros`` gives ``C(x, 0)``);
        otherwise a fresh ``e ~ N(0, I)`` per image while :attr:`sample` is on (seeded per image
        inside :func:`safespot.smoothing.seeded_noise`, see the module docstring), or ``C(x, 0)``
        when it is off. ``scale`` overrides :attr:`sd_scale`."""
        mu, sigma = self.encode(x)
        if eps is None:
            if not self.sample:
                return self.head(mu)
            eps = self.draw_latent(mu)
        return self.head(self.reparameterize(mu, sigma, eps.to(mu.dtype), scale))

    def draw_latent(self, mu: torch.Tensor) -> torch.Tensor:
        """One ``e ~ N(0, I)`` per row of ``mu``: from the images' streams inside
        :func:`safespot.smoothing.seeded_noise`, else from the global RNG."""
        if self.noise_seeding.active:
            return self.noise_seeding.normal(len(mu), self.latent_dim, "attack_latent", mu.device, mu.dtype)
        return torch.randn_like(mu)

    @contextmanager
    def no_sampling(self) -> Iterator[StochasticClassifier]:
        """Within the block :meth:`forward` is the no-sampling classifier ``C(x, 0)``."""
        previous = self.sample
        self.sample = False
        try:
            yield self
        finally:
            self.sample = previous

    @contextmanager
    def scaled(self, scale: float | None) -> Iterator[StochasticClassifier]:
        """Within the block the test-time scale of the standard deviation is ``scale`` (``None``:
        unchanged)."""
        previous = self.sd_scale
        if scale is not None:
            if not float(scale) >= 0:
                raise ValueError(f"sd_scale must be >= 0, got {scale}")
            self.sd_scale = float(scale)
        try:
            yield self
        finally:
            self.sd_scale = previous

    @contextmanager
    def votes(self, n: int) -> Iterator[StochasticClassifier]:
        """Within the block the majority vote (:meth:`vote_logits`) counts ``n`` draws, e.g. the
        ``n_samples`` of the views that score an evaluation's points, so that an attack judging
        success by the vote judges it as the points are scored."""
        previous = self.n_vote
        if int(n) < 1:
            raise ValueError(f"n_vote must be >= 1, got {n}")
        self.n_vote = int(n)
        try:
            yield self
        finally:
            self.n_vote = previous

    @torch.no_grad()
    def sample_logits(
        self, x: torch.Tensor, n: int, seed: SeedLike = None, scale: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """N-sample inference (paper 004, Section 4.3): the encoder runs once, the head on ``n``
        reparameterised samples per image. Returns ``(ns_logits (B, C), logits (B, n, C))``:
        the no-sampling logits ``C(x, 0)`` and those of the ``n`` draws (seeded as in
        :func:`latent_noise`)."""
        mu, sigma = self.encode(x)
        eps = latent_noise(x.shape[0], int(n), self.latent_dim, seed, mu.device).to(mu.dtype)
        z = self.reparameterize(mu[:, None], sigma[:, None], eps, scale)
        return self.head(mu), self.head(z)

    @torch.no_grad()
    def vote_logits(self, x: torch.Tensor, seed: SeedLike = None) -> torch.Tensor:
        """Scores whose ``argmax`` is the prediction of the smoothed classifier: the share of
        the ``n_vote`` draws voting for each class (majority vote, paper 004, Section 4.3), or the
        no-sampling logits while :attr:`sample` is off."""
        if not self.sample:
            return self.head(self.encode(x)[0])
        _, logits = self.sample_logits(x, self.n_vote, seed)
        return vote_shares(logits)


def vote_shares(logits: torch.Tensor) -> torch.Tensor:
    """``(B, n, C)`` logits of n draws -> ``(B, C)`` share of the draws whose top class is each
    class."""
    votes = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
    return votes.mean(1)


def is_stochastic(model: nn.Module) -> bool:
    """Whether ``model`` is FLSS's :class:`StochasticClassifier` (with its ``encode`` / ``head`` /
    ``sample_logits`` views)."""
    return isinstance(model, StochasticClassifier)


def build_stochastic_classifier(
    backbone: nn.Module,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    latent_dim: int | None = None,
    hidden: Sequence[int] = (256,),
    sigma: str = "softplus",
    sd_scale: float = 1.0,
    n_vote: int = 100,
    min_sigma: float = 1e-4,
) -> StochasticClassifier:
    """Hydra entry point: an FLSS classifier whose encoder is ``backbone`` without its final
    linear layer (see :func:`strip_linear_head`), normalisation first."""
    encoder, feature_dim = strip_linear_head(backbone)
    return StochasticClassifier(
        encoder,
        feature_dim,
        num_classes,
        mean,
        std,
        latent_dim=latent_dim,
        hidden=tuple(hidden),
        sigma=sigma,
        sd_scale=sd_scale,
        n_vote=n_vote,
        min_sigma=min_sigma,
    )
