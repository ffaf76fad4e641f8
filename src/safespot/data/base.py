"""The base LightningDataModule: seeded held-out validation split, seeded subsets,
per-process batch size, and batches of ``(images in [0, 1], labels, dataset indices)``."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from safespot.data.errors import DataConfigError
from safespot.data.memory import BatchAugment, InMemoryLoader, decode_all
from safespot.data.samplers import EpochSeededSampler, ShardSampler
from safespot.utils.rng import host_seed

__all__ = [
    "DataConfigError",
    "EpochSeededSampler",
    "ImageDataModule",
    "IndexedSubset",
    "ShardSampler",
    "per_process_batch_size",
]


def per_process_batch_size(global_batch_size: int, world_size: int, name: str = "data.batch_size") -> int:
    """Split a global batch size across processes, refusing sizes that do not divide."""
    if global_batch_size < 1:
        raise DataConfigError(f"{name} must be >= 1, got {global_batch_size}")
    if global_batch_size % world_size != 0:
        raise DataConfigError(
            f"{name}={global_batch_size} is the global batch size and must be divisible by the "
            f"number of processes ({world_size}); choose a multiple of {world_size}"
        )
    return global_batch_size // world_size


class IndexedSubset(Dataset):
    """A view of ``dataset`` at ``indices`` whose items are ``(image, label, index)`` with
    the index in the underlying dataset, so records can be traced back to images."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        index = self.indices[i]
        image, label = self.dataset[index]
        return image, int(label), index


def seeded_choice(pool: Sequence[int], n: int | None, seed: int, name: str) -> list[int]:
    """``n`` items of ``pool`` chosen with a fixed seed, kept in ascending order."""
    if n is None:
        return list(pool)
    if not 1 <= n <= len(pool):
        raise DataConfigError(f"{name} must be between 1 and {len(pool)}, got {n}")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(pool), generator=g)[:n]
    return sorted(pool[i] for i in chosen.tolist())


#: the splits ``data.eval_split`` may test: the test images, or the held-out validation images
EVAL_SPLITS = ("test", "val")


def _check_part(part: Sequence[int] | None) -> tuple[int, int] | None:
    """``data.test_part`` as ``(k, K)``, refused unless ``0 <= k < K``."""
    if part is None:
        return None
    values = list(part)
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise DataConfigError(f"data.test_part takes two integers [k, K] (part k of K), got {part!r}")
    k, parts = values
    if not 0 <= k < parts:
        raise DataConfigError(f"data.test_part=[k, K] needs 0 <= k < K, got [{k}, {parts}]")
    return k, parts


def part_of(indices: Sequence[int], k: int, parts: int) -> list[int]:
    """Part ``k`` of ``parts`` contiguous, near-equal pieces of ``indices`` (sizes differ by at most
    one; the pieces, in order, are ``indices``). Every record is keyed and seeded by its image's
    index, so the parts' records together are the whole split's."""
    n = len(indices)
    if parts > n:
        raise DataConfigError(f"data.test_part splits {n} test images into {parts} parts: some would be empty")
    start, stop = (k * n) // parts, ((k + 1) * n) // parts
    return list(indices[start:stop])


