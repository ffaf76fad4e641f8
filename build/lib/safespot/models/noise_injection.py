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

Randomness. Outside :func:`safespot.smoothing.seeded_noise` one weight draw per forward pass is
shared by the batch (global RNG; training). Inside it, image ``i``'s noise at the block's t-th
forward pass is a function of its seed and ``t`` only, so predictions, votes and attacks do not
depend on the batch or the process: the weight variant then gives each image its own weights
(``W + alpha std(W) eta_i``; the convolution runs grouped, one group per image).
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


class NoisyConv2d(nn.Conv2d):
    """A convolution with PNI noise on its weights (``pni_w``) or on its output (``pni_a``).

    Args (besides :class:`torch.nn.Conv2d`'s):
        noise: ``none``, ``pni_w``, ``pni_a`` or ``cni_w``.
        alpha: the initial noise scale of PNI (0.25), a learned parameter.
        rank: the rank of CNI-W's factor (5); diag_init, factor_init: its initial values (0.25^2, 0.01).
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
        noise_seeding: NoiseSeeding | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.noise = check_noise_kind(noise)
        self.alpha = nn.Parameter(torch.tensor(float(alpha))) if self.noise in ("pni_w", "pni_a") else None
        if self.noise == "cni_w":
            if int(rank) < 0:
                raise ConfigError(f"rank must be >= 0, got {rank}")
            size = self.weight.numel()
            self.diag = nn.Parameter(torch.full((size,), float(diag_init)))
            self.factor = nn.Parameter(torch.full((size, int(rank)), float(factor_init)))
        self.noise_seeding = noise_seeding if noise_seeding is not None else NoiseSeeding()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise={self.noise}"

    def _draws(self, rows: int, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        """``rows`` standard normal tensors of ``shape``: seeded per image inside
        ``seeded_noise``, else from the global RNG."""
        if self.noise_seeding.active:
            count = int(torch.Size(shape).numel())
            return self.noise_seeding.normal(rows, count, "injected_noise", like.device, like.dtype).view(rows, *shape)
        return torch.randn((rows, *shape), device=like.device, dtype=like.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.noise == "pni_a":
            out = super().forward(x)
            # std per image (over channels and positions), so one image's noise never depends on its batch
            spread = out.detach().flatten(1).std(dim=1).view(-1, *([1] * (out.dim() - 1)))
            return out + self.alpha * spread * self._draws(out.shape[0], out.shape[1:], out)
        if self.noise in ("pni_w", "cni_w"):
            if not self.noise_seeding.active:  # one draw for the batch
                return self._conv_forward(x, self.weight + self.weight_noise(1)[0], self.bias)
            return self._per_image(x)
        return super().forward(x)

    def weight_noise(self, rows: int) -> torch.Tensor:
        """``rows`` draws of the weight perturbation, shape ``(rows, *weight.shape)``."""
        w = self.weight
        if self.noise == "pni_w":
            return self.alpha * w.detach().std() * self._draws(rows, w.shape, w)
        z_d = self._draws(rows, torch.Size([w.numel()]), w)
        colored = torch.sqrt((w.std() * self.diag).abs() + 1e-8) * z_d
        if self.factor.shape[1]:
            colored = colored + self._draws(rows, torch.Size([self.factor.shape[1]]), w) @ self.factor.T
        return colored.view(rows, *w.shape)

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
