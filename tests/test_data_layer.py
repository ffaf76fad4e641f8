"""The data layer's structure: samplers in their own module (no import cycle), one image loader
for robustify.py and the outlier sources, downloads only in ``prepare_data``, and outlier
batches only when the method asks for them. No test touches the network."""

import ast
import io
import urllib.error
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision.transforms.v2 import functional as TF

import safespot.data as data_pkg
from safespot.data import CIFAR10DataModule, CIFAR100DataModule, DataConfigError, SVHNDataModule, folders, image_files
from safespot.data.images import decode_image, read_image, resize_and_crop
from safespot.data.ood import SyntheticOODDataModule
from safespot.data.outliers import FileImages, NumpyImages, build_outlier_dataset, load_image
from safespot.data.samplers import CyclingSampler, EpochSeededSampler, ShardSampler
from safespot.methods import OutlierExposure

DATA_DIR = Path(data_pkg.__file__).parent


# --- modules --------------------------------------------------------------------------------
def _internal_imports(path: Path) -> set[str]:
    """The ``safespot.data`` modules ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("safespot.data."):
            found.add(node.module.removeprefix("safespot.data."))
    return found


def test_data_modules_import_each_other_without_a_cycle():
    graph = {p.stem: _internal_imports(p) for p in DATA_DIR.glob("*.py") if p.stem != "__init__"}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for other in graph.get(module, ()):
            visit(other, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())
    assert "samplers" in graph["memory"] and "base" not in graph["memory"]


def test_moved_names_stay_importable_from_their_old_modules():
    from safespot.data import base, samplers

    assert base.EpochSeededSampler is samplers.EpochSeededSampler and base.DataConfigError is DataConfigError


# --- samplers -------------------------------------------------------------------------------
@pytest.mark.parametrize("length,world", [(11, 2), (12, 3), (7, 4), (5, 5), (0, 2)])
def test_shards_hold_every_image_once_in_a_known_order(length, world):
    data = list(range(length))
    shards = [list(ShardSampler(data, world, rank)) for rank in range(world)]
    assert shards == [list(range(rank, length, world)) for rank in range(world)]  # rank, rank + N, ...
    assert sorted(i for shard in shards for i in shard) == data
    assert [len(ShardSampler(data, world, rank)) for rank in range(world)] == [len(s) for s in shards]
    sampler = ShardSampler(data, world, 0)
    assert isinstance(sampler, UnrepeatedDistributedSampler) and isinstance(sampler, DistributedSampler)
    sampler.set_epoch(3)  # Lightning calls it every epoch; the order does not change
    assert list(sampler) == shards[0]


def test_shards_refuse_fewer_images_than_processes():
    with pytest.raises(DataConfigError, match="test split has 3 images, fewer than the 4 processes"):
        ShardSampler(list(range(3)), 4, 0, name="test split")


def test_training_and_outlier_orders_depend_only_on_seed_epoch_and_rank():
    a, b = EpochSeededSampler(30, 5), EpochSeededSampler(30, 5)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) and sorted(a) == list(range(30))
    ranks = [CyclingSampler(10, 12, seed=2, num_replicas=2, rank=r) for r in range(2)]
    first = [list(s) for s in ranks]
    assert first == [list(s) for s in ranks] and [len(s) for s in first] == [12, 12]
    assert set(first[0] + first[1]) == set(range(10))  # 24 draws cycle through all 10 outliers
    for s in ranks:
        s.set_epoch(1)
    assert [list(s) for s in ranks] != first


# --- images ---------------------------------------------------------------------------------
def _png(array: np.ndarray, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def test_decode_reads_8bit_rgb_or_grey_upright_by_exif(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    content = _png(array)
    (tmp_path / "a.png").write_bytes(content)
    x = decode_image(content)
    assert x.dtype == torch.uint8 and x.shape == (3, 6, 9) and torch.equal(x, torch.from_numpy(array).permute(2, 0, 1))
    assert torch.equal(decode_image(tmp_path / "a.png"), x)
    assert decode_image(content, channels=1).shape == (1, 6, 9)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", exif=exif, quality=100)
    assert decode_image(buffer.getvalue()).shape == (3, 9, 6)


def test_file_images_decode_by_the_one_decoder_with_or_without_a_pipeline(tmp_path):
    """Outlier files read through a torchvision pipeline (the class-split datamodule) are
    decoded as everywhere else: upright by EXIF, the same pixels as :func:`decode_image`."""
    from torchvision.transforms import PILToTensor

    array = np.random.default_rng(2).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array).save(tmp_path / "rotated.jpg", format="JPEG", exif=exif, quality=100)
    expected = decode_image(tmp_path / "rotated.jpg")
    piped, label = FileImages([(tmp_path / "rotated.jpg", 7)], transform=PILToTensor())[0]
    assert label == 7 and expected.shape == (3, 6, 4) and torch.equal(piped, expected)
    plain, _ = FileImages([(tmp_path / "rotated.jpg", 7)], image_size=4)[0]
    assert plain.shape == (3, 4, 4) and torch.equal(plain, load_image(tmp_path / "rotated.jpg", 4))


def _png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG of a uint16 array, greyscale ``(H, W)`` or RGB ``(H, W, 3)``, written chunk
    by chunk (PIL writes no 16-bit RGB PNG, torchvision no 16-bit PNG at all)."""
    import struct
    import zlib

    height, width = array.shape[:2]
    colour = 0 if array.ndim == 2 else 2
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _gradients() -> tuple[np.ndarray, np.ndarray]:
    """A 16-bit grey gradient over the whole range and an RGB image of three such gradients."""
    grey = np.linspace(0, 65535, 12 * 20).round().astype(np.uint16).reshape(12, 20)
    return grey, np.stack([grey, grey[::-1, ::-1], 65535 - grey], axis=-1)


