"""Image files named by a user (``robustify.py``'s ``input``) as a LightningDataModule for
``trainer.predict``: the input collection, the loading and the per-file seeds.

- :func:`collect_inputs`: every entry of ``input`` (a directory, a file, or a list of them) with
  the reason it is skipped, if it is (not an image, a FIFO, a device, a directory, a broken link, a
  second name of one file) and its name relative to its input directory (:class:`Input`); with
  ``recursive`` the subdirectories of input directories are walked too (:func:`walk`: sorted,
  depth first, links to directories not followed); only ``stat`` is called, so a FIFO is never
  opened.
- :func:`read_file`: one file read (regular files only, never blocking), decoded and brought to
  the model's input size (:func:`load_image`: :mod:`safespot.data.images`, ``resize`` policy
  ``crop`` or ``refuse``), with its seed (:func:`file_seed`: from the run seed and the file's
  bytes, so a file's random draws depend neither on its name, nor on its batch, nor on the
  process that reads it) and the SHA-256 of its bytes; a file that cannot be read or is refused
  comes back with its ``failed: ...`` status instead of an image.
- :class:`ImageFilesDataModule`: the files to read (all readable inputs, or those the caller
  :meth:`~ImageFilesDataModule.select`\\ s) in batches of ``batch_size`` per process
  (:class:`FileBatch`). With N processes process r reads positions r, r + N, ... of them
  (:class:`safespot.data.samplers.ShardSampler`: each file once, nothing repeated); with fewer
  files than processes, placeholders that hold no file fill up, so that every process runs
  Lightning's predict loop (and its collectives) at least once.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from omegaconf import ListConfig, OmegaConf
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from safespot.data.images import IMAGE_EXTENSIONS, decode_image, resize_and_crop
from safespot.data.samplers import ShardSampler
from safespot.errors import ConfigError
from safespot.utils.files import NotRegularFile, file_kind, read_regular
from safespot.utils.rng import host_seed

RESIZE_POLICIES = ("crop", "refuse")


class Input(NamedTuple):
    """An input: its ``path``, the ``reason`` it is skipped (``None``: a file to read) and its
    ``name`` relative to the input directory it was found in (its file name when it was named
    directly), which the output keeps: ``<output>/<name's directory>/<stem>.png``."""

    path: Path
    reason: str | None
    name: Path


# --- the inputs -----------------------------------------------------------------------------
def entries(spec: Any) -> list[Any]:
    """The entries of an ``input`` setting: a list, or one entry."""
    return list(spec) if isinstance(spec, ListConfig | list | tuple) else [spec]


def show(spec: Any) -> str:
    """An ``input`` setting as it reads in a message."""
    return repr(OmegaConf.to_container(spec)) if isinstance(spec, ListConfig) else repr(str(spec))


