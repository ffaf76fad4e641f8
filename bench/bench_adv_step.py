"""PGD adversarial-training step: the framework's LightningModule (inside ``Trainer.fit``)
versus the same step written as a plain PyTorch loop, measured side by side.

    python bench/bench_adv_step.py [--quick] [--model small_cnn|preact_resnet18|wrn34_10]

Both sides train the same network on the same in-memory batches (no data loading), with
PGD-K (l_inf 8/255, step 2/255, random start, attack in train mode), cross-entropy on the
adversarial batch and SGD. Lightning's per-step time is taken between its batch hooks, so
start-up is excluded; blocks of steps alternate between the two sides.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from common import hardware, sync
from safespot.methods import AdversarialTraining
from safespot.models import PreActResNet18, SmallCNN, WideResNet, build_classifier

EPS, STEP = 8 / 255, 2 / 255
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]


def make_net(name: str) -> torch.nn.Module:
    backbone = {
        "small_cnn": lambda: SmallCNN(10, width=16),
        "preact_resnet18": lambda: PreActResNet18(10),
        "wrn34_10": lambda: WideResNet(34, 10, 10),
    }[name]()
    return build_classifier(backbone, MEAN, STD, 10)


def plain_step(net, opt, x, y, steps):
    """Hand-written PGD-AT step (Madry et al.) in plain PyTorch."""
    net.train()
    for p in net.parameters():
        p.requires_grad_(False)
    delta = (torch.rand_like(x) * 2 - 1) * EPS
    x_adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(net(x_adv), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + STEP * g.sign(), x - EPS), x + EPS).clamp(0, 1)
    for p in net.parameters():
        p.requires_grad_(True)
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(net(x_adv), y)
    loss.backward()
    opt.step()


class StepTimer(L.Callback):
    def __init__(self, device):
        self.device, self.times, self._start = device, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync(self.device)
        self.times.append(time.perf_counter() - self._start)


def adv_method(net, steps):
    return AdversarialTraining(
        net,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
        threat={"norm": "linf", "eps": EPS, "step_size": STEP, "steps": steps},
        val_attack=None,
        num_classes=10,
    )


def lightning_steps(method, x, y, n_batches, device):
    """Per-step seconds of ``Trainer.fit(method)`` on ``n_batches`` copies of ``(x, y)``."""
    data = TensorDataset(
        x.cpu().repeat(n_batches, 1, 1, 1), y.cpu().repeat(n_batches), torch.arange(n_batches * len(y))
    )
    loader = DataLoader(data, batch_size=len(y), shuffle=False)
    timer = StepTimer(device)
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(method, loader)
    return timer.times[1:]  # the first step includes warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps (CPU smoke run)")
    parser.add_argument("--model", default="small_cnn", choices=["small_cnn", "preact_resnet18", "wrn34_10"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    rounds = args.rounds or (3 if args.quick else 5)
    per_round = 4 if args.quick else 10
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)

    plain_times, lightning_times = [], []
    for _ in range(rounds):
        net = make_net(args.model).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        plain_step(net, opt, x, y, args.pgd_steps)  # warm-up
        for _ in range(per_round):
            sync(device)
            start = time.perf_counter()
            plain_step(net, opt, x, y, args.pgd_steps)
            sync(device)
            plain_times.append(time.perf_counter() - start)
        method = adv_method(make_net(args.model).to(device), args.pgd_steps)
        lightning_times += lightning_steps(method, x, y, per_round + 1, device)

    plain, light = statistics.median(plain_times), statistics.median(lightning_times)
    print(f"hardware: {hardware()}")
    print(f"model {args.model}, batch {args.batch_size}, PGD-{args.pgd_steps} l_inf AT step")
    print(
        f"plain PyTorch loop : median {plain * 1000:8.1f} ms/step, min {min(plain_times) * 1000:8.1f}"
        f"  ({len(plain_times)} steps)"
    )
    print(
        f"safespot Lightning : median {light * 1000:8.1f} ms/step, min {min(lightning_times) * 1000:8.1f}"
        f"  ({len(lightning_times)} steps)"
    )
    print(
        f"ratio (safespot / plain): median {light / plain:.3f}, min {min(lightning_times) / min(plain_times):.3f}"
        "   target <= 1.05"
    )


if __name__ == "__main__":
    main()
