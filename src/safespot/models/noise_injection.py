"""Noise-injected layers: Parametric Noise Injection (He, Rakin & Fan, 2019, "Parametric Noise
Injection: Trainable Randomness to Improve Deep Neural Network Robustness against Adversarial
Attack", Eq. 2), the noise models paper 003 builds on (its Sections 2 and 4, reference [18]).

PNI perturbs a layer's weights (``pni_w``) or its output activations (``pni_a``) at every forward
pass by ``alpha * std(v) * eta``, ``eta ~ N(0, I)``, where ``v`` is the tensor perturbed, ``std``
its standard deviation (treated as a constant, as in the authors' description; for activations it
is taken per image, over channels and positions, so that an image's noise does not depend on its
batch) and ``alpha`` a
learned scalar per layer (initial value 0.25), trained jointly with the network by adversarial
training. The noise is on in evaluation mode too: paper 003 smooths the prediction of such a model
over ``n`` forward passes.

CNI-W (Zheltonozhskii et al., 2020, "Colored Noise Injection for Training Adversarially Robust
Neural Networks", paper 003's reference [51] and its CIFAR-10 base model) replaces the independent
noise by a low-rank multivariate Gaussian over *all* weights of a layer:
``W + sqrt(|std(W) d|) * z_d + F z_f``, ``z_d ~ N(0, I_w)``, ``z_f ~ N(0, I_r)``, with a learned
diagonal ``d`` (one entry per weight, initial value 0.25^2) and a learned factor ``F`` (``w x r``,
rank ``r = 5``, every entry initially 0.01). The paper does not state these; they are read from
the public code that accompanies paper 003 (github.com/yanemcovsky/SIAM, ``layers.py``, commit
947630e), whose defaults they are; as there, ``std(W)`` is not detached for CNI (it is for PNI,
following He et al.'s code) and the noise stays on at test time.

Weight draws (``noise_per``, the weight variants ``pni_w`` and ``cni_w``):

- ``forward`` (paper 003 and its accompanying code: one weight noise per forward pass): every
  image of a pass sees the same noisy weights. Outside :func:`safespot.smoothing.seeded_noise`
  (training) a call is a pass, drawn from the global RNG; inside it a call's passes are its
  copies of the seeded images (a soft smoothed classifier's ``m`` noisy copies are ``m`` passes)
  or the passes the context names (the smoothed vote: draw ``j`` of the batch's images), each
  drawn from a stream of its pass key and the block's forward counter
  (:meth:`safespot.smoothing.soft.NoiseSeeding.pass_keys`). Records then depend on which images
  share a pass, i.e. on the batching, as the paper's do. The default of paper 003's presets
  (``conf/model/resnet20.yaml``).
- ``image``: every image its own weights (``W + alpha std(W) eta_i``; the convolution runs
  grouped, one group per image), drawn inside ``seeded_noise`` from image ``i``'s stream at the
  block's t-th forward pass (a function of its seed and ``t`` only: predictions, votes and
  attacks do not depend on the batch or the process; exact records, about 6x slower on the
  CPU), outside it from the global RNG. The class default, which checkpoints written before the
  setting existed evaluate with.

PNI-A's noise is drawn per activation, so per image, either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from safespot.errors import ConfigError
from safespot.smoothing.soft import NoiseSeeding

NoiseKind = Literal["none", "pni_w", "pni_a", "cni_w"]
NOISE_KINDS: tuple[str, ...] = ("none", "pni_w", "pni_a", "cni_w")
NoisePer = Literal["forward", "image"]
NOISE_PER: tuple[str, ...] = ("forward", "image")


#: the parameters a noise-injected layer adds to its convolution's (PNI's scale, CNI-W's covariance)
NOISE_PARAMETERS: tuple[str, ...] = ("alpha", "diag", "factor")


def noise_parameter_names(net: nn.Module) -> set[str]:
    """The state-dict names of every noise parameter of the noise-injected layers of ``net``."""
    return {
        f"{name}.{p}" if name else p
        for name, module in net.named_modules()
        if isinstance(module, NoisyConv2d)
        for p in NOISE_PARAMETERS
        if getattr(module, p, None) is not None
    }


def check_noise_kind(kind: str) -> str:
    if kind not in NOISE_KINDS:
        raise ConfigError(f"noise must be one of {list(NOISE_KINDS)}, got {kind!r}")
    return kind


def check_noise_per(per: str) -> str:
    """``forward`` (one weight draw per forward pass, paper 003) or ``image`` (per image)."""
    if per not in NOISE_PER:
        raise ConfigError(f"noise_per must be one of {list(NOISE_PER)}, got {per!r}")
    return per


def weight_noise_per(net: nn.Module) -> str | None:
    """How the weight-noise layers of ``net`` draw (``forward`` or ``image``), or ``None`` when it
    has none (no noise, or activation noise only)."""
    modes = {m.noise_per for m in net.modules() if isinstance(m, NoisyConv2d) and m.noise in ("pni_w", "cni_w")}
    if len(modes) > 1:
        raise ConfigError(f"the network's noisy layers draw their weight noise differently: {sorted(modes)}")
    return modes.pop() if modes else None


class NoisyConv2d(nn.Conv2d):
    """A convolution with PNI noise on its weights (``pni_w``) or on its output (``pni_a``).

    Args (besides :class:`torch.nn.Conv2d`'s):
        noise: ``none``, ``pni_w``, ``pni_a`` or ``cni_w``.
        alpha: the initial noise scale of PNI (0.25), a learned parameter.
        rank: the rank of CNI-W's factor (5); diag_init, factor_init: its initial values (0.25^2, 0.01).
        noise_per: ``forward`` (one weight draw per forward pass, paper 003) or ``image`` (one
            per image; the default, see the module docstring).
        noise_seeding: the model's shared :class:`~safespot.smoothing.soft.NoiseSeeding` (one per
            network, so that :func:`~safespot.smoothing.seeded_noise` finds and seeds it).
    """

    def __init__(
        self,
        *args,
        noise: NoiseKind = "pni_w",
        alpha: float = 0.25,
        rank: int = 5,
        diag_init: float = 0.25**2,
        factor_init: float = 0.01,
        noise_per: NoisePer = "image",
        noise_seeding: NoiseSeeding | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.noise = check_noise_kind(noise)
        self.noise_per = check_noise_per(noise_per)
        self.alpha = nn.Parameter(torch.tensor(float(alpha))) if self.noise in ("pni_w", "pni_a") else None
        if self.noise == "cni_w":
            if int(rank) < 0:
                raise ConfigError(f"rank must be >= 0, got {rank}")
            size = self.weight.numel()
            self.diag = nn.Parameter(torch.full((size,), float(diag_init)))
            self.factor = nn.Parameter(torch.full((size, int(rank)), float(factor_init)))
        self.noise_seeding = noise_seeding if noise_seeding is not None else NoiseSeeding()

    def extra_repr(self) -> str:
        per = f", noise_per={self.noise_per}" if self.noise in ("pni_w", "cni_w") else ""
        return f"{super().extra_repr()}, noise={self.noise}{per}"

    def _draws(
        self, rows: int, shape: torch.Size, like: torch.Tensor, passes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``rows`` standard normal tensors of ``shape``: one per pass key of ``passes`` (inside
        ``seeded_noise``, noise shared by a forward pass), seeded per image inside
        ``seeded_noise``, else from the global RNG."""
        count = int(torch.Size(shape).numel())
        if passes is not None:
            draws = self.noise_seeding.pass_normal(passes, count, "injected_noise", like.device, like.dtype)
            return draws.view(rows, *shape)
        if self.noise_seeding.active:
            return self.noise_seeding.normal(rows, count, "injected_noise", like.device, like.dtype).view(rows, *shape)
        return torch.randn((rows, *shape), device=like.device, dtype=like.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.noise == "pni_a":
            out = super().forward(x)
            # std per image (over channels and positions), so one image's noise never depends on its batch
            spread = out.detach().flatten(1).std(dim=1).view(-1, *([1] * (out.dim() - 1)))
            return out + self.alpha * spread * self._draws(out.shape[0], out.shape[1:], out)
        if self.noise in ("pni_w", "cni_w"):
            return self._per_pass(x) if self.noise_per == "forward" else self._per_image(x)
        return super().forward(x)

    def weight_noise(self, rows: int, passes: torch.Tensor | None = None) -> torch.Tensor:
        """``rows`` draws of the weight perturbation, shape ``(rows, *weight.shape)`` (with
        ``passes``, one per pass key: ``rows == len(passes)``)."""
        w = self.weight
        if self.noise == "pni_w":
            return self.alpha * w.detach().std() * self._draws(rows, w.shape, w, passes)
        z_d = self._draws(rows, torch.Size([w.numel()]), w, passes)
        colored = torch.sqrt((w.std() * self.diag).abs() + 1e-8) * z_d
        if self.factor.shape[1]:
            colored = colored + self._draws(rows, torch.Size([self.factor.shape[1]]), w, passes) @ self.factor.T
        return colored.view(rows, *w.shape)

    def _per_pass(self, x: torch.Tensor) -> torch.Tensor:
        """One weight draw per forward pass, shared by its images (``noise_per=forward``): the
        call (global RNG), or inside ``seeded_noise`` each pass of
        :meth:`~safespot.smoothing.soft.NoiseSeeding.pass_keys` through its own noisy weights."""
        if not self.noise_seeding.active:
            return self._conv_forward(x, self.weight + self.weight_noise(1)[0], self.bias)
        keys, which = self.noise_seeding.pass_keys(len(x), x.device)
        noise = self.weight_noise(len(keys), keys)
        if which is None:  # the passes are the call's copies of the batch, in order
            parts = x.chunk(len(keys))
            return torch.cat(
                [self._conv_forward(p, self.weight + n, self.bias) for p, n in zip(parts, noise, strict=True)]
            )
        out = None
        for k in range(len(keys)):  # a few passes per call (the smoothed vote's draws)
            rows = (which == k).nonzero().squeeze(1)
            part = self._conv_forward(x[rows], self.weight + noise[k], self.bias)
            out = part.new_empty((len(x), *part.shape[1:])) if out is None else out
            out[rows] = part
        assert out is not None
        return out

    def _per_image(self, x: torch.Tensor) -> torch.Tensor:
        """Each image through its own noisy weights: ``conv(x_i, W) + conv(x_i, noise_i)``, the
        second term as one grouped convolution."""
        b = x.shape[0]
        clean = self._conv_forward(x, self.weight, self.bias)
        noise = self.weight_noise(b)  # (B, C_out, C_in / groups, k, k)
        grouped = noise.reshape(b * self.out_channels, *self.weight.shape[1:])
        noisy = F.conv2d(
            x.reshape(1, b * self.in_channels, *x.shape[2:]),
            grouped,
            None,
            self.stride,
            self.padding,
            self.dilation,
            self.groups * b,
        )
        return clean + noisy.view(b, self.out_channels, *noisy.shape[2:])


def noise_scales(model: nn.Module) -> dict[str, float]:
    """The learned ``alpha`` of every noisy layer (for logs and reports)."""
    return {
        name: float(module.alpha.detach())
        for name, module in model.named_modules()
        if isinstance(module, NoisyConv2d) and module.alpha is not None
    }


def noise_levels(state: Mapping[str, torch.Tensor]) -> list[float]:
    """Per noisy convolution of a state dict (e.g. a checkpoint's ``state_dict``), in its order,
    the standard deviation of the learned noise relative to that of the tensor it perturbs: PNI
    ``|alpha|`` (the noise is ``alpha std(v) eta``; ``v`` the weights for PNI-W, the activations for
    PNI-A); CNI-W ``sqrt(mean_j(|std(W) d_j| + ||F_j||^2)) / std(W)``, the root mean variance over
    the weights ``j`` of ``sqrt(|std(W) d|) z_d + F z_f`` (:meth:`NoisyConv2d.weight_noise`)
    relative to the weights' standard deviation."""
    levels = []
    for key, value in state.items():
        if key.endswith(".alpha"):
            levels.append(abs(float(value)))
        elif key.endswith(".diag"):
            prefix = key[: -len("diag")]
            w_std = float(state[f"{prefix}weight"].float().std())
            variance = (w_std * value.float()).abs() + (state[f"{prefix}factor"].float() ** 2).sum(1)
            levels.append(float(variance.mean().sqrt()) / w_std)
    return levels