def classify_input(path: Path, listed: bool, recursive: bool = False) -> tuple[str | None, tuple[int, int] | None]:
    """``(skip reason or None, identity)`` of one input: ``None`` for a regular file to
    robustify (in a directory listing only with an image extension), else the row's status
    (``skipped: not an image``, ``skipped: not a regular file (fifo)``, ``skipped: a directory
    ...``, ``skipped: broken symbolic link``, ...). The identity ``(device, inode)`` of a regular
    file (links followed) finds duplicates. Only ``stat`` is called: a FIFO is never opened.
    ``recursive``: a link to a directory is never followed (no cycles), and says so."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return ("skipped: broken symbolic link" if path.is_symlink() else "skipped: vanished"), None
    except OSError as err:
        return f"skipped: cannot be read: {err.strerror or err}", None
    if stat.S_ISDIR(info.st_mode):
        if recursive:  # a real directory is walked (walk); what is left is a link to one
            return "skipped: a link to a directory (links to directories are not followed)", None
        what = "a link to a directory" if path.is_symlink() else "a directory"
        return f"skipped: {what} (input directories are not read recursively)", None
    if not stat.S_ISREG(info.st_mode):
        return f"skipped: not a regular file ({file_kind(info.st_mode)})", None
    identity = (info.st_dev, info.st_ino)
    if listed and path.suffix.lower() not in IMAGE_EXTENSIONS:
        return "skipped: not an image", identity
    return None, identity


def _listing(path: Path, entry: Any) -> list[Path]:
    """The entries of an input directory, sorted (not recursive)."""
    try:
        return sorted(path.iterdir())
    except OSError as err:
        raise ConfigError(f"input={str(entry)!r} cannot be listed: {err.strerror or err}") from None


def _real_directory(path: Path) -> tuple[int, int] | None:
    """The identity of ``path`` when it is a directory and not a link to one, else ``None``."""
    try:
        info = path.lstat()
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None


#: one entry found by :func:`walk`: its path, skip reason and identity
Found = tuple[Path, str | None, tuple[int, int] | None]


def walk(root: Path, entry: Any, recursive: bool) -> Iterator[Found]:
    """The entries of the input directory ``root`` (:func:`classify_input`), sorted. With
    ``recursive`` each subdirectory's entries come, sorted, in its place (depth first, so the order
    is deterministic); links to directories are not followed (their row says so) and a directory
    met a second time (a bind mount) is skipped, so the walk has no cycles. A subdirectory that
    cannot be listed gets one row; ``root`` that cannot be listed is a :class:`ConfigError`."""
    info = root.stat()
    seen = {(info.st_dev, info.st_ino)}
    stack = [iter(_listing(root, entry))]
    while stack:
        path = next(stack[-1], None)
        if path is None:
            stack.pop()
            continue
        directory = _real_directory(path) if recursive else None
        if directory is None:
            yield (path, *classify_input(path, listed=True, recursive=recursive))
        elif directory in seen:
            yield path, "skipped: a directory read already (a mount of another input directory)", None
        else:
            seen.add(directory)
            try:
                stack.append(iter(sorted(path.iterdir())))
            except OSError as err:
                yield path, f"skipped: a directory that cannot be listed: {err.strerror or err}", None


def collect_inputs(spec: Any, recursive: bool = False) -> list[Input]:
    """An :class:`Input` for every input named by ``input``: a directory (each of its entries,
    sorted; with ``recursive`` its subdirectories' too, :func:`walk`), a file (tried whatever its
    extension) or a list of those. Every entry gets one row: files without an image extension in
    a directory, FIFOs, devices, sockets, directories inside a directory (without ``recursive``),
    links to directories, broken links and second names of one file (given twice, through a
    link, or a hard link: ``skipped: duplicate of <first>``) are skipped with their reason
    (:func:`classify_input`). An entry's ``name`` is its path relative to its input directory."""
    given = entries(spec)
    if not given or any(e is None or not str(e).strip() for e in given):
        raise ConfigError(f"input must be a directory, an image file or a list of them, got {spec!r}")
    found: list[Input] = []
    first: dict[tuple[int, int], Path] = {}
    for entry in given:
        path = Path(str(entry)).expanduser()
        if not os.path.lexists(path):
            raise ConfigError(f"input={str(entry)!r} does not exist")
        if path.is_dir():
            items = [(p, reason, identity, p.relative_to(path)) for p, reason, identity in walk(path, entry, recursive)]
        else:
            items = [(path, *classify_input(path, listed=False), Path(path.name))]
        for p, reason, identity, name in items:
            if identity is not None and identity in first:
                reason = f"skipped: duplicate of {first[identity]}"
            elif identity is not None:
                first[identity] = p
            found.append(Input(p, reason, name))
    if not any(item.reason is None for item in found):
        walked = " in it or its subdirectories" if recursive else ""
        raise ConfigError(f"input={show(spec)} holds no image files ({' '.join(IMAGE_EXTENSIONS)}){walked}")
    return found


# --- one file ---------------------------------------------------------------------------------
class FileFailure(Exception):
    """A per-file failure; its message is the file's status (``failed: ...``)."""


def file_seed(seed: int, content: bytes) -> int:
    """A seed from the run seed and the file's bytes: a file's checks and search do not
    depend on its name, its batch or the other files."""
    digest = int.from_bytes(hashlib.sha256(content).digest()[:8], "little")
    return host_seed(seed, "file", digest)


def load_image(content: bytes, channels: int, size: int, policy: str) -> tuple[torch.Tensor, str, bool]:
    """The image as a uint8 tensor ``(C, size, size)``, its original ``WxH`` and whether it
    was resized; raises :class:`FileFailure` for unreadable files and refused sizes.

    Decoding and resizing are :mod:`safespot.data.images` (upright by EXIF orientation; shorter
    side resized, bilinear with antialiasing, centre crop), the loader of the outlier folders."""
    try:
        image = decode_image(content, channels)
    except UnidentifiedImageError:
        raise FileFailure("failed: unreadable: not an image format PIL can read") from None
    except Exception as err:  # any other decoder error: truncated, corrupt, too large
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileFailure(f"failed: unreadable: {reason}") from None
    height, width = image.shape[-2:]
    original = f"{width}x{height}"
    resized = (height, width) != (size, size)
    if resized and policy == "refuse":
        raise FileFailure(f"failed: size {original} differs from the model's input size {size}x{size} (resize=refuse)")
    return resize_and_crop(image, size), original, resized


@dataclass
class LoadedFile:
    """One file as read: its position among the inputs, and either what the model needs (``image``
    set: its original size, whether it was resized, its seed and the SHA-256 of its bytes) or the
    status of its failure (``failure``: ``failed: unreadable: ...``, ``failed: size ...``)."""

    position: int
    path: str
    image: torch.Tensor | None = None
    original_size: str | None = None
    resized: bool | None = None
    seed: int | None = None
    sha256: str | None = None
    failure: str | None = None