@pytest.mark.parametrize("kind", ["grey", "rgb"])
def test_16bit_pngs_decode_as_their_8bit_versions(tmp_path, kind):
    """A 16-bit PNG decodes to the values of the same image saved with 8 bits (within one
    level): PIL's ``convert`` clips 16-bit greyscale at 255, which made nearly every pixel white."""
    grey, rgb = _gradients()
    array16 = grey if kind == "grey" else rgb
    eight = np.rint(array16 / 257).astype(np.uint8)
    for channels in (1, 3):
        expected = decode_image(_png(eight), channels).int()
        decoded = decode_image(_png16(array16), channels)
        assert decoded.dtype == torch.uint8 and decoded.shape == expected.shape
        assert (decoded.int() - expected).abs().max() <= 1
    # every reader of single files: robustify.py, the outlier folders, and the ImageFolder datamodules
    path = tmp_path / "o" / "x.png"
    path.parent.mkdir()
    path.write_bytes(_png16(array16))
    image, _, _ = image_files.load_image(path.read_bytes(), 3, 12, "crop")
    assert torch.equal(image, read_image(path, 12)) and torch.equal(load_image(path, 12), image.float() / 255)
    assert (image.int() - decode_image(_png(eight))[:, :, 4:16].int()).abs().max() <= 1
    loaded = np.asarray(folders.pil_loader(path), dtype=int)
    assert np.abs(loaded - decode_image(_png(eight)).permute(1, 2, 0).numpy()).max() <= 1


def test_image_folders_read_16bit_images_as_their_8bit_versions(tmp_path):
    grey, _ = _gradients()
    for name, content in (("sixteen", _png16(grey)), ("eight", _png(np.rint(grey / 257).astype(np.uint8)))):
        for split in ("train", "test"):
            for label in ("a", "b"):
                (tmp_path / name / split / label).mkdir(parents=True)
                (tmp_path / name / split / label / "x.png").write_bytes(content)
    modules = []
    for name in ("sixteen", "eight"):
        dm = folders.ImageFolderDataModule(root=str(tmp_path / name), image_size=12, transforms="cifar", val_size=1,
                                           num_workers=0)  # fmt: skip
        dm.setup()
        modules.append(dm.dataset("test")[0][0])
    sixteen, eight = modules
    assert sixteen.shape == eight.shape and (sixteen - eight).abs().max() <= 1 / 255 + 1e-6


def test_images_without_a_white_level_are_refused(tmp_path):
    """32-bit float (and 32-bit integer) images have no fixed range: one clear error, which
    robustify.py reports per file."""
    from safespot.data.images import UnsupportedImageError

    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(tmp_path / "f.tif")
    with pytest.raises(UnsupportedImageError, match=r"floating-point images \(PIL mode F\) are not supported"):
        decode_image(tmp_path / "f.tif")
    with pytest.raises(image_files.FileFailure, match="failed: unreadable: floating-point images"):
        image_files.load_image((tmp_path / "f.tif").read_bytes(), 3, 8, "crop")


