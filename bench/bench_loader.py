"""Training-loader throughput: ``data.in_memory=true`` against the plain DataLoader, side by side.

    python bench/bench_loader.py [--quick] [--root DATA_DIR] [--images 10000] [--workers 2]

Both sides serve the same CIFAR-10 training images (the ImageFolder copy under ``--root``,
default ``$DATA_DIR``) with the same augmentation (random crop 32 pad 4, horizontal flip) in
batches of 128: the plain side is ``CIFAR10DataModule.train_dataloader()`` (torchvision
decoding and transforms in ``--workers`` loader processes); the in-memory side the same
datamodule with ``in_memory=true`` (decoded once at setup, batches cut from one tensor on
the device with batched augmentation). One epoch over ``--images`` images each, epochs
alternating; the one-time decode of the in-memory side is reported separately. On a GPU
machine the in-memory batches are made on the GPU and each side's batch is moved there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from common import hardware, sync
from safespot.data import CIFAR10DataModule


def epoch_seconds(loader: object, device: torch.device) -> tuple[float, int]:
    sync(device)
    start, seen = time.perf_counter(), 0
    for x, _, _ in loader:
        x = x.to(device, non_blocking=True)
        seen += len(x)
    sync(device)
    return time.perf_counter() - start, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,000 images, 2 epochs per side")
    parser.add_argument("--root", default=os.environ.get("DATA_DIR", "data"))
    parser.add_argument("--images", type=int, default=None, help="training images (default 10,000; quick 2,000)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per side (default 3; quick 2)")
    args = parser.parse_args()
    images = args.images or (2_000 if args.quick else 10_000)
    epochs = args.epochs or (2 if args.quick else 3)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def datamodule(in_memory: bool) -> CIFAR10DataModule:
        dm = CIFAR10DataModule(
            root=args.root, batch_size=128, num_workers=args.workers, train_subset=images, in_memory=in_memory
        )
        dm.setup()
        return dm

    plain = datamodule(False).train_dataloader()
    start = time.perf_counter()
    memory_dm = datamodule(True)
    decode = time.perf_counter() - start
    memory = memory_dm.train_dataloader()
    memory.device = device
    rates: dict[str, list[float]] = {"plain": [], "in_memory": []}
    for epoch in range(epochs):
        for name, loader in (("plain", plain), ("in_memory", memory)):
            loader.sampler.set_epoch(epoch)
            seconds, seen = epoch_seconds(loader, device)
            rates[name].append(seen / seconds)
    plain_rate, memory_rate = statistics.median(rates["plain"]), statistics.median(rates["in_memory"])

    def per_epoch(name: str) -> str:
        return ", ".join(f"{r:,.0f}" for r in rates[name])

    print(f"hardware: {hardware()}; {images} CIFAR-10 training images, batch 128, {epochs} epochs per side")
    print(f"plain DataLoader ({args.workers} workers): {plain_rate:,.0f} images/s (epochs: {per_epoch('plain')})")
    print(f"in-memory: {memory_rate:,.0f} images/s (epochs: {per_epoch('in_memory')})")
    print(f"in-memory one-time setup (folder scan + decoding): {decode:.1f} s")
    print(f"ratio in-memory / plain: {memory_rate / plain_rate:.1f}x")


if __name__ == "__main__":
    main()
