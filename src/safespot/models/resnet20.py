"""ResNet-20, the CIFAR residual network of He et al. (2016, "Deep Residual Learning for Image
Recognition", Section 4.2), paper 003's CIFAR-10 model: a 3x3 convolution with 16 filters, three
stages of ``n = 3`` basic blocks with 16, 32 and 64 filters (stride 2 at the first block of the
second and third stage), global average pooling and a linear layer; identity shortcuts, with
zero-padded channels and subsampling where the shape changes (option A); 0.27M parameters.

``noise`` makes every convolution a noise-injected one (:mod:`safespot.models.noise_injection`;
``pni_w``: PNI on the weights, ``pni_a``: on the activations, ``cni_w``: colored noise on the
weights), the base models of paper 003. The linear layer stays noise-free (the code accompanying
paper 003 also perturbs it with white noise; a choice left open by the paper's text).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from safespot.models.noise_injection import NoiseKind, NoisePer, NoisyConv2d, check_noise_kind, check_noise_per
from safespot.smoothing.soft import NoiseSeeding


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, conv: type[nn.Module], **noise) -> None:
        super().__init__()
        self.conv1 = conv(cin, cout, 3, stride, 1, bias=False, **noise)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv(cout, cout, 3, 1, 1, bias=False, **noise)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Option A: subsample, and pad the new channels with zeros (no parameters)."""
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 (``blocks`` per stage: 3), optionally noise-injected (``noise``; PNI's initial
    ``alpha``, CNI-W's ``rank`` and initial ``diag_init`` / ``factor_init``, how the weight noise
    is drawn, ``noise_per``: see :class:`~safespot.models.noise_injection.NoisyConv2d`)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        blocks: int = 3,
        noise: NoiseKind = "none",
        alpha: float = 0.25,
        rank: int = 5,
        diag_init: float = 0.25**2,
        factor_init: float = 0.01,
        noise_per: NoisePer = "image",
    ) -> None:
        super().__init__()
        check_noise_kind(noise)
        check_noise_per(noise_per)
        self.num_classes, self.noise = num_classes, noise
        if noise == "none":
            conv, options = nn.Conv2d, {}
        else:
            self.noise_seeding = NoiseSeeding()  # one source for every layer (seeded_noise finds it)
            options = {"noise": noise, "alpha": alpha, "rank": rank, "noise_seeding": self.noise_seeding}
            options |= {"diag_init": diag_init, "factor_init": factor_init, "noise_per": noise_per}
            conv = NoisyConv2d
        layers: list[nn.Module] = [conv(in_channels, 16, 3, 1, 1, bias=False, **options), nn.BatchNorm2d(16), nn.ReLU()]
        cin = 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                layers.append(_Block(cin, width, stride if i == 0 else 1, conv, **options))
                cin = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
