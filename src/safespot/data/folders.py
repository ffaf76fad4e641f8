"""Datamodules over files on disk: CIFAR-10/100 and SVHN (torchvision format, or an
ImageFolder tree with ``train/`` and ``test/``) and any ImageFolder tree (ImageNet,
TinyImageNet, LSUN)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision import datasets

from safespot.data.base import DataConfigError, ImageDataModule
from safespot.data.transforms import build_transforms


def _has_image_folders(path: Path, train_dir: str, test_dir: str) -> bool:
    return (path / train_dir).is_dir() and (path / test_dir).is_dir()


def require_dir(root: str | Path, name: str = "data.root") -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataConfigError(f"{name}={str(root)!r} does not exist or is not a directory (set DATA_DIR or {name})")
    return path


class ImageFolderDataModule(ImageDataModule):
    """Any ImageFolder tree ``root/{train_dir,test_dir}/<class>/<image>``. Classes are the
    sorted folder names. ``transforms`` picks the ``cifar`` or ``imagenet`` pipeline."""

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        test_dir: str = "test",
        num_classes: int | None = None,
        image_size: int = 224,
        transforms: str = "imagenet",
        **kwargs: Any,
    ) -> None:
        self.memory_augment = (4, True) if transforms == "cifar" else None  # before the base checks in_memory
        super().__init__(num_classes=num_classes, **kwargs)
        self.root = require_dir(root)
        if not _has_image_folders(self.root, train_dir, test_dir):
            raise DataConfigError(
                f"data.root={str(root)!r} must contain '{train_dir}/' and '{test_dir}/' class folders"
            )
        self.train_dir, self.test_dir = train_dir, test_dir
        self.image_size, self.transforms = image_size, transforms
        build_transforms(transforms, image_size)  # validate early
        found = sorted(p.name for p in (self.root / train_dir).iterdir() if p.is_dir())
        if num_classes is not None and num_classes != len(found):
            raise DataConfigError(
                f"data.num_classes={num_classes} but {self.root / train_dir} has {len(found)} class folders"
            )
        self.num_classes = len(found)

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        train_tf, test_tf = build_transforms(self.transforms, self.image_size)
        return (
            datasets.ImageFolder(str(self.root / self.train_dir), transform=train_tf),
            datasets.ImageFolder(str(self.root / self.train_dir), transform=test_tf),
            datasets.ImageFolder(str(self.root / self.test_dir), transform=test_tf),
        )


class _TorchvisionOrFolder(ImageDataModule):
    """A CIFAR-style dataset found under ``root`` in either torchvision's own format or as
    an ImageFolder tree (``train/`` + ``test/``), looked for at ``root`` and at each of
    ``folder_names`` below it. With ``download=True`` torchvision fetches it when absent."""

    folder_names: tuple[str, ...] = ()
    marker: str = ""  # a file or folder that torchvision's format leaves under root
    num_classes = 10
    memory_augment = (4, True)  # RandomCrop(32, padding=4) + RandomHorizontalFlip

    def __init__(self, root: str, download: bool = False, num_classes: int | None = None, **kwargs: Any) -> None:
        if num_classes is not None and num_classes != self.num_classes:
            raise DataConfigError(f"data.num_classes={num_classes} but {type(self).__name__} has {self.num_classes}")
        super().__init__(**kwargs)
        self.download = download
        path = Path(root).expanduser()
        if not path.is_dir() and not download:
            raise DataConfigError(f"data.root={root!r} does not exist (set DATA_DIR, data.root, or data.download=true)")
        self.root, self.layout = self._detect(path)

    def _detect(self, path: Path) -> tuple[Path, str]:
        for candidate in (path, *(path / name for name in self.folder_names)):
            if (candidate / self.marker).exists():
                return candidate, "torchvision"
            if _has_image_folders(candidate, "train", "test"):
                return candidate, "folder"
        if self.download:
            return path, "torchvision"
        looked = ", ".join(str(p) for p in (path, *(path / n for n in self.folder_names)))
        raise DataConfigError(
            f"no {type(self).__name__.removesuffix('DataModule')} data under data.root: looked for "
            f"'{self.marker}' or 'train/'+'test/' class folders in {looked} (or set data.download=true)"
        )

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        train_tf, test_tf = build_transforms("cifar", 32)
        if self.layout == "folder":
            return (
                datasets.ImageFolder(str(self.root / "train"), transform=train_tf),
                datasets.ImageFolder(str(self.root / "train"), transform=test_tf),
                datasets.ImageFolder(str(self.root / "test"), transform=test_tf),
            )
        return (self._torchvision(True, train_tf), self._torchvision(True, test_tf), self._torchvision(False, test_tf))

    def _torchvision(self, train: bool, transform: Any) -> Dataset:
        raise NotImplementedError


class CIFAR10DataModule(_TorchvisionOrFolder):
    folder_names = ("cifar10-jpeg", "cifar10", "cifar-10")
    marker = "cifar-10-batches-py"
    num_classes = 10

    def _torchvision(self, train: bool, transform: Any) -> Dataset:
        return datasets.CIFAR10(str(self.root), train=train, transform=transform, download=self.download)


class CIFAR100DataModule(_TorchvisionOrFolder):
    folder_names = ("cifar100-jpeg", "cifar100", "cifar-100")
    marker = "cifar-100-python"
    num_classes = 100

    def _torchvision(self, train: bool, transform: Any) -> Dataset:
        return datasets.CIFAR100(str(self.root), train=train, transform=transform, download=self.download)


class SVHNDataModule(_TorchvisionOrFolder):
    folder_names = ("svhn",)
    marker = "train_32x32.mat"
    num_classes = 10

    def _torchvision(self, train: bool, transform: Any) -> Dataset:
        split = "train" if train else "test"
        return datasets.SVHN(str(self.root), split=split, transform=transform, download=self.download)