def read_file(position: int, path: Path, channels: int, size: int, resize: str, seed: int) -> LoadedFile:
    """The file at ``path`` read (regular files only: :func:`safespot.utils.files.read_regular`, so a
    FIFO that took a file's place fails instead of blocking) and loaded (:func:`load_image`)."""
    loaded = LoadedFile(position, str(path))
    try:
        content = read_regular(path)
        loaded.image, loaded.original_size, loaded.resized = load_image(content, channels, size, resize)
    except FileFailure as err:
        loaded.failure = str(err)
        return loaded
    except (NotRegularFile, OSError) as err:
        loaded.failure = f"failed: unreadable: {err.strerror or err}"
        return loaded
    loaded.seed, loaded.sha256 = file_seed(seed, content), hashlib.sha256(content).hexdigest()
    return loaded


# --- batches ----------------------------------------------------------------------------------
class FileBatch(NamedTuple):
    """A batch of files: ``positions`` (among the inputs) of every file read, ``images`` (uint8
    ``(k, C, H, W)``) and ``seeds`` (int64 ``(k,)``) of the ``k`` files that loaded, and ``files``
    (:class:`LoadedFile` without the image; those that failed carry their status). Lightning moves
    the tensors to the process's device."""

    positions: torch.Tensor
    images: torch.Tensor
    seeds: torch.Tensor
    files: list[LoadedFile]


class ImageFiles(Dataset):
    """The files at ``selected`` positions of ``inputs``, read one by one (:func:`read_file`),
    followed by ``padding`` placeholders (``None``) that hold no file."""

    def __init__(
        self, inputs: Sequence[Input], selected: Sequence[int], channels: int, size: int, resize: str, seed: int,
        padding: int = 0,
    ) -> None:  # fmt: skip
        self.inputs, self.selected, self.padding = list(inputs), list(selected), int(padding)
        self.channels, self.size, self.resize, self.seed = channels, size, resize, seed

    def __len__(self) -> int:
        return len(self.selected) + self.padding

    def __getitem__(self, i: int) -> LoadedFile | None:
        if i >= len(self.selected):
            return None
        position = self.selected[i]
        return read_file(position, self.inputs[position].path, self.channels, self.size, self.resize, self.seed)

    def collate(self, items: list[LoadedFile | None]) -> FileBatch:
        """The :class:`FileBatch` of ``items``, placeholders left out."""
        files = [item for item in items if item is not None]
        loaded = [f for f in files if f.image is not None]
        shape = (0, self.channels, self.size, self.size)
        images = torch.stack([f.image for f in loaded]) if loaded else torch.empty(shape, dtype=torch.uint8)
        seeds = torch.tensor([f.seed for f in loaded], dtype=torch.long)
        for f in loaded:
            f.image = None  # the batch holds it once
        return FileBatch(torch.tensor([f.position for f in files], dtype=torch.long), images, seeds, files)


class ImageFilesDataModule(L.LightningDataModule):
    """The image files named by ``input`` for ``trainer.predict`` (see the module docstring).

    Args:
        inputs: every input and its skip reason (:func:`collect_inputs`).
        channels, size: the model's input (``(channels, size, size)``).
        resize: ``crop`` (shorter side to ``size``, centre crop) or ``refuse`` (a file of another
            size fails).
        seed: the run seed the per-file seeds derive from (:func:`file_seed`).
        batch_size: files per batch and process.
        num_workers: DataLoader worker processes reading and decoding the files.
    """

    def __init__(
        self, inputs: Sequence[Input], channels: int, size: int, resize: str = "crop", seed: int = 0,
        batch_size: int = 64, num_workers: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        if resize not in RESIZE_POLICIES:
            raise ConfigError(f"resize must be one of {list(RESIZE_POLICIES)}, got {resize!r}")
        self.inputs = list(inputs)
        self.channels, self.size, self.resize, self.seed = channels, size, resize, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.selected: list[int] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Every process takes rank 0's inputs (processes launched as scripts listed the inputs
        each for itself: rank 0's list is the one its decisions refer to)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            self.inputs = trainer.strategy.broadcast(self.inputs, src=0)

    def readable(self) -> list[int]:
        """The positions of the inputs to read: those without a skip reason."""
        return [i for i, item in enumerate(self.inputs) if item.reason is None]

    def select(self, positions: Sequence[int]) -> None:
        """Read only the inputs at ``positions`` (e.g. those whose outputs are still to be made);
        the same in every process."""
        self.selected = [int(p) for p in positions]

    def predict_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        selected = self.readable() if self.selected is None else self.selected
        padding = max(world - len(selected), 0)  # every process gets at least one item
        dataset = ImageFiles(self.inputs, selected, self.channels, self.size, self.resize, self.seed, padding)
        sampler = ShardSampler(dataset, world, rank, "image files") if world > 1 else None
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            collate_fn=dataset.collate, drop_last=False,
        )  # fmt: skip
