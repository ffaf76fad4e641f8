"""Datamodules over files on disk: CIFAR-10/100 and SVHN (torchvision format, or an
ImageFolder tree with ``train/`` and ``test/``) and any ImageFolder tree (ImageNet,
TinyImageNet, LSUN).

Downloading: CIFAR-10/100 and SVHN are fetched by torchvision only when ``data.download=true``
and ``data.root`` holds no copy, in ``prepare_data``, which Lightning calls on global rank 0
alone (``prepare_data_per_node=False``: ``data.root`` is taken to be shared by all nodes) while
the other processes wait, before any process runs ``setup``. ``setup`` never downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision import datasets

from safespot.data.base import ImageDataModule
from safespot.data.errors import DataConfigError
from safespot.data.images import pil_loader
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
            datasets.ImageFolder(str(self.root / self.train_dir), transform=train_tf, loader=pil_loader),
            datasets.ImageFolder(str(self.root / self.train_dir), transform=test_tf, loader=pil_loader),
            datasets.ImageFolder(str(self.root / self.test_dir), transform=test_tf, loader=pil_loader),
        )


class _TorchvisionOrFolder(ImageDataModule):
    """A CIFAR-style dataset found under ``root`` in either torchvision's own format or as
    an ImageFolder tree (``train/`` + ``test/``), looked for at ``root`` and at each of
    ``folder_names`` below it.

    With ``download=True`` and no copy found, :meth:`prepare_data` has torchvision download
    it into ``root`` (torchvision's format); without ``download`` a missing copy is an error
    on construction. Either way a failure names ``data.root`` and ``data.download``.
    """

    folder_names: tuple[str, ...] = ()
    marker: str = ""  # a file or folder that torchvision's format leaves under root
    num_classes = 10
    memory_augment = (4, True)  # RandomCrop(32, padding=4) + RandomHorizontalFlip

    def __init__(self, root: str, download: bool = False, num_classes: int | None = None, **kwargs: Any) -> None:
        if num_classes is not None and num_classes != self.num_classes:
            raise DataConfigError(f"data.num_classes={num_classes} but {type(self).__name__} has {self.num_classes}")
        super().__init__(**kwargs)
        self.download = bool(download)
        self.given_root = Path(root).expanduser()
        if not self.given_root.is_dir() and not self.download:
            raise DataConfigError(f"data.root={root!r} does not exist (set DATA_DIR, data.root, or data.download=true)")
        found = self._detect(self.given_root)
        if found is None and not self.download:
            raise self._missing("or set data.download=true")
        # not found yet: torchvision's format at root once prepare_data has downloaded it
        self.root, self.layout = found or (self.given_root, "torchvision")
        self.prepare_data_per_node = False  # one download into the shared data.root, on global rank 0

    @property
    def dataset_name(self) -> str:
        """The dataset's name in messages (``CIFAR10``, ``CIFAR100``, ``SVHN``)."""
        return type(self).__name__.removesuffix("DataModule")

    def _candidates(self, path: Path) -> tuple[Path, ...]:
        return (path, *(path / name for name in self.folder_names))

    def _detect(self, path: Path) -> tuple[Path, str] | None:
        """``(directory, layout)`` of the first copy found at or below ``path``, else ``None``."""
        for candidate in self._candidates(path):
            if (candidate / self.marker).exists():
                return candidate, "torchvision"
            if _has_image_folders(candidate, "train", "test"):
                return candidate, "folder"
        return None

    def _missing(self, hint: str) -> DataConfigError:
        looked = ", ".join(str(p) for p in self._candidates(self.given_root))
        return DataConfigError(
            f"no {self.dataset_name} data under data.root: looked for '{self.marker}' or 'train/'+'test/' class "
            f"folders in {looked} ({hint})"
        )

    def prepare_data(self) -> None:
        """Download the dataset into ``data.root`` when it holds no copy and ``download`` is
        set; otherwise do nothing. Raises :class:`DataConfigError` naming ``data.root`` and
        ``data.download`` when there is no copy and ``download`` is off, or when the download
        fails (e.g. offline)."""
        if self._detect(self.given_root) is not None:
            return
        if not self.download:
            raise self._missing("or set data.download=true")
        try:
            for train in (True, False):
                self._torchvision(train, None, download=True)
        except Exception as err:  # URLError, HTTP errors, checksum mismatches, full disks
            raise DataConfigError(
                f"downloading {self.dataset_name} into data.root={str(self.given_root)!r} failed "
                f"(data.download=true): {type(err).__name__}: {err}. Without network access copy the dataset "
                f"into data.root and set data.download=false"
            ) from err
        if self._detect(self.given_root) is None:
            raise self._missing("none after the download with data.download=true")

    def setup(self, stage: str | None = None) -> None:
        if not self._datasets and self.download:  # prepare_data may have downloaded it meanwhile
            found = self._detect(self.given_root)
            if found is None:
                raise self._missing(
                    "data.download=true downloads it in prepare_data(), which the Trainer calls before setup; "
                    "call datamodule.prepare_data() first when using the datamodule alone"
                )
            self.root, self.layout = found
        super().setup(stage)

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        train_tf, test_tf = build_transforms("cifar", 32)
        if self.layout == "folder":
            return (
                datasets.ImageFolder(str(self.root / "train"), transform=train_tf, loader=pil_loader),
                datasets.ImageFolder(str(self.root / "train"), transform=test_tf, loader=pil_loader),
                datasets.ImageFolder(str(self.root / "test"), transform=test_tf, loader=pil_loader),
            )
        return (self._torchvision(True, train_tf), self._torchvision(True, test_tf), self._torchvision(False, test_tf))

    def _torchvision(self, train: bool, transform: Any, download: bool = False) -> Dataset:
        """torchvision's dataset of the ``train`` or test split at ``self.root``
        (``download=True``: fetched into ``data.root`` first unless already there)."""
        raise NotImplementedError


class CIFAR10DataModule(_TorchvisionOrFolder):
    folder_names = ("cifar10-jpeg", "cifar10", "cifar-10")
    marker = "cifar-10-batches-py"
    num_classes = 10

    def _torchvision(self, train: bool, transform: Any, download: bool = False) -> Dataset:
        root = self.given_root if download else self.root
        return datasets.CIFAR10(str(root), train=train, transform=transform, download=download)


class CIFAR100DataModule(_TorchvisionOrFolder):
    folder_names = ("cifar100-jpeg", "cifar100", "cifar-100")
    marker = "cifar-100-python"
    num_classes = 100

    def _torchvision(self, train: bool, transform: Any, download: bool = False) -> Dataset:
        root = self.given_root if download else self.root
        return datasets.CIFAR100(str(root), train=train, transform=transform, download=download)


class SVHNDataModule(_TorchvisionOrFolder):
    folder_names = ("svhn",)
    marker = "train_32x32.mat"
    num_classes = 10

    def _torchvision(self, train: bool, transform: Any, download: bool = False) -> Dataset:
        root = self.given_root if download else self.root
        split = "train" if train else "test"
        return datasets.SVHN(str(root), split=split, transform=transform, download=download)
