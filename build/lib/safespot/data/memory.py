"""A whole decoded dataset held as one tensor, with batched augmentation.

For CIFAR-sized data (60,000 images of 3 x 32 x 32 are 184 MB as uint8) decoding JPEGs in
loader workers is the slowest part of a training step on a fast GPU. ``data.in_memory=true``
decodes every image of a split once, keeps the images as a single tensor (on the training
device when there is one), and cuts batches out of it with the augmentation applied to the
whole batch at once: random crop with zero padding and horizontal flip, the same
distribution as torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` of the
file-based pipeline.

Batches are ``(images in [0, 1], labels, dataset indices)`` like the file-based loaders; the
order of a training epoch depends only on ``(seed, epoch)`` (the same permutation as
:class:`~safespot.data.samplers.EpochSeededSampler`), and an image's crop and flip only on
``(seed, its dataset index, epoch)`` (the ``"augmentation"`` stream of
:func:`safespot.utils.rng.streams`, drawn on the images' device): not on its batch, the
process that loads it or the number of processes, and a resumed run sees what an
uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from safespot.data.samplers import EpochSeededSampler
from safespot.utils.rng import seeded_uniform, streams


@dataclass(frozen=True)
class BatchAugment:
    """Random crop after zero padding by ``padding`` pixels, then a horizontal flip with
    probability 1/2, drawn independently per image from its own seed (one int64 per image, on
    the images' device: offsets and flip are three uniform draws of that seed's stream)."""

    padding: int = 4
    flip: bool = True

    def __call__(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.padding
        u = seeded_uniform(seeds, 3, device=x.device, dtype=torch.float64)  # (B, 3): dy, dx, flip
        if p > 0:
            padded = F.pad(x, (p, p, p, p))
            dy = (u[:, 0] * (2 * p + 1)).long()
            dx = (u[:, 1] * (2 * p + 1)).long()
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            batch = torch.arange(b, device=x.device)[:, None, None, None]
            channel = torch.arange(c, device=x.device)[None, :, None, None]
            x = padded[batch, channel, rows, cols]
        if self.flip:
            flip = u[:, 2] < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x


def decode_all(dataset: Dataset, num_workers: int = 0, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``(image, label, index)`` item of ``dataset`` as one image tensor and one label
    tensor, in dataset order. Images are kept as uint8 when that is lossless (decoded 8-bit
    files), else as float32."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    images, labels = [], []
    for x, y, *_ in loader:
        images.append(x)
        labels.append(torch.as_tensor(y))
    x = torch.cat(images)
    as_bytes = (x * 255).round()
    if torch.equal(as_bytes / 255, x):
        return as_bytes.to(torch.uint8), torch.cat(labels)
    return x.float(), torch.cat(labels)


class InMemoryLoader:
    """Batches of a decoded split (see the module docstring).

    Args:
        images, labels, indices: the split (``indices`` are the dataset indices reported
            with each batch).
        batch_size: per process.
        train: shuffle every epoch (seeded by ``seed`` and the epoch) and augment.
        augment: the batched augmentation for training (``None``: none).
        rank, world_size: this process's shard. Training shards the epoch's permutation
            like ``DistributedSampler`` (padded by wrapping so every process runs the same
            number of steps); evaluation reads positions ``rank, rank + N, ...`` without
            padding, so every image is evaluated once.
        device: where the images live and batches are made (moved there on first use).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        batch_size: int,
        train: bool,
        seed: int = 0,
        augment: BatchAugment | None = None,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        self.images, self.labels, self.indices = images, labels, indices
        self.batch_size, self.train, self.seed, self.augment = batch_size, train, seed, augment
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.sampler = EpochSeededSampler(len(images), seed)  # Lightning calls its set_epoch
        self.batch_sampler = None  # what Lightning looks for next to ``sampler``

    def _positions(self) -> torch.Tensor:
        n = len(self.images)
        if not self.train:
            return torch.arange(self.rank, n, self.world_size)
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        per_rank = -(-n // self.world_size)
        if per_rank * self.world_size > n:
            order = torch.cat([order, order[: per_rank * self.world_size - n]])
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        return -(-len(self._positions()) // self.batch_size)

    def _to_device(self) -> None:
        if self.images.device != self.device:
            self.images, self.labels = self.images.to(self.device), self.labels.to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self._to_device()
        positions = self._positions()
        augment = self.augment if self.train else None
        for batch in positions.split(self.batch_size):
            rows = batch.to(self.device)
            x = self.images[rows]
            x = x.float() / 255 if x.dtype == torch.uint8 else x.clone()
            if augment is not None:
                index = self.indices[batch].to(self.device)
                x = augment(x, streams(self.seed, index, "augmentation", self.sampler.epoch))
            yield x, self.labels[rows], self.indices[batch]
