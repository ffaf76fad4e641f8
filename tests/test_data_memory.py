"""``data.in_memory``: the decoded-tensor loader serves what the file loaders serve."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from safespot.data import CIFAR10DataModule, DataConfigError, ImageFolderDataModule, SyntheticDataModule
from safespot.data.memory import BatchAugment, InMemoryLoader
from safespot.train import train


def _noise_tree(root, classes=("a", "b", "c"), per_class=6, size=32):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes:
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _cifar(root, in_memory, **kw):
    dm = CIFAR10DataModule(
        root=str(root), val_size=4, batch_size=5, eval_batch_size=7, num_workers=0, in_memory=in_memory, **kw
    )
    dm.setup()
    return dm


def test_evaluation_batches_equal_the_file_loader_bit_for_bit(tmp_path):
    root = _noise_tree(tmp_path / "data")
    files, memory = _cifar(root, False), _cifar(root, True)
    assert memory._memory["test"][0].dtype == torch.uint8
    for split in ("val", "test"):
        a = list(getattr(files, f"{split}_dataloader")())
        b = list(getattr(memory, f"{split}_dataloader")())
        assert len(a) == len(b)
        for (xa, ya, ia), (xb, yb, ib) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)


def test_training_batches_are_crops_and_flips_of_the_images_in_the_seeded_order(tmp_path):
    root = _noise_tree(tmp_path / "data")
    memory, plain = _cifar(root, True), _cifar(root, False, augment=False)
    originals = {int(i): x for xb, _, ib in plain.val_dataloader() for x, i in zip(xb, ib, strict=True)}
    originals |= {int(i): x for xb, _, ib in _loader_without_shuffle(plain) for x, i in zip(xb, ib, strict=True)}
    loader = memory.train_dataloader()
    epoch0 = list(loader)
    order = torch.cat([ib for _, _, ib in epoch0])
    expected = torch.tensor(memory.splits["train"])[list(iter(loader.sampler))]
    assert torch.equal(order, expected)  # the EpochSeededSampler permutation
    crops = set()
    for xb, _, ib in epoch0:
        for x, i in zip(xb, ib, strict=True):
            padded = F.pad(originals[int(i)], (4, 4, 4, 4))
            found = [
                (dy, dx, flip)
                for dy in range(9)
                for dx in range(9)
                for flip in (False, True)
                if torch.equal(
                    x,
                    (padded[:, dy : dy + 32, dx : dx + 32].flip(2) if flip else padded[:, dy : dy + 32, dx : dx + 32]),
                )
            ]
            assert found, "every training image is a padded crop, possibly flipped, of its original"
            crops.add(found[0])
    assert len(crops) > 3  # the offsets vary between images
    again = [torch.equal(a[0], b[0]) for a, b in zip(epoch0, list(loader), strict=True)]
    assert all(again)  # same epoch, same batches
    loader.sampler.set_epoch(1)
    assert not torch.equal(torch.cat([ib for _, _, ib in loader]), order)


def _loader_without_shuffle(dm):
    from torch.utils.data import DataLoader

    return DataLoader(dm.dataset("train"), batch_size=8)


def test_shards_cover_every_image():
    images, labels = torch.rand(11, 3, 4, 4), torch.arange(11)
    common = dict(batch_size=3, seed=1)

    def rows(rank, train):
        loader = InMemoryLoader(images, labels, labels + 100, train=train, rank=rank, world_size=2, **common)
        return torch.cat([i for _, _, i in loader]).tolist()

    assert sorted(rows(0, False) + rows(1, False)) == list(range(100, 111))  # evaluation: once each
    train0, train1 = rows(0, True), rows(1, True)
    assert len(train0) == len(train1) == 6 and set(train0 + train1) == set(range(100, 111))


def test_batched_augmentation_keeps_shapes_and_values():
    x = torch.rand(8, 3, 6, 6)
    seeds = torch.arange(8)
    out = BatchAugment(2, True)(x, seeds)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= x.max()
    assert torch.equal(BatchAugment(0, False)(x, seeds), x)
    # every crop offset and both flips occur, each image by its own seed
    many = torch.rand(400, 1, 6, 6)
    crops = BatchAugment(2, False)(many, torch.arange(400))
    found = {
        (dy, dx)
        for i in range(400)
        for dy in range(5)
        for dx in range(5)
        if torch.equal(crops[i], F.pad(many[i], (2, 2, 2, 2))[:, dy : dy + 6, dx : dx + 6])
    }
    assert len(found) == 25
    flipped = BatchAugment(0, True)(many, torch.arange(400))
    share = (flipped != many).flatten(1).any(1).float().mean()
    assert 0.4 < share < 0.6


def test_an_images_augmentation_depends_on_its_index_not_its_batch_or_process():
    """Training from memory: image i's crop and flip at an epoch are the same whatever batch
    size and number of processes load it (the per-image augmentation stream)."""
    images, labels = torch.rand(10, 3, 6, 6), torch.arange(10)
    augment = BatchAugment(2, True)

    def seen(batch_size, world_size, epoch):
        out = {}
        for rank in range(world_size):
            loader = InMemoryLoader(
                images,
                labels,
                labels + 50,
                batch_size,
                train=True,
                seed=3,
                augment=augment,
                rank=rank,
                world_size=world_size,
            )
            loader.sampler.set_epoch(epoch)
            for x, _, index in loader:
                out.update({int(i): xi for i, xi in zip(index, x, strict=True)})
        return out

    one, other = seen(4, 1, 0), seen(3, 2, 0)
    assert set(one) == set(other) == set(range(50, 60))
    assert all(torch.equal(one[i], other[i]) for i in one)
    later = seen(4, 1, 1)
    assert any(not torch.equal(one[i], later[i]) for i in one)  # a new epoch draws anew


def test_in_memory_is_refused_where_the_augmentation_has_no_batched_form(tmp_path):
    root = _noise_tree(tmp_path / "data")
    with pytest.raises(DataConfigError, match="in_memory"):
        ImageFolderDataModule(root=str(root), transforms="imagenet", in_memory=True)
    ImageFolderDataModule(root=str(root), transforms="cifar", in_memory=True, image_size=32)
    SyntheticDataModule(in_memory=True)


def test_training_runs_from_memory(make_cfg):
    cfg = make_cfg("method=adversarial", "threat.steps=1", "debug=fast_dev_run", "logger=none", "data.in_memory=true")
    metrics, objs = train(cfg)
    assert objs["trainer"].global_step == 1 and torch.isfinite(torch.tensor(metrics["train/loss_step"]))
    assert isinstance(objs["datamodule"].train_dataloader(), InMemoryLoader)
