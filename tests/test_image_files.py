"""The image files of robustify.py as a datamodule (safespot.data.image_files): each process reads
its positions of the files to do, each file once; files that fail to load carry their status;
placeholders give every process a batch; a file's seed comes from its bytes; with recursive=true
subdirectories are walked in a fixed order, links to directories not followed."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from safespot.data.image_files import ImageFilesDataModule, collect_inputs, file_seed


def folder_of_files(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / name)
    (folder / "c.txt").write_text("not an image")
    (folder / "d.png").write_bytes(b"not a PNG")
    return folder


def batches(datamodule: ImageFilesDataModule, rank: int, world_size: int) -> list:
    datamodule.trainer = SimpleNamespace(world_size=world_size, global_rank=rank)
    return list(datamodule.predict_dataloader())


def test_each_process_reads_its_share_once_and_failures_carry_their_status(tmp_path):
    folder = folder_of_files(tmp_path / "in")
    inputs = collect_inputs(str(folder))
    assert [(item.path.name, item.reason) for item in inputs] == [
        ("a.png", None),
        ("b.png", None),
        ("c.txt", "skipped: not an image"),
        ("d.png", None),
    ]
    datamodule = ImageFilesDataModule(inputs, channels=3, size=8, seed=5, batch_size=2)
    (first,) = batches(datamodule, rank=0, world_size=2)  # positions 0 and 3 of the readable 0, 1, 3
    (second,) = batches(datamodule, rank=1, world_size=2)
    assert first.positions.tolist() == [0, 3] and second.positions.tolist() == [1]
    assert first.images.shape == (1, 3, 8, 8) and first.images.dtype == torch.uint8
    assert first.files[1].failure.startswith("failed: unreadable") and first.files[1].image is None
    expected = file_seed(5, (folder / "a.png").read_bytes())
    assert first.seeds.tolist() == [expected] and first.files[0].seed == expected
    assert torch.equal(first.images[0], torch.from_numpy(np.asarray(Image.open(folder / "a.png"))).permute(2, 0, 1))
    alone = batches(datamodule, rank=0, world_size=1)
    assert [b.positions.tolist() for b in alone] == [[0, 1], [3]] and alone[0].images.shape[0] == 2


def test_placeholders_give_every_process_a_batch(tmp_path):
    """With fewer files to do than processes (none, here), each process still gets one batch,
    which holds no file: Lightning's predict loop then runs on every process."""
    datamodule = ImageFilesDataModule(collect_inputs(str(folder_of_files(tmp_path / "in"))), 3, 8, batch_size=4)
    datamodule.select([])
    for rank in (0, 1):
        (batch,) = batches(datamodule, rank=rank, world_size=2)
        assert batch.positions.tolist() == [] and batch.images.shape == (0, 3, 8, 8) and batch.files == []
    datamodule.select([1])
    assert [b.positions.tolist() for rank in (0, 1) for b in batches(datamodule, rank, 2)] == [[1], []]


def tree_of_files(folder: Path) -> Path:
    """in/{a.png, b/{c.png, d.txt, e/f.png}, b.png, loop -> in, z.png}: a subdirectory, a deeper one,
    and a link back to the top (a cycle if it were followed)."""
    rng = np.random.default_rng(1)
    for name in ("a.png", "b/c.png", "b/e/f.png", "b.png", "z.png"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / name)
    (folder / "b" / "d.txt").write_text("not an image")
    (folder / "loop").symlink_to(folder)
    return folder


def test_recursive_inputs_walk_subdirectories_in_order_without_following_links(tmp_path):
    """recursive=true: each subdirectory's entries, sorted, in its place; names relative to the
    input directory; a link to a directory gets a row and is not followed (no cycle); a directory
    named again in a list gives duplicates. recursive=false keeps one row per subdirectory."""
    folder = tree_of_files(tmp_path / "in")
    inputs = collect_inputs(str(folder), recursive=True)
    assert [(item.name.as_posix(), item.reason) for item in inputs] == [
        ("a.png", None),
        ("b/c.png", None),
        ("b/d.txt", "skipped: not an image"),
        ("b/e/f.png", None),
        ("b.png", None),
        ("loop", "skipped: a link to a directory (links to directories are not followed)"),
        ("z.png", None),
    ]
    assert [item.path for item in inputs] == [folder / item.name for item in inputs]

    flat = collect_inputs(str(folder))
    assert [(item.name.as_posix(), item.reason) for item in flat] == [
        ("a.png", None),
        ("b", "skipped: a directory (input directories are not read recursively)"),
        ("b.png", None),
        ("loop", "skipped: a link to a directory (input directories are not read recursively)"),
        ("z.png", None),
    ]

    twice = collect_inputs([str(folder), str(folder / "b")], recursive=True)
    again = [(item.name.as_posix(), item.reason) for item in twice[len(inputs) :]]
    assert again == [
        ("c.png", f"skipped: duplicate of {folder / 'b' / 'c.png'}"),
        ("d.txt", f"skipped: duplicate of {folder / 'b' / 'd.txt'}"),
        ("e/f.png", f"skipped: duplicate of {folder / 'b' / 'e' / 'f.png'}"),
    ]


def test_a_subdirectory_that_cannot_be_listed_gets_a_row(tmp_path, monkeypatch):
    folder = tree_of_files(tmp_path / "in")
    listing = Path.iterdir

    def refused(self):
        if self == folder / "b":
            raise PermissionError(13, "Permission denied")
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", refused)
    inputs = collect_inputs(str(folder), recursive=True)
    assert [(item.name.as_posix(), item.reason) for item in inputs][:3] == [
        ("a.png", None),
        ("b", "skipped: a directory that cannot be listed: Permission denied"),
        ("b.png", None),
    ]
