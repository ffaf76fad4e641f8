"""Cost of the framework's PGD-T relative to its floor: T forward + input-gradient passes.

    python bench/bench_pgd_cost.py [--quick] [--model small_cnn|preact_resnet18|wrn34_10] [--steps 20]

Ratio = time(PGD-T) / (T x time(one forward pass + input gradient)), measured side by side
on the same batch; 1.0 means the attack adds nothing beyond the passes it must make
(target <= 1.10). Both l_inf and l_2 are measured.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench_adv_step import make_net
from common import hardware, time_call
from safespot.attacks import PGD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="small_cnn", choices=["small_cnn", "preact_resnet18", "wrn34_10"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = make_net(args.model).to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    repeats = 3 if args.quick else 7

    def one_pass() -> None:
        xr = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(net(xr), y, reduction="sum"), xr)

    print(f"hardware: {hardware()}")
    print(f"model {args.model}, batch {args.batch_size}, PGD-{args.steps}")
    for norm, eps in (("linf", 8 / 255), ("l2", 0.5)):
        attack = PGD(norm, eps, steps=args.steps)
        one_pass()
        attack(net, x, y)
        ratios = []
        for _ in range(repeats):  # alternate the two measurements
            base = time_call(one_pass, device, 5)
            full = time_call(lambda a=attack: a(net, x, y), device, 1)
            ratios.append(full / (args.steps * base))
        ratios.sort()
        print(
            f"{norm}: PGD-{args.steps} / ({args.steps} x pass) = {ratios[len(ratios) // 2]:.3f} "
            f"(min {ratios[0]:.3f}, max {ratios[-1]:.3f})   target <= 1.10"
        )


if __name__ == "__main__":
    main()
