"""The image sets of an OOD run (paper 000, Section 4.4) as one datamodule: the
in-distribution training images detectors are fitted on, the tuning sets (in-distribution
validation images and ``D_out^train``) and the test sets (the in-distribution test images and
every ``D_out^test`` set), each a seeded subset, all built from the checkpoint's own data.

The run's loaders (:meth:`OODDataModule.test_dataloader`) are the sets its detectors need, in
stage order (fit, tune, score; :meth:`OODDataModule.select`), with items ``(image, label,
dataset index, position in the set)``. With N processes the fitting images go to the processes
in whole batches (:class:`~safespot.data.samplers.WholeBatchSampler`) and every other set by
position (process r takes r, r + N, ...; :class:`~safespot.data.samplers.ShardSampler`), so
every image is worked on once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from safespot.data.base import IndexedSubset, seeded_choice
from safespot.data.ood import OutlierDataMixin
from safespot.data.outliers import build_outlier_dataset
from safespot.data.samplers import ShardSampler, WholeBatchSampler
from safespot.errors import ConfigError
from safespot.ood.detectors.base import FIT_SLICES, TUNE_IN, TUNE_OUT
from safespot.ood.report import IN_DISTRIBUTION
from safespot.utils.logging import get_logger
from safespot.utils.rng import host_seed

log = get_logger("safespot.ood")

FIT, TUNE, SCORE = "fit", "tune", "score"
STAGES = (FIT, TUNE, SCORE)


@dataclass(frozen=True)
class Loader:
    """One loader of an OOD run: its ``stage`` (:data:`STAGES`), the set's ``name`` (``fit``,
    ``tune_in``, ``tune_out`` or a test set's) and the set's ``size``."""

    stage: str
    name: str
    size: int


class Positioned(Dataset):
    """``dataset``'s items ``(image, label, index)`` with their position in it appended."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> tuple[Any, ...]:
        return (*self.dataset[position], position)


def seeded_subset(dataset: Dataset, n: int | None, seed: int, name: str) -> IndexedSubset:
    """A seeded subset (all of it when ``n`` is None or covers it), keeping dataset indices."""
    base_indices = dataset.indices if isinstance(dataset, IndexedSubset) else list(range(len(dataset)))
    base = dataset.dataset if isinstance(dataset, IndexedSubset) else dataset
    if n is not None and n < len(base_indices):
        base_indices = seeded_choice(base_indices, n, seed, name)
    return IndexedSubset(base, base_indices)


