"""Cost of one training step of each robust method as a ratio to a PGD adversarial-training
(ADV) step, measured side by side inside ``Trainer.fit``.

    python bench/bench_method_steps.py [--quick] [--model small_cnn|preact_resnet18|wrn34_10]

Every method trains the same network on the same in-memory batches with the same K-step
attack (l_inf 8/255, PGD-K step 2/255): ADV (PGD-K), preemptive training (paper 002
Algorithm 2: one safe-spot step, then PGD-K in B_eps(x_r)), S-PGD+ADV (ten safe-spot steps)
and TRADES (K-step KL attack, then clean and adversarial forward passes). Rounds alternate
between the methods so machine noise hits all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch

from bench_adv_step import EPS, STEP, lightning_steps, make_net
from common import hardware
from safespot.methods import AdversarialTraining, PreemptiveTraining, TradesTraining


def build(name: str, net: torch.nn.Module, steps: int):
    common = {
        "optimizer": partial(torch.optim.SGD, lr=0.01, momentum=0.9),
        "threat": {"norm": "linf", "eps": EPS, "step_size": STEP, "steps": steps},
        "val_attack": None,
        "num_classes": 10,
    }
    if name == "ADV":
        return AdversarialTraining(net, **common)
    if name == "preemptive (L=1)":
        return PreemptiveTraining(net, **common)
    if name == "S-PGD+ADV (L=10)":
        return PreemptiveTraining(net, safe_spot={"steps": 10, "step_fraction": 0.25}, **common)
    return TradesTraining(net, **common)


METHODS = ("ADV", "preemptive (L=1)", "S-PGD+ADV (L=10)", "TRADES")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps (CPU smoke run)")
    parser.add_argument("--model", default="small_cnn", choices=["small_cnn", "preact_resnet18", "wrn34_10"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--pgd-steps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    rounds, per_round = (2, 4) if args.quick else (4, 8)
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(rounds):
        for name in METHODS:
            method = build(name, make_net(args.model).to(device), args.pgd_steps)
            times[name] += lightning_steps(method, x, y, per_round + 1, device)
    base = statistics.median(times["ADV"])
    print(f"hardware: {hardware()}")
    print(f"model {args.model}, batch {args.batch_size}, l_inf 8/255, K = {args.pgd_steps} attack steps")
    for name in METHODS:
        med = statistics.median(times[name])
        print(f"{name:18s}: median {med * 1000:8.1f} ms/step ({len(times[name])} steps)  ratio to ADV {med / base:.3f}")


if __name__ == "__main__":
    main()