def test_resize_is_shorter_side_bilinear_antialiased_then_centre_crop():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.integers(0, 256, (3, 48, 32), dtype=np.uint8))
    same = x[:, :32, :32]
    assert resize_and_crop(same, 32) is same  # already the size: untouched
    out = resize_and_crop(x, 16)
    full = TF.resize(x, [24, 16], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16) and torch.equal(out, full[:, 4:20])
    # antialiasing: one bright column in four shrinks 4x to its mean grey, not to the black
    # that plain bilinear (sampling between columns 4i+1 and 4i+2) would give
    lines = torch.zeros(1, 32, 32, dtype=torch.uint8)
    lines[..., ::4] = 255
    assert (resize_and_crop(lines, 8)[..., 1:-1].float() - 255 / 4).abs().max() <= 1  # away from the borders
    # PIL's bilinear (what the outlier folders used before) agrees to within one grey level
    pil = np.asarray(Image.fromarray(x.permute(1, 2, 0).numpy()).resize((16, 24), Image.BILINEAR))
    assert np.abs(pil[4:20].astype(int) - out.permute(1, 2, 0).numpy()).max() <= 1


def test_robustify_and_outlier_folders_read_images_alike(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "o" / "x.png"
    path.parent.mkdir()
    path.write_bytes(_png(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)))
    image, original, resized = image_files.load_image(path.read_bytes(), 3, 16, "crop")
    assert (original, resized) == ("30x40", True)
    assert torch.equal(image, read_image(path, 16))
    assert torch.equal(load_image(path, 16), image.float() / 255)
    folder = build_outlier_dataset({"kind": "folder", "root": str(tmp_path / "o")}, "test", 16)
    x, label = folder[0]
    assert label == -1 and torch.equal(x, image.float() / 255)
    with pytest.raises(image_files.FileFailure, match="resize=refuse"):
        image_files.load_image(path.read_bytes(), 3, 16, "refuse")


def test_npy_outliers_use_the_same_resize(tmp_path):
    array = np.random.default_rng(3).integers(0, 256, (2, 8, 16, 3), dtype=np.uint8)  # N, H, W, C
    np.save(tmp_path / "a.npy", array)
    x, _ = NumpyImages(tmp_path / "a.npy", image_size=4)[1]
    expected = resize_and_crop(torch.from_numpy(array[1]).permute(2, 0, 1).float() / 255, 4)
    assert x.shape == (3, 4, 4) and torch.allclose(x, expected.clamp(0, 1))


# --- downloads ------------------------------------------------------------------------------
class FakeTorchvision:
    """Stands in for a torchvision dataset class: records calls; with ``download=True`` it
    "downloads" by creating ``marker`` under root (or raises ``error``)."""

    calls: ClassVar[list[dict]] = []
    marker: ClassVar[str] = "cifar-10-batches-py"
    error: ClassVar[Exception | None] = None

    def __init__(self, root, train=None, split=None, transform=None, download=False):
        type(self).calls.append({"root": Path(root), "train": train, "split": split, "download": download})
        if download:
            if self.error is not None:
                raise self.error
            (Path(root) / self.marker).mkdir(parents=True, exist_ok=True)
        elif not (Path(root) / self.marker).exists():
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        self.transform = transform

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return self.transform(Image.new("RGB", (32, 32), (10 * i, 0, 0))), i % 10


@pytest.fixture
def fake(monkeypatch):
    """``(name, fake class)``: torchvision's dataset class replaced for one datamodule."""

    def install(name: str, marker: str, error: Exception | None = None) -> type[FakeTorchvision]:
        cls = type(f"Fake{name}", (FakeTorchvision,), {"calls": [], "marker": marker, "error": error})
        monkeypatch.setattr(folders.datasets, name, cls)
        return cls

    return install


SMALL = dict(val_size=4, batch_size=4, num_workers=0)


def test_no_download_when_the_root_holds_the_data(tmp_path, fake):
    cls = fake("CIFAR10", "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py").mkdir()
    dm = CIFAR10DataModule(root=str(tmp_path), download=True, **SMALL)
    dm.prepare_data()
    assert cls.calls == []
    dm.setup()
    assert [c["download"] for c in cls.calls] == [False, False, False] and len(dm.splits["train"]) == 16


