"""The one prepared GPU check: every device path of the framework and a full-scale mini-reproduction
in one command and one report, sized for eight minutes on one H100.

    make gpu-check                                                    # on a GPU machine (DATA_DIR: CIFAR-10)
    SAFESPOT_TEST_DEVICE=cpu make gpu-check GPU_CHECK_SCALE=tiny      # a CPU dry run (CI)

Steps, each timed, its output kept in the report's directory:

1. ``make test-gpu``: every entry point end to end on the device (tests/gpu, marker ``cuda``).
2. ``make bench-gpu``: the throughput table (``bench/bench_gpu.py --quick``; its full size takes
   longer than this check may).
3. A mini-reproduction at full scale: PreActResNet-18 fast adversarial training (FGSM-RS, l_inf 8/255,
   one-cycle) on all 50,000 CIFAR-10 training images for the epochs that fit (``--epochs``, bf16,
   data in device memory), then on 1,000 seeded test images clean, PGD-20 and AutoAttack accuracy,
   and the same attacks grey-box on the images robustified by the early-exit safe-spot search
   (paper 002, Algorithm 1; ``robustifier=sfull_fast``); images/s of every step.

The report (``report.md``) says for each step whether it passed, its wall time and throughput, and
the accuracies; ``--out`` names its directory (default ``$LOG_DIR/gpu_check/<time>``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the scales of the check: full on a GPU (8 minutes on one H100), tiny for a CPU dry run
SCALES = {
    "full": {
        "train": ["data=cifar10", "model=preact_resnet18", "method=fast_adversarial", "scheduler=one_cycle",
                  "scheduler.max_lr=0.2", "data.in_memory=true", "data.batch_size=512", "data.val_size=1000",
                  "data.val_subset=500", "trainer.precision=bf16-mixed", "trainer.benchmark=true",
                  "method.val_attack.steps=5"],
        "test_images": 1000,
        "epochs": 8,
        "tests": ["-m", "cuda", "tests/gpu"],
        "bench": ["--quick"],
        "autoattack": [],
    },
    "tiny": {
        "train": ["data=synthetic", "model.backbone.width=8", "method=fast_adversarial", "scheduler=one_cycle",
                  "data.n_train=256", "data.val_size=32", "data.batch_size=64"],
        "test_images": 16,
        "epochs": 1,
        "tests": ["-m", "cuda", "tests/gpu", "-k", "train"],
        "bench": ["--quick", "--models", "small_cnn", "--precisions", "fp32", "--repeats", "1"],
        "autoattack": ["evaluation.autoattack.attack.n_iter=2", "evaluation.autoattack.attack.square_queries=10"],
    },
}  # fmt: skip


@dataclass
class Step:
    name: str
    command: list[str]
    seconds: float = 0.0
    ok: bool = False
    images: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> str:
        return f"{self.images / self.seconds:,.1f}" if self.ok and self.images and self.seconds else "–"


def run(step: Step, out: Path, env: dict[str, str], timeout: float) -> Step:
    """Run ``step`` in the checkout, its output into ``out/<name>.log``; never raises."""
    print(f"[gpu-check] {step.name}: {shlex.join(step.command)}", flush=True)
    start = time.perf_counter()
    log = out / f"{step.name}.log"
    try:
        with log.open("w") as file:
            done = subprocess.run(step.command, cwd=ROOT, env=env, stdout=file, stderr=subprocess.STDOUT,
                                  timeout=timeout)  # fmt: skip
        step.ok = done.returncode == 0
        if not step.ok:
            step.notes.append(f"exit status {done.returncode}")
    except subprocess.TimeoutExpired:
        step.notes.append(f"stopped after {timeout:.0f} s")
    step.seconds = time.perf_counter() - start
    print(f"[gpu-check] {step.name}: {'ok' if step.ok else 'FAILED'} in {step.seconds:.0f} s", flush=True)
    return step


def tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


def accuracies(results_file: Path) -> dict[str, float]:
    if not results_file.is_file():
        return {}
    results = json.loads(results_file.read_text())
    return {k: v for k, v in results.items() if k.endswith("/acc") and isinstance(v, float)}


def device_description(device: str) -> str:
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"
    return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default=os.environ.get("GPU_CHECK_SCALE", "full"))
    parser.add_argument("--device", default=os.environ.get("SAFESPOT_TEST_DEVICE", "cuda"), help="cuda or cpu")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the scale's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    scale = SCALES[args.scale]
    epochs = args.epochs or scale["epochs"]
    stamp = f"{datetime.now():%Y-%m-%d_%H-%M-%S}"
    out = args.out or Path(os.environ.get("LOG_DIR", ROOT / "logs")) / "gpu_check" / stamp
    out.mkdir(parents=True, exist_ok=False)
    env = {**os.environ, "LOG_DIR": str(out / "logs"), "SAFESPOT_TEST_DEVICE": args.device}
    trainer = ["trainer=cpu"] if args.device == "cpu" else ["trainer=gpu"]
    py, quiet = sys.executable, ["extras.print_config=false"]
    steps = [
        run(Step("test_gpu", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *scale["tests"]]), out, env, 240),
        run(Step("bench_gpu", [py, "bench/bench_gpu.py", *scale["bench"], "--device", args.device]), out, env, 150),
    ]
    run_dir = out / "train"
    train = [py, "train.py", *scale["train"], *trainer, f"trainer.max_epochs={epochs}", "logger=csv", "test=false"]
    if args.device == "cpu":
        train = [a for a in train if a not in ("trainer.precision=bf16-mixed", "trainer.benchmark=true")]
    training = run(Step("train", [*train, *quiet, f"hydra.run.dir={run_dir}"]), out, env, 300)
    steps.append(training)
    ckpt = next(iter(sorted((run_dir / "checkpoints").glob("best-*.ckpt"))), None)
    evaluations = {}
    if ckpt is not None:
        splits = json.loads((run_dir / "splits.json").read_text()) if (run_dir / "splits.json").is_file() else {}
        training.images = len(splits.get("train", [])) * epochs
        n = scale["test_images"]
        common = [py, "evaluate.py", f"ckpt_path={ckpt}", *trainer, f"data.test_subset={n}", *quiet]
        after = "evaluation.preempt_sfull_fast.attacks.autoattack"  # AutoAttack on the robustified images
        grid = {
            "eval_pgd": ["evaluation=[clean,pgd]"],
            "eval_autoattack": ["evaluation=[autoattack]", *scale["autoattack"]],
            "robustify_attack": ["evaluation=[preempt_sfull_fast]", f"+attack@{after}=autoattack",
                                 *[o.replace("evaluation.autoattack.attack", after) for o in scale["autoattack"]]],
        }  # fmt: skip
        for name, overrides in grid.items():
            step = run(Step(name, [*common, *overrides, f"hydra.run.dir={out / name}"]), out, env, 240)
            step.images = n
            steps.append(step)
            evaluations[name] = accuracies(out / name / "results.json")
    else:
        training.notes.append("no checkpoint: the evaluations did not run")
    report = render(args, out, epochs, steps, evaluations)
    (out / "report.md").write_text(report)
    print(report)
    print(f"[gpu-check] report: {out / 'report.md'}")
    return 0 if all(s.ok for s in steps) and len(steps) == 6 else 1


def render(args: argparse.Namespace, out: Path, epochs: int, steps: list[Step], evaluations: dict[str, dict]) -> str:
    lines = [
        f"# GPU check ({args.scale} scale, {args.device})",
        "",
        f"{datetime.now():%Y-%m-%d %H:%M}, {device_description(args.device)}; "
        f"mini-reproduction: {epochs} epochs of fast adversarial training.",
        "",
        "| Step | Result | Wall time (s) | Images/s |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {s.name} | {'ok' if s.ok else 'FAILED: ' + '; '.join(s.notes)} | {s.seconds:.0f} | {s.rate} |"
              for s in steps]  # fmt: skip
    names = {
        "clean/acc": "clean",
        "pgd/acc": "PGD-20",
        "autoattack/acc": "AutoAttack",
        "preempt_sfull_fast_pgd/acc": "grey-box PGD-20 after S-Full",
        "preempt_sfull_fast_autoattack/acc": "grey-box AutoAttack after S-Full",
    }
    found = {label: 100 * acc for results in evaluations.values() for key, acc in results.items()
             for k, label in names.items() if key == k}  # fmt: skip
    if found:
        lines += ["", "| Accuracy (%) | " + " | ".join(found) + " |", "|---|" + "---:|" * len(found)]
        lines += ["| mini-reproduction | " + " | ".join(f"{v:.1f}" for v in found.values()) + " |"]
    failed = [s for s in steps if not s.ok]
    for step in failed:
        lines += ["", f"## {step.name} (failed)", "", "```", shlex.join(step.command), "```", "", "```"]
        lines += [tail(out / f"{step.name}.log"), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
