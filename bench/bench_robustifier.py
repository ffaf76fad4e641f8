"""Safe-spot search (paper 002, Algorithm 1): the fixed schedule versus early exit, side by side,
and the peak memory of the outer gradient versus the number of inner steps T.

    python bench/bench_robustifier.py [--quick] [--ckpt PATH] [--images 32] [--max-iter 100]
                                      [--inner-steps 20] [--early-exit 5] [--batch-size 16]

The default size keeps Algorithm 1's schedule (MAXITER 100, T 20) on 32 images, in two
interleaved chunks of 16: the fixed schedule alone takes 5-10 minutes on a 2-core CPU
(128 images would take 25-40). ``--quick``: 32 images, MAXITER 20, T 5 (about 1-2 minutes).

The fixed schedule runs MAXITER + 1 outer gradients of T + 1 model evaluations each (plus one
forward for the protected labels) on every image; ``early_exit=k`` lets an image leave once the
inner attack has failed on it for k consecutive iterations, and a finished image leaves the
batch at once (active-set compaction), so no evaluation is spent on it. Both run with the same
per-image seeds on the same images, chunk by chunk, the order of the two alternating between
chunks.

Model: ``--ckpt``, else the newest quickstart run's ``logs/train/runs/*/checkpoints/best-*.ckpt`` with
CIFAR-10 test images from ``--data-root``, else a freshly initialised small CNN on random
images (the output says which). Model evaluations are counted exactly, as batch rows seen by a
forward-pre-hook. Success measure (the safe-spot rate): the share of images whose x_r is still
classified as the protected label c(x_o) after an independent grey-box PGD-20 (l_inf eps,
step eps/4, random start, seeds different from the search's).

Memory: each (norm, order, T) runs two outer iterations on a tiny batch in a fresh process
(forked from a server with torch imported); the figure is the growth of the peak resident set
(``ru_maxrss``) over a warm-up run with T = 1 (on CUDA: ``torch.cuda.max_memory_allocated``
above the allocation before the run).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import hardware, sync
from safespot.attacks import PGD
from safespot.defenses import SafeSpotSearch
from safespot.models import SmallCNN, build_classifier

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]
SEARCH_SALT, GREYBOX_SALT = 11, 424_242


def make_net() -> torch.nn.Module:
    return build_classifier(SmallCNN(10, width=16), MEAN, STD, 10)


def git_state() -> str:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    dirty = git("status", "--porcelain", "--", "src")
    return f"{git('rev-parse', '--short', 'HEAD') or 'unknown'}{' + uncommitted changes in src/' if dirty else ''}"


def load_setup(args: argparse.Namespace, device: torch.device):
    """(model, images, labels, dataset indices, description)."""
    ckpt = Path(args.ckpt) if args.ckpt else None
    if ckpt is None:
        found = sorted(ROOT.glob("logs/train/runs/*/checkpoints/best-*.ckpt"), key=lambda p: p.stat().st_mtime)
        found = [p for p in found if "quickstart" in (p.parents[1] / ".hydra" / "config.yaml").read_text()]
        ckpt = found[-1] if found else None
    if ckpt is not None:
        from omegaconf import OmegaConf

        from safespot.data import CIFAR10DataModule
        from safespot.runs import describe_model, load_model
        from safespot.utils.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(ckpt)
        run_cfg = OmegaConf.create(checkpoint["safespot_config"])
        try:
            data = CIFAR10DataModule(
                root=args.data_root, test_subset=args.images, eval_batch_size=args.images, num_workers=0
            )
            data.setup()
            x, y, index = next(iter(data.test_dataloader()))
        except Exception as err:  # no data: keep the trained model, use random images
            print(f"NOTE: CIFAR-10 not readable under {args.data_root} ({err}); using random images")
            g = torch.Generator().manual_seed(0)
            x, y = torch.rand(args.images, 3, 32, 32, generator=g), torch.randint(0, 10, (args.images,), generator=g)
            index = torch.arange(args.images)
        net = load_model(checkpoint, run_cfg, 10)
        where = ckpt.relative_to(ROOT) if ckpt.is_relative_to(ROOT) else ckpt
        what = f"{describe_model(run_cfg)} from {where}, {len(x)} CIFAR-10 test images"
    else:
        print("NOTE: no checkpoint found; using a freshly initialised small CNN and random images")
        torch.manual_seed(0)
        net = make_net().eval()
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(args.images, 3, 32, 32, generator=g), torch.randint(0, 10, (args.images,), generator=g)
        index = torch.arange(args.images)
        what = f"untrained SmallCNN(width=16), {args.images} random images"
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(device).eval(), x.to(device), y.to(device), index, what


class EvalCounter:
    """Counts model evaluations: batch rows entering the model's forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.rows = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: tuple) -> None:
        self.rows += inputs[0].shape[0]