class ImageDataModule(L.LightningDataModule):
    """Common logic of every image datamodule.

    Subclasses implement :meth:`build_datasets` returning ``(train_augmented,
    train_plain, test)`` datasets of ``(image, label)`` pairs over the same training images.
    The validation split (``val_size`` images) is held out of the training set with
    ``seed``; ``*_subset`` options pick seeded subsets; ``test_part=(k, K)`` keeps the k-th of K
    contiguous pieces of the test split, so a long evaluation runs as K jobs (e.g. a SLURM array)
    whose records together equal one run's. ``eval_split="val"`` makes the held-out validation
    images (never trained on) the split that is tested, with ``test_subset`` and ``test_part``
    applied to them: a setting can then be chosen on images other than the test images it is
    compared on. ``batch_size`` is global: each of N
    processes loads ``batch_size / N``. ``mean``/``std`` are the channel statistics the
    model's first layer normalises with. ``in_memory`` decodes every split once and serves
    batches from one tensor on the training device with batched augmentation
    (:mod:`safespot.data.memory`); datamodules whose training augmentation has a batched
    form (``memory_augment``) support it.
    """

    num_classes: int = 10
    #: (padding, flip) of the batched training augmentation for ``in_memory``; ``None``
    #: refuses ``in_memory`` (an augmentation without a batched form), ``(0, False)``: none.
    memory_augment: tuple[int, bool] | None = None

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        val_size: int = 1000,
        train_subset: int | None = None,
        val_subset: int | None = None,
        test_subset: int | None = None,
        test_part: Sequence[int] | None = None,
        eval_split: str = "test",
        seed: int = 0,
        augment: bool = True,
        pin_memory: bool = False,
        num_classes: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        in_memory: bool = False,
    ) -> None:
        super().__init__()
        if in_memory and self.memory_augment is None:
            raise DataConfigError(
                f"data.in_memory=true is for CIFAR-sized data with crop-and-flip augmentation; "
                f"{type(self).__name__} with these transforms does not support it"
            )
        self.in_memory = in_memory
        self._memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if num_classes is not None:
            self.num_classes = int(num_classes)
        self.mean = list(mean) if mean is not None else [0.5, 0.5, 0.5]
        self.std = list(std) if std is not None else [0.5, 0.5, 0.5]
        if val_size < 0:
            raise DataConfigError(f"data.val_size must be >= 0, got {val_size}")
        for name, value in (("data.batch_size", batch_size), ("data.eval_batch_size", eval_batch_size)):
            if value is not None and value < 1:
                raise DataConfigError(f"{name} must be >= 1, got {value}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.train_subset, self.val_subset, self.test_subset = train_subset, val_subset, test_subset
        self.test_part = _check_part(test_part)
        if eval_split not in EVAL_SPLITS:
            raise DataConfigError(f"data.eval_split must be one of {list(EVAL_SPLITS)}, got {eval_split!r}")
        if eval_split == "val" and val_size == 0:
            raise DataConfigError("data.eval_split=val evaluates the held-out images: set data.val_size > 0")
        self.eval_split = eval_split
        self.seed = seed
        self.augment = augment
        self.pin_memory = pin_memory
        self.splits: dict[str, list[int]] = {}
        self._datasets: dict[str, IndexedSubset] = {}

    # --- to implement -------------------------------------------------------------------
    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        raise NotImplementedError

    # --- splits -------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._datasets:
            return
        train_aug, train_plain, test = self.build_datasets()
        if not self.augment:
            train_aug = train_plain
        n_train = len(train_plain)
        if self.val_size >= n_train:
            raise DataConfigError(f"data.val_size={self.val_size} leaves no training images (of {n_train})")
        order = torch.randperm(
            n_train, generator=torch.Generator().manual_seed(host_seed(self.seed, "validation_split"))
        ).tolist()
        val_pool, train_pool = sorted(order[: self.val_size]), sorted(order[self.val_size :])
        self.splits = {
            "train": seeded_choice(
                train_pool, self.train_subset, host_seed(self.seed, "train_subset"), "data.train_subset"
            ),
            "val": seeded_choice(val_pool, self.val_subset, host_seed(self.seed, "val_subset"), "data.val_subset")
            if val_pool
            else [],
            "test": seeded_choice(
                list(range(len(test))) if self.eval_split == "test" else val_pool,
                self.test_subset,
                host_seed(self.seed, "test_subset"),
                "data.test_subset",
            ),
        }
        if self.test_part is not None:
            self.splits["test"] = part_of(self.splits["test"], *self.test_part)
        self._datasets = {
            "train": IndexedSubset(train_aug, self.splits["train"]),
            "val": IndexedSubset(train_plain, self.splits["val"]),
            "test": IndexedSubset(test if self.eval_split == "test" else train_plain, self.splits["test"]),
        }
        if self.in_memory:
            plain = {"train": IndexedSubset(train_plain, self.splits["train"]), "val": self._datasets["val"]}
            for split, dataset in {**plain, "test": self._datasets["test"]}.items():
                self._memory[split] = decode_all(dataset, self.num_workers) if len(dataset) else (None, None)

    def save_splits(self, path: str | Path) -> Path:
        """Write the chosen train/val/test indices (into the run directory) as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"seed": self.seed, **self.splits}
        path.write_text(json.dumps(payload))
        return path

    def dataset(self, split: str) -> Dataset:
        """The ``train``, ``val`` or ``test`` split after :meth:`setup`: items ``(image, label,
        dataset index)``, transformed as its loader's."""
        if split not in self._datasets:
            raise KeyError(f"no {split!r} split (setup() makes {sorted(self._datasets)})")
        return self._datasets[split]

    # --- loaders ------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else 1

    def _loader(self, split: str, batch_size: int, train: bool) -> DataLoader | Iterable:
        dataset = self._datasets[split]
        per_process = per_process_batch_size(
            batch_size, self.world_size, "data.batch_size" if train else "data.eval_batch_size"
        )
        if self.in_memory and self._memory.get(split, (None,))[0] is not None:
            return self._memory_loader(split, per_process, train)
        kwargs: dict[str, Any] = {
            "batch_size": per_process,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
        }
        if train and self.world_size == 1:
            kwargs["sampler"] = EpochSeededSampler(len(dataset), self.seed)
        elif train:
            kwargs["shuffle"] = True  # under DDP Lightning swaps in a seeded DistributedSampler
        elif self.world_size > 1:
            kwargs["sampler"] = ShardSampler(dataset, self.world_size, self.trainer.global_rank, f"{split} split")
        return DataLoader(dataset, drop_last=False, **kwargs)

    def _memory_loader(self, split: str, per_process: int, train: bool) -> Iterable:
        images, labels = self._memory[split]
        trainer = getattr(self, "trainer", None)
        padding, flip = self.memory_augment or (0, False)
        return InMemoryLoader(
            images,
            labels,
            torch.tensor(self.splits[split]),
            per_process,
            train=train,
            seed=self.seed,
            augment=BatchAugment(padding, flip) if train and self.augment and (padding or flip) else None,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=self.world_size,
            device=trainer.strategy.root_device if trainer is not None else "cpu",
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, train=False)
