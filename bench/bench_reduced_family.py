"""Candidate networks for the CPU-sized ("reduced") presets: what one training step costs per image
for each method the reduced tables train, and the minutes an epoch on all 50,000 CIFAR-10 training
images takes on this machine.

    python bench/bench_reduced_family.py [--quick] [--models resnet20 preact_resnet18_w16 ...]

Per network and method, on random CIFAR-size batches (32x32, 10 classes, batch 128): natural
training, fast adversarial training (FGSM-RS: one step of 1.25 eps from a random start), PGD-5
adversarial training (step eps/4), and fast preemptive training (one safe-spot step of delta, then
FGSM-RS: paper 000's S-FGSM+Fast), and S-PGD+Fast (``method=spgd_fast``: ten safe-spot steps of
delta/4 from a random start, then FGSM-RS). Each figure is the median of ``--repeats`` timed steps after a
warm-up, in images per second of wall time with the machine's threads, and as minutes per epoch of
50,000 images. Measured CPU time per image is printed too (it does not depend on other load).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from common import hardware
from safespot.models import PreActResNet18, ResNet20
from safespot.models.small_cnn import SmallCNN

EPS = 8 / 255
CANDIDATES = {
    "small_cnn_w16": lambda: SmallCNN(num_classes=10, width=16),
    "small_cnn_w32": lambda: SmallCNN(num_classes=10, width=32),
    "resnet20": lambda: ResNet20(num_classes=10),
    "preact_resnet18_w16": lambda: PreActResNet18(num_classes=10, width=16),
    "preact_resnet18_w32": lambda: PreActResNet18(num_classes=10, width=32),
}


def _grad_sign(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(sign * F.cross_entropy(net(x), y), x)
    return grad.sign()


def step(method: str, net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    if method in ("fgsm_rs", "preemptive_fast", "spgd_fast"):
        if method == "preemptive_fast":  # the safe-spot step: descend the loss within delta
            x = (x - EPS * _grad_sign(net, x, y)).clamp(0, 1)
        if method == "spgd_fast":  # S-PGD's safe-spot step: 10 descents of delta/4 from a random start
            x_s = (x + (torch.rand_like(x) * 2 - 1) * EPS).clamp(0, 1)
            for _ in range(10):
                x_s = (x + (x_s - EPS / 4 * _grad_sign(net, x_s, y) - x).clamp(-EPS, EPS)).clamp(0, 1)
            x = x_s
        start = (x + (torch.rand_like(x) * 2 - 1) * EPS).clamp(0, 1)
        x = (x + (start - x + 1.25 * EPS * _grad_sign(net, start, y)).clamp(-EPS, EPS)).clamp(0, 1)
    elif method == "pgd5":
        x_a = (x + (torch.rand_like(x) * 2 - 1) * EPS).clamp(0, 1)
        for _ in range(5):
            x_a = (x + (x_a + EPS / 4 * _grad_sign(net, x_a, y) - x).clamp(-EPS, EPS)).clamp(0, 1)
        x = x_a
    opt.zero_grad()
    F.cross_entropy(net(x.detach()), y).backward()
    opt.step()


def measure(name: str, method: str, batch: int, repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    net = CANDIDATES[name]().train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    step(method, net, opt, x, y)  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        step(method, net, opt, x, y)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return batch / statistics.median(walls), statistics.median(cpus) / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny batches, one repeat (a smoke run)")
    parser.add_argument("--models", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--methods", nargs="+", default=["natural", "fgsm_rs", "preemptive_fast", "spgd_fast", "pgd5"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    batch, repeats = (8, 1) if args.quick else (args.batch_size, args.repeats)
    print(hardware())
    print(f"batch {batch}, median of {repeats} steps; epoch = 50,000 images\n")
    print("| network | params (M) | method | images/s | min/epoch | CPU ms/image |")
    print("|---|---:|---|---:|---:|---:|")
    for name in args.models:
        params = sum(p.numel() for p in CANDIDATES[name]().parameters()) / 1e6
        for method in args.methods:
            rate, cpu = measure(name, method, batch, repeats)
            print(f"| {name} | {params:.2f} | {method} | {rate:,.0f} | {50_000 / rate / 60:.1f} | {1000 * cpu:.2f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