@pytest.mark.parametrize(
    "module,name,marker,split_key",
    [
        (CIFAR10DataModule, "CIFAR10", "cifar-10-batches-py", "train"),
        (CIFAR100DataModule, "CIFAR100", "cifar-100-python", "train"),
        (SVHNDataModule, "SVHN", "train_32x32.mat", "split"),
    ],
)
def test_download_runs_in_prepare_data_only_when_asked_and_missing(tmp_path, fake, module, name, marker, split_key):
    cls = fake(name, marker)
    root = tmp_path / "new"  # not even there yet
    dm = module(root=str(root), download=True, **SMALL)
    assert cls.calls == [] and dm.prepare_data_per_node is False  # construction downloads nothing; rank 0 only
    with pytest.raises(DataConfigError, match=r"data\.download=true downloads it in prepare_data"):
        dm.setup()  # setup never downloads
    assert cls.calls == []
    dm.prepare_data()
    assert [c["download"] for c in cls.calls] == [True, True] and {c["root"] for c in cls.calls} == {root}
    assert [c[split_key] for c in cls.calls] == ([True, False] if split_key == "train" else ["train", "test"])
    dm.prepare_data()  # now present: nothing more
    assert len(cls.calls) == 2
    dm.setup()
    assert dm.layout == "torchvision" and all(not c["download"] for c in cls.calls[2:])
    x, y, index = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 32, 32)


def test_missing_data_without_download_is_one_clear_error(tmp_path, fake):
    cls = fake("CIFAR10", "cifar-10-batches-py")
    with pytest.raises(DataConfigError, match=r"data\.root.*data\.download=true"):
        CIFAR10DataModule(root=str(tmp_path), **SMALL)
    (tmp_path / "cifar-10-batches-py").mkdir()
    dm = CIFAR10DataModule(root=str(tmp_path), **SMALL)
    (tmp_path / "cifar-10-batches-py").rmdir()  # gone before prepare_data
    with pytest.raises(DataConfigError, match=r"data\.root.*data\.download=true"):
        dm.prepare_data()
    assert cls.calls == []


def test_failed_download_is_one_clear_error(tmp_path, fake):
    fake("CIFAR10", "cifar-10-batches-py", error=urllib.error.URLError("[Errno -3] Temporary failure"))
    dm = CIFAR10DataModule(root=str(tmp_path), download=True, **SMALL)
    with pytest.raises(DataConfigError, match=r"data\.root=.*failed \(data\.download=true\): URLError") as err:
        dm.prepare_data()
    assert "data.download=false" in str(err.value)


# --- outliers: the method asks ----------------------------------------------------------------
def _ood_data() -> SyntheticOODDataModule:
    dm = SyntheticOODDataModule(n_train=48, n_test=16, val_size=16, n_outliers=24, val_outlier_size=8, batch_size=8)
    dm.setup()
    return dm


def _paired(loader) -> bool:
    batch = next(iter(loader))
    batch = batch[0] if isinstance(batch, tuple) and isinstance(batch[0], dict) else batch
    return isinstance(batch, dict)


def test_datamodule_pairs_batches_when_asked():
    dm = _ood_data()
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0)  # under a Trainer nobody asked yet
    assert not _paired(dm.train_dataloader()) and not _paired(dm.val_dataloader())
    assert dm.with_outliers() is dm
    assert _paired(dm.train_dataloader()) and _paired(dm.val_dataloader())
    assert not _paired(dm.test_dataloader())  # the test split is always in-distribution
    dm.with_outliers(False)
    assert not _paired(dm.train_dataloader())


def test_outlier_methods_ask_for_outliers_in_setup(tiny_net):
    dm = _ood_data()
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0)
    method = OutlierExposure(net=tiny_net, optimizer=partial(torch.optim.SGD, lr=0.1), monitor="val/acc")
    assert method.needs_outliers
    method.trainer = SimpleNamespace(datamodule=dm)
    method.setup("fit")
    assert dm.paired() and _paired(dm.train_dataloader())


def test_training_downloads_through_prepare_data_before_setup(tmp_path, fake, make_cfg):
    from safespot.train import train

    cls = fake("CIFAR10", "cifar-10-batches-py")
    root = tmp_path / "data"
    cfg = make_cfg(
        "data=cifar10", f"data.root={root}", "data.download=true", "data.num_workers=0", "data.val_size=4",
        "data.batch_size=4", "data.eval_batch_size=4", "method=natural", "debug=fast_dev_run",
    )  # fmt: skip
    _, objs = train(cfg)
    assert [c["download"] for c in cls.calls[:2]] == [True, True] and not any(c["download"] for c in cls.calls[2:])
    assert objs["trainer"].global_step == 1 and objs["datamodule"].root == root


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "cifar10_ood"])
def test_downloadable_data_sets_download_when_missing_by_default(make_cfg, name):
    """On a machine with internet a first run fetches CIFAR-10/100 or SVHN into the data root by
    itself (only when the root holds no copy); offline that download is one clear error."""
    assert make_cfg(f"data={name}", synthetic=False).data.download is True