@dataclass
class Side:
    name: str
    search: SafeSpotSearch
    seconds: list[float] = field(default_factory=list)
    images: list[int] = field(default_factory=list)
    rows: int = 0
    record_rows: int = 0  # the evaluations implied by the per-image iteration records
    exited: int = 0
    chunk_rows: list[int] = field(default_factory=list)
    whole_exits: int = 0  # chunks in which every image exited early
    iterations: list[torch.Tensor] = field(default_factory=list)
    safe: list[torch.Tensor] = field(default_factory=list)  # survives grey-box PGD-20 (protected label)
    safe_gt: list[torch.Tensor] = field(default_factory=list)  # x_r correct and survives (ground truth)

    @property
    def n(self) -> int:
        return sum(self.images)

    def rate(self) -> float:
        return float(torch.cat(self.safe).float().mean())


def greybox_survives(model, x_r, labels, seeds, eps) -> torch.Tensor:
    """x_r is classified as ``labels`` and an independent PGD-20 (step eps/4) does not change it."""
    x_a = PGD("linf", eps, steps=20, step_size=eps / 4, random_start=True, mode="eval")(model, x_r, labels, seeds=seeds)
    with torch.no_grad():
        return (model(x_r).argmax(1) == labels) & (model(x_a).argmax(1) == labels)


def compare(args: argparse.Namespace, device: torch.device) -> None:
    from safespot.utils.rng import image_seeds

    model, x, y, index, what = load_setup(args, device)
    eps = 8 / 255
    common = dict(norm="linf", delta=eps, eps=eps, max_iter=args.max_iter, inner_steps=args.inner_steps)
    sides = [
        Side("fixed schedule", SafeSpotSearch(**common)),
        Side(f"early_exit={args.early_exit}", SafeSpotSearch(**common, early_exit=args.early_exit)),
    ]
    per_image_fixed = 1 + (args.max_iter + 1) * (args.inner_steps + 1)
    print(f"model: {what}; code at {git_state()}")
    print(
        f"search: l_inf delta = eps = 8/255, MAXITER {args.max_iter}, T {args.inner_steps}, N 1, "
        f"batch {args.batch_size}; fixed schedule = 1 + {args.max_iter + 1} x {args.inner_steps + 1} "
        f"= {per_image_fixed} evaluations per image"
    )
    with torch.no_grad():
        pred = model(x).argmax(1)
    clean_ok = pred == y
    baseline = greybox_survives(model, x, pred, image_seeds(args.seed, index, GREYBOX_SALT), eps)  # x_r = x_o
    counter = EvalCounter(model)
    SafeSpotSearch(**{**common, "max_iter": 1, "inner_steps": 1})(model, x[:2])  # warm-up
    chunks = range(0, len(x), args.batch_size)
    start_all = time.perf_counter()
    for c, lo in enumerate(chunks):
        xb, yb, ib = x[lo : lo + args.batch_size], y[lo : lo + args.batch_size], index[lo : lo + args.batch_size]
        seeds = image_seeds(args.seed, ib, SEARCH_SALT)
        for side in sides if c % 2 == 0 else sides[::-1]:
            counter.rows = 0
            sync(device)
            start = time.perf_counter()
            result = side.search(model, xb, seeds=seeds)
            sync(device)
            side.seconds.append(time.perf_counter() - start)
            side.images.append(len(xb))
            side.rows += counter.rows
            side.chunk_rows.append(counter.rows)
            side.whole_exits += bool(result.early_exit.all())
            side.record_rows += len(xb) + int((result.iterations + 1).sum()) * (args.inner_steps + 1)
            side.exited += int(result.early_exit.sum())
            side.iterations.append(result.iterations.cpu())
            grey_seeds = image_seeds(args.seed, ib, GREYBOX_SALT)
            survives = greybox_survives(model, result.x_r, result.protected, grey_seeds, eps)
            side.safe.append(survives.cpu())
            side.safe_gt.append((survives & (result.protected == yb)).cpu())
        print(
            f"  chunk {c + 1}/{len(chunks)}: "
            + ", ".join(
                f"{s.name} {s.images[-1] / s.seconds[-1]:.3f} img/s ({s.chunk_rows[-1] / s.images[-1]:.0f} evals/img)"
                for s in sides
            )
            + f"  ({time.perf_counter() - start_all:.0f} s so far)",
            flush=True,
        )
    counter.handle.remove()

    n_ok = int(clean_ok.sum())
    print(
        f"\nclean accuracy of the model on these images: {n_ok}/{len(x)}; safe-spot rate without robustification "
        f"(x_r = x_o): {float(baseline.float().mean()):.4f}"
    )
    header = (
        f"{'setting':<16} {'img/s (all)':>11} {'img/s (median chunk)':>20} {'evals/img':>10} "
        f"{'evals/img from records':>22} {'exited early':>12} {'mean iters':>10} {'safe-spot rate':>15} "
        f"{'(correct originals)':>19}"
    )
    print(header)
    for s in sides:
        iters = torch.cat(s.iterations).float()
        gt = torch.cat(s.safe_gt)[clean_ok.cpu()]
        chunk_rate = statistics.median(i / t for i, t in zip(s.images, s.seconds, strict=True))
        print(
            f"{s.name:<16} {s.n / sum(s.seconds):>11.3f} "
            f"{chunk_rate:>20.3f} {s.rows / s.n:>10.1f} "
            f"{s.record_rows / s.n:>22.1f} {s.exited / s.n:>12.3f} {iters.mean():>10.1f} "
            f"{s.rate():>15.4f} {float(gt.float().mean()) if n_ok else float('nan'):>19.4f}"
        )
    fixed, early = sides
    speedup_all = (early.n / sum(early.seconds)) / (fixed.n / sum(fixed.seconds))
    speedup_med = statistics.median(f / e for f, e in zip(fixed.seconds, early.seconds, strict=True))
    eval_ratio = fixed.rows / early.rows
    safe_f, safe_e = torch.cat(fixed.safe), torch.cat(early.safe)
    only_f, only_e = int((safe_f & ~safe_e).sum()), int((safe_e & ~safe_f).sum())
    print(
        f"\nspeed-up (early / fixed images/s): {speedup_all:.2f}x overall, {speedup_med:.2f}x median over "
        f"{len(fixed.seconds)} chunks"
    )
    print(f"evaluation ratio (fixed / early, counted): {eval_ratio:.2f}x")
    if early.rows != early.record_rows:
        print(f"  warning: counted {early.rows} evaluations, the iteration records imply {early.record_rows}")
    verdict = "equal or better" if early.rate() >= fixed.rate() else "worse"
    print(
        f"safe-spot rate: fixed {fixed.rate():.4f}, early exit {early.rate():.4f} -> {verdict} "
        f"(safe only under fixed: {only_f} images, only under early exit: {only_e})"
    )
    met = speedup_all >= 3 and early.rate() >= fixed.rate()
    print(f"target >= 3x images/s at equal or better safe-spot rate: {'MET' if met else 'NOT MET'}")
    iters = torch.cat(early.iterations).float()
    print(
        f"early exit: {early.exited}/{early.n} images exited; outer iterations per image: median "
        f"{iters.median():.0f}, 90th percentile {iters.quantile(0.9):.0f}, max {iters.max():.0f} (of {args.max_iter}); "
        f"chunks in which every image exited: {early.whole_exits}/{len(early.seconds)}"
    )


