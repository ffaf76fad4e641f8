"""LightningDataModules yielding ``(images in [0, 1], labels, dataset indices)``."""

from safespot.data.base import DataConfigError, ImageDataModule, IndexedSubset, per_process_batch_size
from safespot.data.folders import CIFAR10DataModule, CIFAR100DataModule, ImageFolderDataModule, SVHNDataModule
from safespot.data.synthetic import SyntheticDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DataConfigError",
    "ImageDataModule",
    "ImageFolderDataModule",
    "IndexedSubset",
    "SVHNDataModule",
    "SyntheticDataModule",
    "per_process_batch_size",
]
