"""A deterministic synthetic image dataset that a small CNN learns in seconds.

Each class owns a smooth random template (a coarse grid of random intensities upsampled to
the image size); an image is ``0.5 + amplitude * template + noise`` clamped to [0, 1]. The
class signal is large and spatially smooth, so robust classifiers exist at the usual
budgets, while noise makes naturally trained models rely on fragile directions. Used by the
test suite and for debugging without any files.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from safespot.data.base import ImageDataModule
from safespot.utils.rng import host_seed


def make_synthetic(
    n: int, num_classes: int, image_size: int, channels: int, amplitude: float, noise: float, seed: int, split_seed: int
) -> TensorDataset:
    templates_gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=templates_gen) * 2 - 1
    templates = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(host_seed(seed, "synthetic_split", split_seed))
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    images = 0.5 + amplitude * templates[labels] + noise * torch.randn(n, channels, image_size, image_size, generator=g)
    return TensorDataset(images.clamp(0, 1), labels)


class SyntheticDataModule(ImageDataModule):
    memory_augment = (0, False)  # no training augmentation

    def __init__(
        self,
        num_classes: int = 4,
        image_size: int = 16,
        channels: int = 3,
        n_train: int = 512,
        n_test: int = 128,
        amplitude: float = 0.25,
        noise: float = 0.15,
        data_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("val_size", 64)
        kwargs.setdefault("num_workers", 0)
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.shape = (n_train, n_test, num_classes, image_size, channels, amplitude, noise, data_seed)

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        n_train, n_test, k, size, c, amp, noise, seed = self.shape
        train = make_synthetic(n_train, k, size, c, amp, noise, seed, split_seed=1)
        return train, train, make_synthetic(n_test, k, size, c, amp, noise, seed, split_seed=2)
