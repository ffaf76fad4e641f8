"""Randomised PGD on a smoothed classifier: per-image seeded noise versus the global RNG, side by side.

    python bench/bench_smoothed_attack.py [--quick] [--images 32] [--steps 10] [--m 8]

Both sides run the same PGD on the same ``SmoothedClassifier`` (small CNN, CIFAR-sized inputs):
the baseline draws the soft forward's noise from torch's global generator (what the framework did
before, and what a plain script does); the framework's side passes per-image seeds, so every
forward draws its noise from counter-based per-image streams on the device
(``safespot.smoothing.seeded_noise``), which makes adversarial examples independent of the batch
and of the number of processes. The ratio is images/s (seeded / global RNG).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench_adv_step import make_net
from common import hardware, time_call
from safespot.attacks import PGD
from safespot.smoothing import SmoothedClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images (CPU smoke run)")
    parser.add_argument("--images", type=int, default=None, help="images (default 32; quick 8)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--m", type=int, default=8, help="noise draws per forward pass")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for name in ("steps", "m", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    images = args.images or (8 if args.quick else 32)
    if images < 1:
        parser.error("--images must be >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = make_net("small_cnn").to(device).eval()
    model = SmoothedClassifier(net, sigma=0.25, m=args.m, n_vote=args.m).eval()
    x = torch.rand(images, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (images,), device=device)
    seeds = torch.arange(images, device=device)
    attack = PGD("linf", 8 / 255, steps=args.steps, mode="eval")
    attack(model, x[:2], y[:2])  # warm-up
    attack(model, x[:2], y[:2], seeds=seeds[:2])
    plain, ours = [], []
    for _ in range(args.repeats):  # alternate the two sides
        plain.append(time_call(lambda: attack(model, x, y), device, 1))
        ours.append(time_call(lambda: attack(model, x, y, seeds=seeds), device, 1))
    p, o = statistics.median(plain), statistics.median(ours)
    print(f"hardware: {hardware()}")
    print(f"small CNN, {images} images, PGD-{args.steps}, {args.m} noise draws per forward pass")
    print(f"global RNG noise   : {images / p:10.2f} images/s  ({p:.2f} s)")
    print(f"seeded per image   : {images / o:10.2f} images/s  ({o:.2f} s)")
    print(f"throughput ratio (seeded / global RNG): {p / o:.3f}")


if __name__ == "__main__":
    main()
