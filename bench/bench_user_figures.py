"""The figures users plan with, for one model (default WRN-34-10 on CIFAR-10), derived from
measured pass rates of that model on this machine:

    python bench/bench_user_figures.py [--quick] [--model wrn34_10|preact_resnet18|small_cnn] [--batch-size 64]

Three passes are timed on the same batch (median of repeats): an attack pass (forward + input
gradient, parameters frozen, eval mode: what PGD and the safe-spot search repeat), a training
pass (forward + backward + SGD step, train mode) and a no-grad forward pass (what CERTIFY
repeats). From them:

- robustified images/s: Algorithm 1's fixed schedule, 1 + (MAXITER + 1)(T + 1) = 2,122 attack
  passes per image (MAXITER 100, T 20), and at ``--evals-per-image`` (the early-exit count the
  robustifier benchmark measures for its model);
- PGD-AT epoch: 50,000 images x (10 attack passes + 1 training pass), PGD-10;
- certified images/minute: CERTIFY with n0 = 100 and n = 100,000 forward passes per image.

The other benchmarks show that the framework's PGD, robustifier and CERTIFY cost their passes
and little more (ratios near 1), which is what makes these derived figures meaningful. On CUDA
the bf16 autocast figures are printed too.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

from bench_adv_step import make_net
from common import hardware, time_call

SCHEDULE = 1 + (100 + 1) * (20 + 1)
CERTIFY_PASSES = 100 + 100_000
EPOCH_IMAGES = 50_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="wrn34_10", choices=["small_cnn", "preact_resnet18", "wrn34_10"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 16 on CPU")
    parser.add_argument("--evals-per-image", type=float, default=137.5, help="early-exit evaluations per image")
    args = parser.parse_args()
    if args.evals_per_image <= 0 or (args.batch_size is not None and args.batch_size < 1):
        parser.error("--evals-per-image must be > 0 and --batch-size >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch_size or (256 if device.type == "cuda" else 16)
    repeats = 3 if args.quick else 7
    torch.manual_seed(0)
    net = make_net(args.model).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    print(f"hardware: {hardware()}")
    print(f"model {args.model}, batch {batch}, median of {repeats}")
    precisions = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    for precision in precisions:

        def autocast(p: str = precision) -> contextlib.AbstractContextManager:
            if p == "bf16":
                return torch.autocast(device.type, dtype=torch.bfloat16)
            return contextlib.nullcontext()

        def attack_pass() -> None:
            net.eval()
            for p in net.parameters():
                p.requires_grad_(False)
            xr = x.clone().requires_grad_(True)
            with autocast():
                loss = F.cross_entropy(net(xr).float(), y, reduction="sum")
            torch.autograd.grad(loss, xr)

        def train_pass() -> None:
            net.train()
            for p in net.parameters():
                p.requires_grad_(True)
            with autocast():
                loss = F.cross_entropy(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        @torch.no_grad()
        def forward_pass() -> None:
            net.eval()
            with autocast():
                net(x)

        times = {}
        for name, fn in (("attack", attack_pass), ("train", train_pass), ("forward", forward_pass)):
            fn()  # warm-up
            times[name] = time_call(fn, device, repeats) / batch  # seconds per image
        attack, train, forward = times["attack"], times["train"], times["forward"]
        print(
            f"[{precision}] per image: attack pass {attack * 1e3:.3f} ms, training pass {train * 1e3:.3f} ms, "
            f"forward {forward * 1e3:.3f} ms"
        )
        print(f"[{precision}] robustified images/s, fixed schedule ({SCHEDULE} passes): {1 / (attack * SCHEDULE):.3g}")
        print(
            f"[{precision}] robustified images/s, early exit ({args.evals_per_image:g} passes): "
            f"{1 / (attack * args.evals_per_image):.3g}"
        )
        epoch = EPOCH_IMAGES * (10 * attack + train)
        print(f"[{precision}] PGD-10 AT epoch on 50,000 images: {epoch / 60:.1f} min ({epoch / 3600:.2f} h)")
        print(f"[{precision}] certified images/min (n0 100, n 100,000): {60 / (forward * CERTIFY_PASSES):.3g}")


if __name__ == "__main__":
    main()
