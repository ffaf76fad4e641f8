"""Cost of FLSS's N-sample inference (paper 004, Section 4.3: the encoder runs once, only the MLP
head runs on the N latent samples) relative to one forward pass of the same model.

    python bench/bench_flss_inference.py [--quick] [--model small_cnn|preact_resnet18] [--samples 100]

Measured side by side on the same batch, alternating: one no-sampling forward pass ``C(x, 0)``,
``sample_logits(x, N)`` (global random state) and ``vote_logits(x, seed=...)`` (per-image seeded
draws, as the evaluations use). Ratio = time / time(one forward pass); the paper reports about 2%
extra for N = 100 on a GPU. N full forward passes would cost N times one pass.
"""

from __future__ import annotations

import argparse

import torch

from common import hardware, time_call
from safespot.models import PreActResNet18, SmallCNN, build_stochastic_classifier

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]


def make_flss(name: str) -> torch.nn.Module:
    backbone = {"small_cnn": lambda: SmallCNN(10, width=16), "preact_resnet18": lambda: PreActResNet18(10)}[name]()
    latent = {"small_cnn": None, "preact_resnet18": 512}[name]
    hidden = {"small_cnn": (128,), "preact_resnet18": (256,)}[name]
    return build_stochastic_classifier(backbone, MEAN, STD, 10, latent_dim=latent, hidden=hidden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="small_cnn", choices=["small_cnn", "preact_resnet18"])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = make_flss(args.model).to(device).eval()
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    seeds = torch.arange(args.batch_size)
    net.n_vote = args.samples
    repeats = 3 if args.quick else 7

    @torch.no_grad()
    def one_pass() -> None:
        with net.no_sampling():
            net(x)

    def sampled() -> None:
        net.sample_logits(x, args.samples)

    def seeded_vote() -> None:
        net.vote_logits(x, seed=seeds)

    print(f"hardware: {hardware()}")
    print(f"model flss_{args.model}, batch {args.batch_size}, N = {args.samples}")
    for fn in (one_pass, sampled, seeded_vote):  # warm-up
        fn()
    ratios: dict[str, list[float]] = {"sample_logits": [], "vote_logits (seeded)": []}
    for _ in range(repeats):  # alternate the measurements
        base = time_call(one_pass, device, 5)
        ratios["sample_logits"].append(time_call(sampled, device, 5) / base)
        ratios["vote_logits (seeded)"].append(time_call(seeded_vote, device, 5) / base)
    for name, values in ratios.items():
        values.sort()
        print(
            f"{name} / one forward pass = {values[len(values) // 2]:.3f} "
            f"(min {values[0]:.3f}, max {values[-1]:.3f});   {args.samples} full passes: {args.samples}.0"
        )


if __name__ == "__main__":
    main()
