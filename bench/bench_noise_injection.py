"""Noise-injected ResNet-20 (paper 003): per-image seeded weight noise versus one draw per batch,
side by side, and NAttack's throughput.

    python bench/bench_noise_injection.py [--quick] [--images 64] [--noise cni_w]

Both sides run the same forward pass (no gradients) of ResNet-20 with the chosen noise on the same
images: the baseline draws one weight perturbation per pass for the whole batch from the global
RNG (what the PNI / CNI training code does); the framework's side, inside
``safespot.smoothing.seeded_noise``, gives every image its own perturbation from its seeded stream
(batch- and process-independent records) through grouped convolutions. Ratio: images/s (seeded /
one draw). Then NAttack (population 30, 5 iterations) on the seeded model, in images/s.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from common import hardware, time_call
from safespot.attacks import NAttack
from safespot.models import ResNet20
from safespot.smoothing.soft import seeded_noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images (CPU smoke run)")
    parser.add_argument("--images", type=int, default=None, help="images (default 64; quick 16)")
    parser.add_argument("--noise", default="cni_w", choices=["pni_w", "pni_a", "cni_w"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    images = args.images or (16 if args.quick else 64)
    if images < 1 or args.repeats < 1:
        parser.error("--images and --repeats must be >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = ResNet20(noise=args.noise).to(device).eval().requires_grad_(False)
    x = torch.rand(images, 3, 32, 32, device=device)
    seeds = torch.arange(images, device=device)

    def shared() -> torch.Tensor:
        return net(x)

    def seeded() -> torch.Tensor:
        with seeded_noise(net, seeds):
            return net(x)

    shared(), seeded()  # warm-up
    plain, ours = [], []
    with torch.no_grad():
        for _ in range(args.repeats):  # alternate the two sides
            plain.append(time_call(shared, device, 1))
            ours.append(time_call(seeded, device, 1))
    p, o = statistics.median(plain), statistics.median(ours)
    with torch.no_grad():
        y = net(x).argmax(1)
    attack = NAttack("linf", 8 / 255, iterations=5, npop=30, check_every=5)
    t = time_call(lambda: attack(net, x, y, seeds=seeds), device, 1)
    print(f"hardware: {hardware()}")
    print(f"ResNet-20 {args.noise}, {images} images, forward pass without gradients")
    print(f"one draw per batch : {images / p:10.2f} images/s  ({p:.3f} s)")
    print(f"seeded per image   : {images / o:10.2f} images/s  ({o:.3f} s)")
    print(f"throughput ratio (seeded / one draw): {p / o:.3f}")
    print(f"NAttack (npop 30, 5 iterations, seeded): {images / t:.2f} images/s ({t:.2f} s)")


if __name__ == "__main__":
    main()