# --- memory versus T ----------------------------------------------------------------------


def _memory_child(norm: str, second_order: bool, steps: int, batch: int, queue) -> None:
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = make_net().to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.rand(batch, 3, 32, 32, device=device)
    delta = 8 / 255 if norm == "linf" else 0.5
    settings = dict(norm=norm, delta=delta, max_iter=1, second_order=second_order)
    SafeSpotSearch(**settings, inner_steps=1)(net, x)  # warm-up: libraries, allocator, same code path
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    SafeSpotSearch(**settings, inner_steps=steps)(net, x)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # KiB -> MiB
    cuda = (torch.cuda.max_memory_allocated() - before) / 2**20 if device.type == "cuda" else None
    queue.put((grown, cuda))


def memory(batch: int, steps_list: list[int]) -> None:
    # fresh process per run; the fork server imports torch and safespot once, so runs skip the imports
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "safespot.defenses", "safespot.models", "common"])
    else:
        ctx = mp.get_context("spawn")
    rows = [("linf", False), ("l2", False), ("l2", True)]
    cuda = torch.cuda.is_available()
    unit = "CUDA peak allocated above baseline" if cuda else "ru_maxrss growth over a T=1 warm-up"
    print(f"\npeak memory versus T (MiB, {unit}; batch {batch}, SmallCNN width 16, 2 outer iterations, fresh process)")
    print(f"{'outer gradient':<24}" + "".join(f"{'T=' + str(t):>10}" for t in steps_list))
    for norm, second in rows:
        values = []
        for steps in steps_list:
            queue = ctx.Queue()
            proc = ctx.Process(target=_memory_child, args=(norm, second, steps, batch, queue))
            proc.start()
            grown, on_cuda = queue.get()
            proc.join()
            values.append(on_cuda if cuda else grown)
        label = f"{norm} {'second-order' if second else 'first-order'}"
        print(f"{label:<24}" + "".join(f"{v:>10.1f}" for v in values), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32 images, MAXITER 20, T 5 (about 1-2 min on CPU)")
    parser.add_argument("--ckpt", default=None, help="checkpoint written by train.py")
    parser.add_argument("--data-root", default="/work/shared/data")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--max-iter", type=int, default=None, help="MAXITER; default 100 (--quick: 20)")
    parser.add_argument("--inner-steps", type=int, default=None, help="T; default 20 (--quick: 5)")
    parser.add_argument("--early-exit", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16, help="images per search call (chunk)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-batch", type=int, default=8)
    parser.add_argument("--memory-steps", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true")
    args = parser.parse_args()
    args.max_iter = args.max_iter or (20 if args.quick else 100)
    args.inner_steps = args.inner_steps or (5 if args.quick else 20)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"hardware: {hardware()}", flush=True)
    start = time.perf_counter()
    if not args.memory_only:
        compare(args, device)
    if not args.skip_memory:
        memory(args.memory_batch, args.memory_steps)
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
