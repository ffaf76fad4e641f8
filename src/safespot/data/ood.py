"""Out-of-distribution data (paper 000, Sections 3.6 and 4.4).

Following Hendrycks et al. (2019, "Deep Anomaly Detection with Outlier Exposure"), three
distributions are involved: ``D_in`` (the classifier's classes), ``D_out^train`` (auxiliary
outliers seen during training and used to tune detectors) and ``D_out^test`` (outlier sets only
met at test time, disjoint from ``D_out^train``).

The outlier sources (``folder``, ``npy``, ``gaussian``, ``uniform`` specs, items
``(image in [0, 1], -1)``) are in :mod:`safespot.data.outliers`.

:class:`OutlierDataMixin` adds outliers to any :class:`~safespot.data.base.ImageDataModule`:
training batches become ``{"in": (x, y, index), "out": (x_out, -1, index)}`` with
``outlier_batch_size`` outliers (default twice the in-distribution batch, as Hendrycks et al.),
validation batches ``{"in": ..., "out": ...}`` over a seeded part of ``D_out^train`` held out of
training, and the test split stays in-distribution; :meth:`OutlierDataMixin.test_outlier_sets`
gives the ``D_out^test`` sets.

The method, not the datamodule, decides whether batches carry outliers: a LightningModule with
``needs_outliers = True`` (:class:`safespot.methods.ood.OutlierMixin`) calls
:meth:`OutlierDataMixin.with_outliers` in its ``setup`` hook; under a Trainer every other method
sees the plain in-distribution batches. Used without a Trainer (inspecting the data), the
loaders pair unless told otherwise.

:class:`ClassSplitOODDataModule` is an offline protocol on one ImageFolder dataset: some classes
are in-distribution (relabelled 0..k-1), disjoint other classes of ``train/`` are ``D_out^train``
and still other classes of ``test/`` are ``D_out^test``. :class:`SyntheticOODDataModule` does the
same on the synthetic template images, for tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from safespot.data.base import ImageDataModule, IndexedSubset, per_process_batch_size, seeded_choice
from safespot.data.errors import DataConfigError
from safespot.data.folders import CIFAR10DataModule, require_dir
from safespot.data.outliers import (
    OUTLIER_LABEL,
    FileImages,
    build_outlier_dataset,
    check_disjoint,
    check_outlier_spec,
    class_folders,
    folder_items,
    resolve_classes,
)
from safespot.data.samplers import CyclingSampler
from safespot.data.synthetic import SyntheticDataModule, make_synthetic
from safespot.data.transforms import build_transforms
from safespot.utils.rng import host_seed


# --- the mixin ----------------------------------------------------------------------------
class OutlierDataMixin:
    """Adds ``D_out^train`` and ``D_out^test`` to an :class:`ImageDataModule` subclass (put it
    first among the bases).

    Args:
        train_outliers: a source spec for ``D_out^train`` (default: the subclass's own, e.g.
            the training-outlier classes of a class split; ``None`` if it has none).
        test_outliers: ``{name: spec}`` of extra ``D_out^test`` sets (a ``null`` entry is dropped).
        outlier_batch_size: global outlier batch size (default ``2 * batch_size``).
        val_outlier_size: outliers held out of ``D_out^train`` (seeded) for validation and for
            tuning detectors; 0 disables validation AUROC.
        outlier_subset: a seeded subset of the remaining training outliers (``None``: all).
    """

    image_size: int = 32
    channels: int = 3

    def __init__(
        self,
        *args: Any,
        train_outliers: Mapping[str, Any] | None = None,
        test_outliers: Mapping[str, Mapping[str, Any] | None] | None = None,
        outlier_batch_size: int | None = None,
        val_outlier_size: int = 500,
        outlier_subset: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.train_outlier_spec = (
            check_outlier_spec(train_outliers, "data.train_outliers") if train_outliers is not None else None
        )
        self.test_outlier_specs = {
            str(name): check_outlier_spec(spec, f"data.test_outliers.{name}")
            for name, spec in (test_outliers or {}).items()
            if spec is not None
        }
        self.outlier_batch_size = int(outlier_batch_size or 2 * self.batch_size)
        if self.outlier_batch_size < 1:
            raise DataConfigError(f"data.outlier_batch_size must be >= 1, got {outlier_batch_size}")
        if val_outlier_size < 0:
            raise DataConfigError(f"data.val_outlier_size must be >= 0, got {val_outlier_size}")
        self.val_outlier_size, self.outlier_subset = int(val_outlier_size), outlier_subset
        self._with_outliers: bool | None = None  # see with_outliers()

    # --- to override ------------------------------------------------------------------------
    def default_train_outliers(self) -> Dataset | None:
        """``D_out^train`` when no ``train_outliers`` spec is given."""
        return None

    def default_test_outliers(self) -> dict[str, Dataset]:
        """The subclass's own ``D_out^test`` sets (e.g. a class split's held-out classes)."""
        return {}

    # --- datasets ---------------------------------------------------------------------------
    def train_outlier_pool(self) -> Dataset | None:
        if self.train_outlier_spec is not None:
            return build_outlier_dataset(
                self.train_outlier_spec, "data.train_outliers", self.image_size, self.channels, self.seed
            )
        return self.default_train_outliers()

    def test_outlier_sets(self) -> dict[str, IndexedSubset]:
        """``{name: dataset of (image, -1, index)}`` for every ``D_out^test`` set."""
        sets = dict(self.default_test_outliers())
        for name, spec in self.test_outlier_specs.items():
            sets[name] = build_outlier_dataset(
                spec,
                f"data.test_outliers.{name}",
                self.image_size,
                self.channels,
                host_seed(self.seed, "test_outliers"),
            )
        return {name: IndexedSubset(ds, range(len(ds))) for name, ds in sets.items()}

    def outlier_split(self, split: str) -> IndexedSubset | None:
        """The held-out (``val``) or training (``train``) part of ``D_out^train``, if any."""
        return self._datasets.get(f"{split}_outliers")

    def setup(self, stage: str | None = None) -> None:
        had = bool(self._datasets)
        super().setup(stage)
        if had:
            return
        pool = self.train_outlier_pool()
        if pool is None:
            return
        n = len(pool)
        if self.val_outlier_size >= n:
            raise DataConfigError(f"data.val_outlier_size={self.val_outlier_size} leaves no training outliers (of {n})")
        order = torch.randperm(
            n, generator=torch.Generator().manual_seed(host_seed(self.seed, "outlier_validation_split"))
        ).tolist()
        val, train = sorted(order[: self.val_outlier_size]), sorted(order[self.val_outlier_size :])
        train = seeded_choice(train, self.outlier_subset, host_seed(self.seed, "outlier_subset"), "data.outlier_subset")
        self.splits["train_outliers"], self.splits["val_outliers"] = train, val
        self._datasets["train_outliers"] = IndexedSubset(pool, train)
        if val:
            self._datasets["val_outliers"] = IndexedSubset(pool, val)

    # --- loaders ----------------------------------------------------------------------------
    def with_outliers(self, enabled: bool = True) -> OutlierDataMixin:
        """Ask for (or, with ``enabled=False``, refuse) training and validation batches paired
        with outliers, ``{"in": ..., "out": ...}``; called by a method that declares
        ``needs_outliers``. Takes effect at the next ``*_dataloader()`` call; returns ``self``."""
        self._with_outliers = bool(enabled)
        return self

    def paired(self) -> bool:
        """Whether loaders pair outliers with in-distribution batches: as set by
        :meth:`with_outliers`; when nobody asked, only outside a Trainer (so a method that does
        not declare ``needs_outliers`` sees in-distribution batches alone)."""
        if self._with_outliers is not None:
            return self._with_outliers
        return getattr(self, "trainer", None) is None

    def train_dataloader(self) -> Any:
        from lightning.pytorch.utilities import CombinedLoader

        loader = super().train_dataloader()
        outliers = self.outlier_split("train")
        if outliers is None or not self.paired():
            return loader
        world = self.world_size
        per_process = per_process_batch_size(self.outlier_batch_size, world, "data.outlier_batch_size")
        in_per_process = per_process_batch_size(self.batch_size, world)
        n_in = len(self._datasets["train"])
        batches = math.ceil(math.ceil(n_in / world) / in_per_process)
        rank = self.trainer.global_rank if world > 1 else 0
        sampler = CyclingSampler(
            len(outliers), batches * per_process, host_seed(self.seed, "outlier_pairing"), world, rank
        )
        out = DataLoader(
            outliers,
            batch_size=per_process,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
        return CombinedLoader({"in": loader, "out": out}, mode="min_size")

    def val_dataloader(self) -> Any:
        from lightning.pytorch.utilities import CombinedLoader

        loader = super().val_dataloader()
        if self.outlier_split("val") is None or not self.paired():
            return loader
        out = self._loader("val_outliers", self.eval_batch_size, train=False)
        return CombinedLoader({"in": loader, "out": out}, mode="max_size")


# --- datamodules --------------------------------------------------------------------------
class CIFAR10OODDataModule(OutlierDataMixin, CIFAR10DataModule):
    """CIFAR-10 as ``D_in`` (paper 000, Section 4.4) with outlier sources given as specs:
    ``train_outliers`` (e.g. 300K random 80M-Tiny-Images as ``npy``) and ``test_outliers``
    (CIFAR-100, SVHN, TinyImageNet, LSUN image folders, Gaussian and uniform noise)."""


class ClassSplitOODDataModule(OutlierDataMixin, ImageDataModule):
    """The class-split protocol on an ImageFolder tree ``root/{train_dir,test_dir}/<class>/``.

    ``in_classes`` (relabelled 0..k-1 in the given order) are ``D_in``; ``train_outlier_classes``
    of ``train_dir`` are ``D_out^train``; ``test_outlier_classes`` of ``test_dir`` form the
    ``D_out^test`` set ``held_out_name``. Classes are indices into the sorted folder names or
    folder names; the three sets must be pairwise disjoint (checked on construction, before any
    image is read). ``test_outliers`` adds further test sets (e.g. noise).
    """

    def __init__(
        self,
        root: str,
        in_classes: Sequence[int | str] = (0, 1, 2, 3, 4, 5),
        train_outlier_classes: Sequence[int | str] = (6, 7),
        test_outlier_classes: Sequence[int | str] = (8, 9),
        train_dir: str = "train",
        test_dir: str = "test",
        held_out_name: str = "held_out",
        image_size: int = 32,
        transforms: str = "cifar",
        num_classes: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = require_dir(root)
        for split in (train_dir, test_dir):
            if not (self.root / split).is_dir():
                raise DataConfigError(f"data.root={str(root)!r} must contain '{split}/' class folders")
        self.train_dir, self.test_dir, self.held_out_name = train_dir, test_dir, str(held_out_name)
        self.image_size, self.transforms = int(image_size), transforms
        build_transforms(transforms, self.image_size)  # validate early
        names = class_folders(self.root / train_dir)
        test_names = class_folders(self.root / test_dir)
        if test_names != names:
            raise DataConfigError(f"{self.root / train_dir} and {self.root / test_dir} hold different class folders")
        self.class_names = names
        self.in_classes = resolve_classes(in_classes, names, "data.in_classes")
        self.train_outlier_classes = (
            resolve_classes(train_outlier_classes, names, "data.train_outlier_classes") if train_outlier_classes else []
        )
        self.test_outlier_classes = (
            resolve_classes(test_outlier_classes, names, "data.test_outlier_classes") if test_outlier_classes else []
        )
        if len(self.in_classes) < 2:
            raise DataConfigError(f"data.in_classes needs at least 2 classes, got {list(in_classes)}")
        check_disjoint(
            {
                "data.in_classes": self.in_classes,
                "data.train_outlier_classes": self.train_outlier_classes,
                "data.test_outlier_classes": self.test_outlier_classes,
            },
            names,
        )
        if num_classes is not None and int(num_classes) != len(self.in_classes):
            raise DataConfigError(
                f"data.num_classes={num_classes} but data.in_classes lists {len(self.in_classes)} classes"
            )
        self.num_classes = len(self.in_classes)

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        train_tf, test_tf = build_transforms(self.transforms, self.image_size)
        train_items = folder_items(self.root / self.train_dir, self.in_classes, label=None)
        test_items = folder_items(self.root / self.test_dir, self.in_classes, label=None)
        return (
            FileImages(train_items, self.image_size, transform=train_tf),
            FileImages(train_items, self.image_size, transform=test_tf),
            FileImages(test_items, self.image_size, transform=test_tf),
        )

    def default_train_outliers(self) -> Dataset | None:
        if not self.train_outlier_classes:
            return None
        _, test_tf = build_transforms(self.transforms, self.image_size)
        items = folder_items(self.root / self.train_dir, self.train_outlier_classes)
        return FileImages(items, self.image_size, transform=test_tf)

    def default_test_outliers(self) -> dict[str, Dataset]:
        if not self.test_outlier_classes:
            return {}
        _, test_tf = build_transforms(self.transforms, self.image_size)
        items = folder_items(self.root / self.test_dir, self.test_outlier_classes)
        return {self.held_out_name: FileImages(items, self.image_size, transform=test_tf)}


class SyntheticOODDataModule(OutlierDataMixin, SyntheticDataModule):
    """Synthetic template images (:mod:`safespot.data.synthetic`) split by class: the first
    ``num_classes`` templates are ``D_in``, the next ``outlier_classes`` give ``n_outliers``
    training outliers and the last ``held_out_classes`` give ``n_test_outliers`` test outliers
    (the ``held_out`` set). No files needed."""

    def __init__(
        self,
        num_classes: int = 4,
        outlier_classes: int = 2,
        held_out_classes: int = 2,
        n_outliers: int = 256,
        n_test_outliers: int = 128,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("val_outlier_size", 64)
        super().__init__(num_classes=num_classes, **kwargs)
        for name, value in (("outlier_classes", outlier_classes), ("held_out_classes", held_out_classes)):
            if value < 0:
                raise DataConfigError(f"data.{name} must be >= 0, got {value}")
        if outlier_classes < 1:
            raise DataConfigError("data.outlier_classes must be >= 1 (the training outliers)")
        self.outlier_classes, self.held_out_classes = int(outlier_classes), int(held_out_classes)
        self.n_outliers, self.n_test_outliers = int(n_outliers), int(n_test_outliers)
        self.image_size, self.channels = self.shape[3], self.shape[4]

    def _images(self, n: int, classes: range, split_seed: int, relabel: bool) -> Dataset:
        _, _, k, size, c, amp, noise, seed = self.shape
        total = k + self.outlier_classes + self.held_out_classes
        data = make_synthetic(math.ceil(n * total / len(classes)) + total, total, size, c, amp, noise, seed, split_seed)
        images, labels = data.tensors
        keep = torch.nonzero((labels >= classes.start) & (labels < classes.stop)).flatten()[:n]
        targets = labels[keep] - classes.start if relabel else torch.full((len(keep),), OUTLIER_LABEL)
        return torch.utils.data.TensorDataset(images[keep], targets)

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        n_train, n_test, k = self.shape[0], self.shape[1], self.shape[2]
        train = self._images(n_train, range(k), 1, relabel=True)
        return train, train, self._images(n_test, range(k), 2, relabel=True)

    def default_train_outliers(self) -> Dataset:
        k = self.num_classes
        return self._images(self.n_outliers, range(k, k + self.outlier_classes), 3, relabel=False)

    def default_test_outliers(self) -> dict[str, Dataset]:
        if not self.held_out_classes:
            return {}
        start = self.num_classes + self.outlier_classes
        return {"held_out": self._images(self.n_test_outliers, range(start, start + self.held_out_classes), 4, False)}
