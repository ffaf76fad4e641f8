"""Samplers of the datamodules: the seeded training order, the evaluation shards of N
processes, the cycling order of training outliers and whole batches dealt to N processes.

Every order depends only on ``(seed, epoch)`` and the process's rank, so a resumed run sees
exactly the batches an uninterrupted one would. The distributed ones are
``DistributedSampler`` subclasses, so Lightning keeps them instead of swapping in its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DistributedSampler, Sampler

from safespot.data.errors import DataConfigError
from safespot.utils.rng import host_seed


class EpochSeededSampler(Sampler[int]):
    """Random order that depends only on ``(seed, epoch)``, so a resumed run sees exactly
    the batches an uninterrupted one would. Lightning calls ``set_epoch`` every epoch."""

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of epoch ``epoch`` (called by Lightning)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(host_seed(self.seed, "epoch_order", self.epoch))
        return iter(torch.randperm(self.length, generator=g).tolist())

    def __len__(self) -> int:
        return self.length


class ShardSampler(UnrepeatedDistributedSampler):
    """Evaluation sampler for N processes: rank r reads positions r, r + N, r + 2N, ...

    This is Lightning's :class:`~lightning.pytorch.overrides.distributed.UnrepeatedDistributedSampler`
    without shuffling, which does exactly this job: unlike ``DistributedSampler`` it never
    pads, so every image is evaluated exactly once (shards differ in length by at most one),
    and the order is fixed, so the records of all processes can be merged by dataset index.
    This subclass only fixes ``shuffle=False`` and turns Lightning's ``assert`` that every
    process gets at least one item into a :class:`DataConfigError` (a process without a batch
    would stall the others at the first collective).

    Args:
        dataset: the split (only its length is used).
        num_replicas: the number of processes N.
        rank: this process's rank r.
        name: the split, for the error message.
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int, name: str = "evaluation split") -> None:
        if 0 < len(dataset) < num_replicas:
            raise DataConfigError(
                f"the {name} has {len(dataset)} images, fewer than the {num_replicas} processes: "
                "every process needs at least one (use a larger subset or fewer devices)"
            )
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)


class CyclingSampler(DistributedSampler):
    """Outlier order for one epoch: ``num_samples`` indices per process taken from successive
    random permutations of the pool, seeded by ``(seed, epoch)`` only (a resumed run sees the
    same outliers). Process ``rank`` of ``num_replicas`` takes its own contiguous slice.

    A ``DistributedSampler`` subclass so that Lightning keeps it under DDP; it sets the
    attributes Lightning reads instead of calling ``DistributedSampler.__init__`` (which needs
    a dataset and an initialised process group).
    """

    def __init__(self, length: int, num_samples: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.length, self.num_samples, self.seed = int(length), int(num_samples), int(seed)
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self.shuffle, self.drop_last, self.total_size = True, False, self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the order of epoch ``epoch`` (called by Lightning)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(host_seed(self.seed, "epoch_order", self.epoch))
        order: list[int] = []
        while len(order) < self.total_size:
            order += torch.randperm(self.length, generator=g).tolist()
        start = self.rank * self.num_samples
        return iter(order[start : start + self.num_samples])

    def __len__(self) -> int:
        return self.num_samples


class WholeBatchSampler(DistributedSampler):
    """A set's images for process ``rank`` of ``num_replicas`` in whole batches, as one process
    batches the set: batch ``b`` (positions ``b * batch_size`` to ``(b + 1) * batch_size - 1``)
    is in slice ``b mod slices`` and every slice goes to process ``slice mod num_replicas``; each
    process gets its batches in batch order. Loaded with the same ``batch_size``, every batch a
    process sees is a batch of the one-process run, so per-batch sums kept per slice are the same
    whatever the number of processes (the fitting statistics of OOD detectors,
    :data:`safespot.ood.detectors.base.FIT_SLICES`). A process may get no batch (more processes
    than slices or batches). A ``DistributedSampler`` subclass, so Lightning keeps it."""

    def __init__(self, length: int, batch_size: int, slices: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.length, self.batch_size, self.slices = int(length), int(batch_size), int(slices)
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self.shuffle, self.drop_last, self.total_size = False, False, self.length
        batches = range(-(-self.length // self.batch_size))
        mine = [b for b in batches if (b % self.slices) % num_replicas == rank]
        self.positions = [p for b in mine for p in range(b * batch_size, min((b + 1) * batch_size, self.length))]
        self.num_samples = len(self.positions)

    def set_epoch(self, epoch: int) -> None:
        """Kept for Lightning (the order does not depend on the epoch)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(self.positions)

    def __len__(self) -> int:
        return self.num_samples