class OODDataModule(L.LightningDataModule):
    """The sets of an OOD run over ``data``, the checkpoint's datamodule (module docstring).

    Args:
        data: the in-distribution datamodule (an :class:`~safespot.data.ood.OutlierDataMixin`
            brings its own ``D_out^train`` and ``D_out^test`` sets).
        outliers: extra ``D_out^test`` sets, ``{name: checked outlier spec}``.
        tune_outliers: a checked spec for ``D_out^train`` (default: the data's held-out training
            outliers).
        fit_subset, tune_subset, outlier_subset: seeded subset sizes (``None``: all) of the fitting
            images, of each tuning set and of each test outlier set.
        batch_size: images per batch in each process.
        num_workers: data-loading workers.
        seed: the run's seed (subsets, noise outliers).
    """

    def __init__(
        self,
        data: L.LightningDataModule,
        outliers: Mapping[str, Any] | None = None,
        tune_outliers: Any | None = None,
        fit_subset: int | None = None,
        tune_subset: int | None = None,
        outlier_subset: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.data, self.outliers, self.tune_outliers = data, dict(outliers or {}), tune_outliers
        self.fit_subset, self.tune_subset, self.outlier_subset = fit_subset, tune_subset, outlier_subset
        self.batch_size, self.num_workers, self.seed = int(batch_size), int(num_workers), int(seed)
        self.fit: IndexedSubset | None = None
        self.tune: dict[str, Dataset] = {}
        self.test: dict[str, Dataset] = {}
        self.num_classes = 0
        self.loaders: list[Loader] = []

    def prepare_data(self) -> None:
        """The checkpoint data's own preparation (e.g. ``data.download=true``)."""
        self.data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """Build the sets (once; a missing set or a reserved name is refused with one line)."""
        if self.fit is not None:
            return
        data, seed = self.data, self.seed
        data.setup("test")
        train_plain = data.build_datasets()[1]
        fit_set = IndexedSubset(train_plain, data.splits["train"])
        fit_set = seeded_subset(fit_set, self.fit_subset, host_seed(seed, "ood_fit_subset"), "fit_subset")
        val = data.splits["val"]
        if not val:
            log.warning("the data has no validation split (val_size=0): tuning on training images")
        tune_base = IndexedSubset(train_plain, val) if val else fit_set
        n = self.tune_subset
        tune = {TUNE_IN: seeded_subset(tune_base, n, host_seed(seed, "ood_tune_subset", 0), "tune_subset")}
        test_in = data.dataset("test")
        channels, size = int(test_in[0][0].shape[0]), int(test_in[0][0].shape[-1])
        test = {IN_DISTRIBUTION: test_in, **self._test_outliers(size, channels)}
        tune_out = self._tune_outliers(size, channels)
        if tune_out is not None and len(tune_out):
            tune[TUNE_OUT] = seeded_subset(tune_out, n, host_seed(seed, "ood_tune_subset", 1), "tune_subset")
        self.fit, self.tune, self.test, self.num_classes = fit_set, tune, test, int(data.num_classes)

    def _test_outliers(self, size: int, channels: int) -> dict[str, IndexedSubset]:
        """The ``D_out^test`` sets: the data's own, then ``outliers``, each a seeded subset."""
        sets = dict(self.data.test_outlier_sets()) if isinstance(self.data, OutlierDataMixin) else {}
        seed = host_seed(self.seed, "ood_extra_outliers")
        for name, spec in self.outliers.items():
            ds = build_outlier_dataset(spec, f"outliers.{name}", size, channels, seed)
            sets[name] = IndexedSubset(ds, range(len(ds)))
        if IN_DISTRIBUTION in sets:
            raise ConfigError(f"'{IN_DISTRIBUTION}' is reserved for the in-distribution test images; rename that set")
        if not sets:
            raise ConfigError(
                "no test outlier sets: the data defines none; add one, e.g. +outliers.noise={kind: uniform, n: 1000}"
            )
        n = self.outlier_subset
        return {
            name: seeded_subset(ds, n, host_seed(self.seed, "ood_outlier_subset", i), f"outlier_subset ({name})")
            for i, (name, ds) in enumerate(sets.items())
        }

    def _tune_outliers(self, size: int, channels: int) -> Dataset | None:
        """``D_out^train`` for tuning: ``tune_outliers``, else the data's held-out training outliers."""
        if self.tune_outliers is not None:
            seed = host_seed(self.seed, "ood_tune_outliers")
            return build_outlier_dataset(self.tune_outliers, "tune_outliers", size, channels, seed)
        return self.data.outlier_split("val") if isinstance(self.data, OutlierDataMixin) else None

    def probe(self) -> torch.Tensor:
        """The first fitting image, ``(1, C, H, W)`` (detectors find layers and sizes with it)."""
        return self.fit[0][0][None]

    def select(self, fit: bool, tuning: Iterable[str]) -> list[Loader]:
        """Choose the loaders of the run, in stage order: the fitting images if ``fit``, the tuning
        sets named in ``tuning`` (that exist), every test set. Returns them."""
        wanted = set(tuning)
        loaders = [Loader(FIT, FIT, len(self.fit))] if fit else []
        loaders += [Loader(TUNE, name, len(ds)) for name, ds in self.tune.items() if name in wanted]
        self.loaders = [*loaders, *(Loader(SCORE, name, len(ds)) for name, ds in self.test.items())]
        return self.loaders

    def dataset(self, loader: Loader) -> Dataset:
        """The set a loader reads."""
        if loader.stage == FIT:
            return self.fit
        return (self.tune if loader.stage == TUNE else self.test)[loader.name]

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per :meth:`select`-ed set, in that order."""
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        loaders = []
        for loader in self.loaders:
            dataset = self.dataset(loader)
            sampler = None
            if world > 1 and loader.stage == FIT:
                sampler = WholeBatchSampler(len(dataset), self.batch_size, FIT_SLICES, world, rank)
            elif world > 1:
                sampler = ShardSampler(dataset, world, rank, f"{loader.name} set")
            positioned = Positioned(dataset)
            loaders.append(DataLoader(positioned, self.batch_size, sampler=sampler, num_workers=self.num_workers))
        return loaders
