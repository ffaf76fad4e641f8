"""Outlier sources: the datasets of auxiliary or test outliers (paper 000, Sections 3.6 and 4.4).

Each source is described by a plain mapping (``spec``) with a ``kind``:

- ``folder``: every image file below ``root`` (recursively; CIFAR-100, SVHN, TinyImageNet or
  LSUN exported as image folders), or, with ``classes``, only the named class folders of an
  ImageFolder tree (indices into the sorted folder names, or names);
- ``npy``: a ``.npy`` array of images, ``(N, H, W, C)`` uint8 or ``(N, C, H, W)`` float in
  [0, 1] (e.g. the 300K random 80M-Tiny-Images of Hendrycks et al.);
- ``gaussian`` / ``uniform``: ``n`` generated noise images, seeded per image and clipped to
  [0, 1]. Gaussian noise has mean 0.5 and standard deviation 0.25 by default (Hendrycks et al.'s
  N(0, 0.5^2) in [-1, 1] pixel units, clipped), uniform noise is U[0, 1]^d.

Every outlier item is ``(image in [0, 1], OUTLIER_LABEL)``; wrapped in
:class:`~safespot.data.base.IndexedSubset` it becomes ``(image, -1, index)``. Images of another
size are brought to the in-distribution size by :func:`safespot.data.images.resize_and_crop`
(shorter side resized, bilinear with antialiasing, centre crop), the loader ``robustify.py``
uses too. :mod:`safespot.data.ood` pairs these sources with in-distribution data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms.functional import to_pil_image

from safespot.data.errors import DataConfigError
from safespot.data.images import IMAGE_EXTENSIONS, decode_image, read_image, resize_and_crop
from safespot.utils.rng import host_seed

__all__ = [
    "GAUSSIAN_MEAN",
    "GAUSSIAN_STD",
    "IMAGE_EXTENSIONS",
    "OUTLIER_KINDS",
    "OUTLIER_LABEL",
    "FileImages",
    "NoiseImages",
    "NumpyImages",
    "build_outlier_dataset",
    "check_disjoint",
    "check_outlier_spec",
    "class_folders",
    "folder_items",
    "image_files",
    "load_image",
    "resolve_classes",
]

OUTLIER_LABEL = -1
OUTLIER_KINDS = ("folder", "npy", "gaussian", "uniform")
GAUSSIAN_MEAN, GAUSSIAN_STD = 0.5, 0.25


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
    """An image file as a ``(C, size, size)`` float tensor in [0, 1]: shorter side resized to
    ``size`` and centre-cropped when its size differs (:func:`safespot.data.images.read_image`)."""
    return read_image(path, size, channels).float().div(255)


class FileImages(Dataset):
    """``(image, label)`` for a list of ``(path, label)``, decoded by the one image decoder
    (:func:`safespot.data.images.decode_image`: EXIF-upright, RGB or greyscale); then
    ``transform`` (a torchvision pipeline on PIL images: the in-distribution images' pipeline, so
    that outliers drawn from the same data set are preprocessed exactly as the in-distribution
    images and a detector cannot tell them apart by preprocessing) or, without one, the one
    resize of :func:`load_image` at ``image_size``."""

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
        return self.transform(to_pil_image(decode_image(path, self.channels))), label


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
    brought to ``image_size`` when given and different (shorter side resized, bilinear with
    antialiasing, centre crop: :func:`safespot.data.images.resize_and_crop`)."""

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
        if self.image_size is not None:
            x = resize_and_crop(x, self.image_size)
        return x.clamp(0, 1).contiguous(), OUTLIER_LABEL


class NoiseImages(Dataset):
    """``n`` noise images of shape ``(channels, size, size)``, each drawn from its own seed
    (``host_seed(seed, "outlier_noise", index)``) and clipped to [0, 1]: ``gaussian`` N(mean, std^2) per pixel
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
        g = torch.Generator().manual_seed(host_seed(self.seed, "outlier_noise", int(i)))
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
