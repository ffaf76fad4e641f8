import json

import pytest
import torch
from PIL import Image

from safespot.data import CIFAR10DataModule, DataConfigError, ImageFolderDataModule, SyntheticDataModule
from safespot.data.base import per_process_batch_size
from safespot.data.samplers import EpochSeededSampler


def _image_tree(root, classes=("a", "b", "c"), per_class=4, size=32):
    for split in ("train", "test"):
        for k, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), color=(40 * k, 10 * i, 100)).save(d / f"{i}.png")
    return root


def test_cifar10_detects_imagefolder_layout_below_root(tmp_path):
    _image_tree(tmp_path / "cifar10-jpeg", classes=[f"c{i}" for i in range(10)], per_class=3)
    dm = CIFAR10DataModule(root=str(tmp_path), val_size=5, batch_size=4, num_workers=0)
    assert dm.layout == "folder" and dm.root == tmp_path / "cifar10-jpeg"
    dm.setup()
    x, y, idx = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
    assert len(dm.splits["val"]) == 5 and len(dm.splits["train"]) == 25
    assert not set(dm.splits["val"]) & set(dm.splits["train"])


def test_cifar10_detects_torchvision_layout(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    dm = CIFAR10DataModule(root=str(tmp_path))
    assert dm.layout == "torchvision" and dm.root == tmp_path


def test_missing_or_empty_root_fails_clearly(tmp_path):
    with pytest.raises(DataConfigError, match=r"data\.root"):
        CIFAR10DataModule(root=str(tmp_path / "nope"))
    with pytest.raises(DataConfigError, match=r"cifar-10-batches-py"):
        CIFAR10DataModule(root=str(tmp_path))
    with pytest.raises(DataConfigError, match="num_classes"):
        ImageFolderDataModule(root=str(_image_tree(tmp_path / "f")), num_classes=7)


def test_splits_are_seeded_and_saved(tmp_path):
    def splits(seed):
        dm = SyntheticDataModule(n_train=100, n_test=40, val_size=20, train_subset=30, test_subset=10, seed=seed)
        dm.setup()
        return dm

    a, b, c = splits(0), splits(0), splits(1)
    assert a.splits == b.splits and a.splits != c.splits
    assert len(a.splits["train"]) == 30 and len(a.splits["test"]) == 10
    saved = json.loads(a.save_splits(tmp_path / "splits.json").read_text())
    assert saved["val"] == a.splits["val"] and saved["seed"] == 0


def test_test_parts_are_contiguous_pieces_that_together_are_the_test_split():
    def test_split(part=None, n=10):
        dm = SyntheticDataModule(n_train=100, n_test=40, val_size=20, test_subset=n, test_part=part, seed=3)
        dm.setup()
        return dm.splits["test"]

    whole = test_split()
    pieces = [test_split([k, 3]) for k in range(3)]
    assert [len(p) for p in pieces] == [3, 3, 4] and [i for p in pieces for i in p] == whole
    assert test_split([1, 3]) == pieces[1]  # the same piece whenever it is asked for
    for bad in ([3, 3], [-1, 2], [0], [0.5, 2], [True, 2]):
        with pytest.raises(DataConfigError, match=r"data\.test_part"):
            SyntheticDataModule(n_test=40, test_part=bad)
    with pytest.raises(DataConfigError, match="some would be empty"):
        test_split([0, 4], n=3)


def test_eval_split_val_tests_held_out_training_images_never_trained_on():
    """``data.eval_split=val``: the tested images are seeded held-out training images (for choosing
    a setting without looking at the test images), with test_subset and test_part applied."""
    dm = SyntheticDataModule(n_train=100, n_test=40, val_size=20, test_subset=8, eval_split="val", seed=3)
    dm.setup()
    held_out = set(range(100)) - set(dm.splits["train"])
    assert len(dm.splits["test"]) == 8 and set(dm.splits["test"]) <= held_out and len(held_out) == 20
    x, y, idx = next(iter(dm.test_dataloader()))
    train_plain = dm.dataset("val").dataset  # the training images, untransformed
    assert torch.equal(x[0], train_plain[int(idx[0])][0]) and int(y[0]) == train_plain[int(idx[0])][1]
    test = SyntheticDataModule(n_train=100, n_test=40, val_size=20, test_subset=8, seed=3)
    test.setup()
    assert not torch.equal(test.dataset("test")[0][0], dm.dataset("test")[0][0])
    piece = SyntheticDataModule(
        n_train=100, n_test=40, val_size=20, test_subset=8, eval_split="val", test_part=[1, 2], seed=3
    )
    piece.setup()
    assert piece.splits["test"] == dm.splits["test"][4:]
    with pytest.raises(DataConfigError, match=r"data\.eval_split must be one of"):
        SyntheticDataModule(eval_split="train")
    with pytest.raises(DataConfigError, match=r"data\.val_size > 0"):
        SyntheticDataModule(val_size=0, eval_split="val")


def test_batches_carry_dataset_indices():
    dm = SyntheticDataModule(n_train=64, n_test=32, val_size=8, test_subset=10, eval_batch_size=4)
    dm.setup()
    seen = torch.cat([batch[2] for batch in dm.test_dataloader()]).tolist()
    assert seen == dm.splits["test"]
    full = dm.dataset("test").dataset
    x, y, idx = next(iter(dm.test_dataloader()))
    assert torch.equal(x[0], full[int(idx[0])][0])


def test_global_batch_size_is_divided_across_processes():
    assert per_process_batch_size(128, 4) == 32
    with pytest.raises(DataConfigError, match="divisible by the number of processes"):
        per_process_batch_size(130, 4)


def test_epoch_seeded_sampler_depends_only_on_seed_and_epoch():
    s1, s2 = EpochSeededSampler(50, 3), EpochSeededSampler(50, 3)
    s1.set_epoch(2)
    s2.set_epoch(2)
    assert list(s1) == list(s2)
    s2.set_epoch(3)
    assert list(s1) != list(s2) and sorted(s2) == list(range(50))


def test_synthetic_data_is_deterministic_and_in_range():
    a, b = SyntheticDataModule(), SyntheticDataModule()
    a.setup()
    b.setup()
    xa, ya, _ = next(iter(a.test_dataloader()))
    xb, yb, _ = next(iter(b.test_dataloader()))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.min() >= 0 and xa.max() <= 1 and len(ya.unique()) == 4
