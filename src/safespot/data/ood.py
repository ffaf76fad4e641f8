"""Out-of-distribution data (paper 000, Sections 3.6 and 4.4).

Following Hendrycks et al. (2019, "Deep Anomaly Detection with Outlier Exposure"), three
distributions are involved: ``D_in`` (the classifier's classes), ``D_out^train`` (auxiliary
outliers seen during training and used to tune detectors) and ``D_out^test`` (outlier sets only
met at test time, disjoint from ``D_out^train``).

Outlier sources, each a plain mapping (``spec``) with a ``kind``:

- ``folder``: every image file below ``root`` (recursively; CIFAR-100, SVHN, TinyImageNet or
  LSUN exported as image folders), or, with ``classes``, only the named class folders of an
  ImageFolder tree (indices into the sorted folder names, or names);
- ``npy``: a ``.npy`` array of images, ``(N, H, W, C)`` uint8 or ``(N, C, H, W)`` float in
  [0, 1] (e.g. the 300K random 80M-Tiny-Images of Hendrycks et al.);
- ``gaussian`` / ``uniform``: ``n`` generated noise images, seeded per image and clipped to
  [0, 1]. Gaussian noise has mean 0.5 and standard deviation 0.25 by default (Hendrycks et al.'s
  N(0, 0.5^2) in [-1, 1] pixel units, clipped), uniform noise is U[0, 1]^d.

Every outlier item is ``(image in [0, 1], OUTLIER_LABEL)``; wrapped in
:class:`~safespot.data.base.IndexedSubset` it becomes ``(image, -1, index)``.

:class:`OutlierDataMixin` adds outliers to any :class:`~safespot.data.base.ImageDataModule`:
training batches become ``{"in": (x, y, index), "out": (x_out, -1, index)}`` with
``outlier_batch_size`` outliers (default twice the in-distribution batch, as Hendrycks et al.),
validation batches ``{"in": ..., "out": ...}`` over a seeded part of ``D_out^train`` held out of
training, and the test split stays in-distribution; :meth:`OutlierDataMixin.test_outlier_sets`
gives the ``D_out^test`` sets. Paired batches are only produced for a LightningModule with
``uses_outliers = True``; any other method sees the plain in-distribution batches.

:class:`ClassSplitOODDataModule` is an offline protocol on one ImageFolder dataset: some classes
are in-distribution (relabelled 0..k-1), disjoint other classes of ``train/`` are ``D_out^train``
and still other classes of ``test/`` are ``D_out^test``. :class:`SyntheticOODDataModule` does the
same on the synthetic template images, for tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from safespot.data.base import DataConfigError, ImageDataModule, IndexedSubset, _seeded_choice, per_process_batch_size
from safespot.data.folders import CIFAR10DataModule, require_dir
from safespot.data.synthetic import SyntheticDataModule, make_synthetic
from safespot.data.transforms import build_transforms

OUTLIER_LABEL = -1
OUTLIER_KINDS = ("folder", "npy", "gaussian", "uniform")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
GAUSSIAN_MEAN, GAUSSIAN_STD = 0.5, 0.25
_NOISE_SEED_STRIDE = 1_000_003
_EPOCH_STRIDE = 100_003


# --- sources ------------------------------------------------------------------------------
def class_folders(root: Path) -> list[str]:
    """The class folder names of an ImageFolder tree, sorted (torchvision's label order)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def image_files(root: Path) -> list[Path]:
    """Every image file below ``root``, recursively, in sorted order."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def resolve_classes(requested: Sequence[int | str], available: Sequence[str], name: str) -> list[int]:
    """Class indices (into ``available``) for a list of indices or folder names, refusing
    unknown classes, duplicates and an empty list."""
    if isinstance(requested, str | int) or requested is None:
        raise DataConfigError(f"{name} must be a list of class indices or names, got {requested!r}")
    indices: list[int] = []
    for c in requested:
        if isinstance(c, bool):
            raise DataConfigError(f"{name}: {c!r} is not a class index or name")
        if isinstance(c, int):
            if not 0 <= c < len(available):
                raise DataConfigError(f"{name}: class index {c} is out of range (0..{len(available) - 1})")
            indices.append(c)
        elif str(c) in available:
            indices.append(available.index(str(c)))
        else:
            raise DataConfigError(f"{name}: no class folder {c!r} (have {list(available)})")
    if len(set(indices)) != len(indices):
        raise DataConfigError(f"{name} lists a class twice: {list(requested)}")
    return indices


def check_disjoint(sets: Mapping[str, Sequence[int]], names: Sequence[str] | None = None) -> None:
    """Refuse class sets that share a class, naming both settings and the shared classes."""
    keys = list(sets)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            shared = sorted(set(sets[a]) & set(sets[b]))
            if shared:
                shown = [f"{c} ({names[c]})" if names else str(c) for c in shared]
                raise DataConfigError(
                    f"{a} and {b} share classes {', '.join(shown)}: in-distribution, training-outlier and "
                    "test-outlier classes must be disjoint"
                )


def load_image(path: Path, size: int, channels: int = 3) -> torch.Tensor:
    """An image file as a ``(C, size, size)`` tensor in [0, 1]: shorter side resized to
    ``size`` and centre-cropped when its size differs."""
    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (size, size):
            scale = size / min(img.size)
            w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
            img = img.resize((w, h), Image.BILINEAR)
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
        array = np.asarray(img, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).float().div(255)
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)


class FileImages(Dataset):
    """``(image, label)`` for a list of ``(path, label)``; ``transform`` (a torchvision
    pipeline on PIL images) or, without one, :func:`load_image` at ``image_size``."""

    def __init__(
        self, items: Sequence[tuple[Path, int]], image_size: int = 32, channels: int = 3, transform: Any = None
    ) -> None:
        self.items = list(items)
        self.image_size, self.channels, self.transform = image_size, channels, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        if self.transform is None:
            return load_image(path, self.image_size, self.channels), label
        with Image.open(path) as img:
            return self.transform(img.convert("L" if self.channels == 1 else "RGB")), label


def folder_items(
    root: Path, classes: Sequence[int] | None, label: int | None = OUTLIER_LABEL
) -> list[tuple[Path, int]]:
    """``(path, label)`` for the image files of ``root`` (``classes``: only those class folders,
    each labelled by its position in ``classes`` when ``label`` is ``None``)."""
    if classes is None:
        return [(p, OUTLIER_LABEL if label is None else label) for p in image_files(root)]
    folders = class_folders(root)
    items: list[tuple[Path, int]] = []
    for position, c in enumerate(classes):
        for p in image_files(root / folders[c]):
            items.append((p, position if label is None else label))
    return items


class NumpyImages(Dataset):
    """Images from a ``.npy`` array: ``(N, H, W, C)`` uint8 (0..255) or ``(N, C, H, W)``
    float in [0, 1] (also ``(N, C, H, W)`` uint8 and ``(N, H, W, C)`` float), memory-mapped;
    resized (bilinear) to ``image_size`` when given and different."""

    def __init__(self, path: str | Path, image_size: int | None = None, name: str = "npy") -> None:
        self.path = Path(path)
        self.array = np.load(self.path, mmap_mode="r")
        if self.array.ndim != 4:
            raise DataConfigError(f"{name}: {self.path} holds shape {self.array.shape}; expected 4 dimensions")
        n, a, _, d = self.array.shape
        if d in (1, 3) and a not in (1, 3):
            self.channels_last = True
        elif a in (1, 3):
            self.channels_last = False
        else:
            raise DataConfigError(f"{name}: {self.path} has shape {self.array.shape}; expected N,H,W,C or N,C,H,W")
        self.is_uint8 = self.array.dtype == np.uint8
        if not self.is_uint8:
            sample = np.asarray(self.array[: min(n, 256)], dtype=np.float64)
            if sample.size and (sample.min() < 0 or sample.max() > 1):
                raise DataConfigError(f"{name}: float images in {self.path} must lie in [0, 1]")
        self.image_size = image_size

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(np.array(self.array[i], dtype=np.float32))
        if self.channels_last:
            x = x.permute(2, 0, 1)
        if self.is_uint8:
            x = x / 255
        if self.image_size is not None and tuple(x.shape[1:]) != (self.image_size, self.image_size):
            x = F.interpolate(x[None], size=(self.image_size, self.image_size), mode="bilinear", antialias=True)[0]
        return x.clamp(0, 1).contiguous(), OUTLIER_LABEL


class NoiseImages(Dataset):
    """``n`` noise images of shape ``(channels, size, size)``, each drawn from its own seed
    (``seed * 1_000_003 + index``) and clipped to [0, 1]: ``gaussian`` N(mean, std^2) per pixel
    or ``uniform`` U[0, 1] per pixel."""

    def __init__(
        self,
        kind: str,
        n: int,
        channels: int = 3,
        image_size: int = 32,
        seed: int = 0,
        mean: float = GAUSSIAN_MEAN,
        std: float = GAUSSIAN_STD,
    ) -> None:
        if kind not in ("gaussian", "uniform"):
            raise DataConfigError(f"noise kind must be 'gaussian' or 'uniform', got {kind!r}")
        self.kind, self.n, self.shape = kind, int(n), (channels, image_size, image_size)
        self.seed, self.mean, self.std = int(seed), float(mean), float(std)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * _NOISE_SEED_STRIDE + int(i))
        if self.kind == "gaussian":
            x = self.mean + self.std * torch.randn(self.shape, generator=g)
        else:
            x = torch.rand(self.shape, generator=g)
        return x.clamp(0, 1), OUTLIER_LABEL


def check_outlier_spec(spec: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    """Validate an outlier source ``spec`` (named ``name`` in messages) without reading images:
    known kind, existing root or file, ``n >= 1`` for noise."""
    if not isinstance(spec, Mapping):
        raise DataConfigError(f"{name} must be a mapping with a 'kind' ({', '.join(OUTLIER_KINDS)}), got {spec!r}")
    spec = dict(spec)
    kind = spec.get("kind")
    if kind not in OUTLIER_KINDS:
        raise DataConfigError(f"{name}.kind must be one of {list(OUTLIER_KINDS)}, got {kind!r}")
    allowed = {
        "folder": {"kind", "root", "classes", "image_size"},
        "npy": {"kind", "path", "image_size"},
        "gaussian": {"kind", "n", "seed", "mean", "std"},
        "uniform": {"kind", "n", "seed"},
    }[kind]
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise DataConfigError(
            f"{name}: unknown settings {unknown} for kind {kind!r}; expected some of {sorted(allowed)}"
        )
    if kind == "folder":
        root = Path(str(spec.get("root") or "")).expanduser()
        if not spec.get("root") or not root.is_dir():
            raise DataConfigError(f"{name}.root={spec.get('root')!r} does not exist or is not a directory")
        if spec.get("classes") is not None:
            resolve_classes(spec["classes"], class_folders(root), f"{name}.classes")
    elif kind == "npy":
        path = spec.get("path")
        if not path or not Path(str(path)).expanduser().is_file():
            raise DataConfigError(f"{name}.path={path!r} does not exist")
    else:
        n = spec.get("n")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DataConfigError(f"{name}.n must be an integer >= 1, got {n!r}")
        if kind == "gaussian" and float(spec.get("std", GAUSSIAN_STD)) <= 0:
            raise DataConfigError(f"{name}.std must be > 0")
    return spec


def build_outlier_dataset(
    spec: Mapping[str, Any], name: str, image_size: int, channels: int = 3, seed: int = 0
) -> Dataset:
    """The dataset of ``(image, OUTLIER_LABEL)`` that ``spec`` describes (see the module
    docstring), at the in-distribution image shape ``(channels, image_size, image_size)``."""
    spec = check_outlier_spec(spec, name)
    kind = spec["kind"]
    size = int(spec.get("image_size") or image_size)
    if kind == "folder":
        root = Path(str(spec["root"])).expanduser()
        classes = None
        if spec.get("classes") is not None:
            classes = resolve_classes(spec["classes"], class_folders(root), f"{name}.classes")
        items = folder_items(root, classes)
        if not items:
            raise DataConfigError(f"{name}.root={str(root)!r} holds no image files ({' '.join(IMAGE_EXTENSIONS)})")
        return FileImages(items, size, channels)
    if kind == "npy":
        return NumpyImages(Path(str(spec["path"])).expanduser(), size, name)
    noise_seed = int(spec.get("seed", seed))
    if kind == "gaussian":
        mean, std = float(spec.get("mean", GAUSSIAN_MEAN)), float(spec.get("std", GAUSSIAN_STD))
        return NoiseImages("gaussian", spec["n"], channels, size, noise_seed, mean, std)
    return NoiseImages("uniform", spec["n"], channels, size, noise_seed)


# --- samplers -----------------------------------------------------------------------------
class CyclingSampler(DistributedSampler):
    """Outlier order for one epoch: ``num_samples`` indices per process taken from successive
    random permutations of the pool, seeded by ``(seed, epoch)`` only (a resumed run sees the
    same outliers). Process ``rank`` of ``num_replicas`` takes its own contiguous slice. A
    ``DistributedSampler`` subclass so that Lightning keeps it under DDP."""

    def __init__(self, length: int, num_samples: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.length, self.num_samples, self.seed = int(length), int(num_samples), int(seed)
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self.shuffle, self.drop_last, self.total_size = True, False, self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * _EPOCH_STRIDE + self.epoch)
        order: list[int] = []
        while len(order) < self.total_size:
            order += torch.randperm(self.length, generator=g).tolist()
        start = self.rank * self.num_samples
        return iter(order[start : start + self.num_samples])

    def __len__(self) -> int:
        return self.num_samples


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
                spec, f"data.test_outliers.{name}", self.image_size, self.channels, self.seed + 1_000
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
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 11)).tolist()
        val, train = sorted(order[: self.val_outlier_size]), sorted(order[self.val_outlier_size :])
        train = _seeded_choice(train, self.outlier_subset, self.seed + 12, "data.outlier_subset")
        self.splits["train_outliers"], self.splits["val_outliers"] = train, val
        self._datasets["train_outliers"] = IndexedSubset(pool, train)
        if val:
            self._datasets["val_outliers"] = IndexedSubset(pool, val)

    # --- loaders ----------------------------------------------------------------------------
    def paired(self) -> bool:
        """Whether loaders pair outliers with in-distribution batches: when the attached
        LightningModule declares ``uses_outliers`` (always, outside a Trainer)."""
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        return True if module is None else bool(getattr(module, "uses_outliers", False))

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
        sampler = CyclingSampler(len(outliers), batches * per_process, self.seed + 13, world, rank)
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
