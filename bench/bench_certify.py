"""CERTIFY throughput: noise samples per second of ``SmoothedClassifier.sample_counts`` (the
Monte Carlo loop behind PREDICT and CERTIFY) against a plain batched loop, side by side.

    python bench/bench_certify.py [--quick] [--n 10000] [--images 8] [--max-batch 1000]

The plain loop is the textbook one (Cohen et al.'s ``sample_noise``): for each image, repeat
it ``max_batch`` times, add ``sigma * randn`` from the global generator, take the argmax and
count. The framework's loop draws every image's noise from seeded per-image blocks (so counts
do not depend on batching) and packs several images into one pass. Both run the same small
CNN (width 16, CIFAR-sized inputs) in eval mode under ``torch.no_grad``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench_adv_step import make_net
from common import hardware, time_call
from safespot.smoothing import SmoothedClassifier


@torch.no_grad()
def plain_counts(net: torch.nn.Module, x: torch.Tensor, n: int, sigma: float, max_batch: int) -> torch.Tensor:
    counts = torch.zeros(len(x), 10, dtype=torch.long, device=x.device)
    for i in range(len(x)):
        remaining = n
        while remaining:
            b = min(max_batch, remaining)
            batch = x[i : i + 1].repeat(b, 1, 1, 1)
            pred = net(batch + sigma * torch.randn_like(batch)).argmax(1)
            counts[i] += torch.bincount(pred, minlength=10)
            remaining -= b
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples (CPU smoke run)")
    parser.add_argument("--n", type=int, default=None, help="noise samples per image (default 10,000; quick 2,000)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = args.n or (2_000 if args.quick else 10_000)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = make_net("small_cnn").to(device).eval()
    smoothed = SmoothedClassifier(net, sigma=0.25, max_batch=args.max_batch).eval()
    x = torch.rand(args.images, 3, 32, 32, device=device)
    seeds = list(range(args.images))
    plain_counts(net, x[:1], args.max_batch, 0.25, args.max_batch)  # warm-up
    plain, ours = [], []
    for _ in range(args.repeats):  # alternate the two sides
        plain.append(time_call(lambda: plain_counts(net, x, n, 0.25, args.max_batch), device, 1))
        ours.append(time_call(lambda: smoothed.sample_counts(x, n, seed=seeds), device, 1))
    total = n * args.images
    p, o = statistics.median(plain), statistics.median(ours)
    print(f"hardware: {hardware()}")
    print(f"small CNN, {args.images} images x {n} noise samples, max_batch {args.max_batch}")
    print(f"plain batched loop : {total / p:12,.0f} samples/s  ({p:.2f} s)")
    print(f"SmoothedClassifier : {total / o:12,.0f} samples/s  ({o:.2f} s)")
    print(f"throughput ratio (safespot / plain): {p / o:.3f}")
    if device.type == "cuda":  # bf16 autocast (trainer.precision=bf16-mixed in evaluate.py) against fp32
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = [time_call(lambda: smoothed.sample_counts(x, n, seed=seeds), device, 1) for _ in range(args.repeats)]
        h = statistics.median(half)
        print(f"SmoothedClassifier bf16 : {total / h:12,.0f} samples/s; bf16 / fp32 throughput {o / h:.3f}")


if __name__ == "__main__":
    main()
