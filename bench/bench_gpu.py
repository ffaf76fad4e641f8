"""GPU throughput in one process and one table: WRN-34-10 and the small CNN, fp32 and bf16.

    python bench/bench_gpu.py                      # GPU size (make bench-gpu; a few minutes on an H200)
    python bench/bench_gpu.py --quick --device cpu # tiny dry run on the CPU

For each model and precision, on the same random CIFAR-size batch (32x32, 10 classes, freshly
initialised weights):

- PGD-K images/s: the framework's ``safespot.attacks.PGD`` (l_inf 8/255, step eps/4, random start
  seeded per image, eval mode), as in ``bench_pgd_cost.py``;
- training-step images/s: one PGD-10 adversarial-training step (attack in train mode, CE on the
  adversarial batch, SGD), the plain step of ``bench_adv_step.py``;
- robustifier images/s: the safe-spot search (``SafeSpotSearch``, l_inf delta = eps = 8/255, a
  reduced MAXITER and T so the table fits the time budget) with the fixed schedule and with
  ``early_exit``, one call on the whole batch each; model evaluations per image are counted as
  batch rows through a forward-pre-hook (``bench_robustifier.EvalCounter``).

bf16 runs every pass under ``torch.autocast(dtype=torch.bfloat16)`` (losses in float32), as
``trainer.precision=bf16-mixed`` (train.py, evaluate.py, robustify.py) does; fp32 keeps torch's
defaults (cuDNN may use TF32 for convolutions). cuDNN autotuning is on for CUDA, as with
``trainer=gpu``; every measurement is preceded by an untimed warm-up of the same shapes (the early-
exit search is run once untimed, so the shrinking batches it sees are tuned too). With untrained
weights the early-exit figures show the mechanism's cost, not the speed-up on a trained model
(``bench_robustifier.py --ckpt`` measures that). A measurement that fails (e.g. out of memory)
shows ``error`` in its cell and the error below the table.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from dataclasses import dataclass

import torch

from bench_adv_step import make_net, plain_step
from bench_robustifier import EvalCounter
from common import hardware, sync, time_call
from safespot.attacks import PGD
from safespot.defenses import SafeSpotSearch
from safespot.evaluation import image_seeds

EPS = 8 / 255
PGD_SALT, SEARCH_SALT = 7, 11
MODELS = {"wrn34_10": "WRN-34-10", "small_cnn": "small CNN (width 16)"}


@dataclass
class Sizes:
    batch: dict[str, int]
    pgd_steps: int
    at_steps: int
    max_iter: int
    inner_steps: int
    early_exit: int
    repeats: int


GPU_SIZES = Sizes({"wrn34_10": 128, "small_cnn": 256}, 20, 10, 20, 10, 5, 3)
QUICK_SIZES = Sizes({"wrn34_10": 2, "small_cnn": 16}, 2, 2, 2, 2, 1, 1)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    if torch.cuda.is_available():  # a CPU run on a GPU machine
        cpu = platform.processor() or platform.machine()
        return f"CPU {cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"
    return hardware()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def freeze(net: torch.nn.Module) -> torch.nn.Module:
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def measure_pgd(net, x, y, device, precision, sizes: Sizes) -> float:
    attack = PGD("linf", EPS, steps=sizes.pgd_steps, random_start=True, mode="eval")
    seeds = image_seeds(0, torch.arange(len(x), device=device), PGD_SALT)

    def run() -> None:
        with autocast(precision, device):
            attack(freeze(net), x, y, seeds=seeds)

    run()  # warm-up
    return len(x) / time_call(run, device, sizes.repeats)


def measure_robustifier(net, x, device, precision, sizes: Sizes, early_exit: int | None) -> tuple[float, float]:
    """(images/s, model evaluations per image) of one search call on the whole batch."""
    settings = dict(norm="linf", delta=EPS, eps=EPS, max_iter=sizes.max_iter, inner_steps=sizes.inner_steps)
    search = SafeSpotSearch(**settings, early_exit=early_exit)
    seeds = image_seeds(0, torch.arange(len(x), device=device), SEARCH_SALT)
    net = freeze(net)
    with autocast(precision, device):
        if early_exit is None:  # the fixed schedule keeps the batch's shape: one short call tunes it
            SafeSpotSearch(**{**settings, "max_iter": 1, "inner_steps": 1})(net, x, seeds=seeds)
        else:  # the active set shrinks as images exit: the same call, untimed, meets every shape once
            search(net, x, seeds=seeds)
        counter = EvalCounter(net)
        try:
            sync(device)
            start = time.perf_counter()
            search(net, x, seeds=seeds)
            sync(device)
            seconds = time.perf_counter() - start
        finally:
            counter.handle.remove()
    return len(x) / seconds, counter.rows / len(x)


def measure_training(net, x, y, device, precision, sizes: Sizes) -> float:
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def run() -> None:
        with autocast(precision, device):
            plain_step(net, opt, x, y, sizes.at_steps)

    run()  # warm-up
    return len(x) / time_call(run, device, sizes.repeats)


def fmt(value: float | None) -> str:
    if value is None:
        return "error"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def row(model: str, precision: str, device: torch.device, sizes: Sizes, errors: list[str], started: float) -> dict:
    """The table's cells for one model and precision (``None`` where a measurement failed)."""
    batch = sizes.batch[model]
    torch.manual_seed(0)
    net = make_net(model).to(device)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    measurements = {
        "pgd": lambda: measure_pgd(net, x, y, device, precision, sizes),
        "fixed": lambda: measure_robustifier(net, x, device, precision, sizes, None),
        "early": lambda: measure_robustifier(net, x, device, precision, sizes, sizes.early_exit),
        "train": lambda: measure_training(net, x, y, device, precision, sizes),  # last: it changes the weights
    }
    cells: dict[str, float | None] = {}
    for name, fn in measurements.items():
        start = time.perf_counter()
        try:
            value = fn()
        except (RuntimeError, ValueError) as err:  # e.g. out of memory: report it, go on
            errors.append(f"{MODELS[model]} {precision} {name}: {str(err).splitlines()[0] if str(err) else err!r}")
            value = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if isinstance(value, tuple):
            cells[name], cells[f"{name}_evals"] = value
        else:
            cells[name] = value
        log(
            f"{MODELS[model]} {precision} {name}: {fmt(cells[name])} img/s "
            f"({time.perf_counter() - start:.1f} s; {time.perf_counter() - started:.0f} s in all)"
        )
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU dry run)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch-wrn", type=int, default=None, help="WRN-34-10 batch (default 128; --quick 2)")
    parser.add_argument("--batch-small", type=int, default=None, help="small CNN batch (default 256; --quick 16)")
    parser.add_argument("--pgd-steps", type=int, default=None, help="K of PGD-K (default 20)")
    parser.add_argument("--at-steps", type=int, default=None, help="PGD steps of the training step (default 10)")
    parser.add_argument("--max-iter", type=int, default=None, help="robustifier MAXITER (default 20)")
    parser.add_argument("--inner-steps", type=int, default=None, help="robustifier T (default 10)")
    parser.add_argument("--early-exit", type=int, default=None, help="early_exit k (default 5)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per figure, median (default 3)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device} but CUDA is not available (use --device cpu)")
    base = QUICK_SIZES if args.quick else GPU_SIZES
    sizes = Sizes(
        batch={
            "wrn34_10": args.batch_wrn or base.batch["wrn34_10"],
            "small_cnn": args.batch_small or base.batch["small_cnn"],
        },
        pgd_steps=args.pgd_steps or base.pgd_steps,
        at_steps=args.at_steps or base.at_steps,
        max_iter=args.max_iter or base.max_iter,
        inner_steps=args.inner_steps or base.inner_steps,
        early_exit=args.early_exit or base.early_exit,
        repeats=args.repeats or base.repeats,
    )
    if min(*sizes.batch.values(), sizes.pgd_steps, sizes.at_steps, sizes.max_iter, sizes.inner_steps) < 1:
        parser.error("sizes must be >= 1")
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True

    started = time.perf_counter()
    fixed_evals = 1 + (sizes.max_iter + 1) * (sizes.inner_steps + 1)
    rows, errors = [], []
    for model in args.models:
        for precision in args.precisions:
            rows.append((model, precision, sizes.batch[model], row(model, precision, device, sizes, errors, started)))
            if device.type == "cuda":
                torch.cuda.empty_cache()

    total = time.perf_counter() - started
    print(f"hardware: {describe(device)}; device {device}")
    print(
        f"settings: random 32x32 images, untrained weights; l_inf eps = delta = 8/255; PGD-{sizes.pgd_steps} "
        f"(eval mode); training step = PGD-{sizes.at_steps} AT + SGD; robustifier MAXITER {sizes.max_iter}, "
        f"T {sizes.inner_steps} (fixed schedule {fixed_evals} evaluations/image), early_exit={sizes.early_exit}; "
        f"median of {sizes.repeats}; cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}"
        + ("; --quick" if args.quick else "")
    )
    print()
    print(
        f"| model | precision | batch | PGD-{sizes.pgd_steps} img/s | PGD-{sizes.at_steps} AT step img/s "
        f"| robustifier fixed img/s | robustifier early exit img/s | early-exit speed-up "
        f"| evals/img fixed / early |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model, precision, batch, c in rows:
        speedup = f"{c['early'] / c['fixed']:.2f}x" if c.get("early") and c.get("fixed") else "–"
        evals = f"{fmt(c.get('fixed_evals'))} / {fmt(c.get('early_evals'))}"
        print(
            f"| {MODELS[model]} | {precision} | {batch} | {fmt(c['pgd'])} | {fmt(c['train'])} | {fmt(c['fixed'])} "
            f"| {fmt(c['early'])} | {speedup} | {evals} |"
        )
    print()
    for error in errors:
        print(f"error: {error}")
    print(f"total wall time {total:.0f} s")


if __name__ == "__main__":
    main()
