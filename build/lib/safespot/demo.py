"""The demo: train, evaluate and robustify in one go, and show the papers' headline.

``make demo`` (= ``python -m safespot.demo``, installed as ``safespot-demo``):

1. trains ``experiment=demo``: fast adversarial training (FGSM-RS, Wong et al., 2020; l_inf
   8/255) of the small CNN on 20,000 CIFAR-10 images held in memory;
2. evaluates the best checkpoint on a seeded subset of the test set (``--images``, 200) with
   ``evaluation=[clean,pgd,preempt_sfull_fast]``: clean accuracy, PGD-20 on the originals, and
   the grey-box protocol of paper 002 (Table 1): each image robustified by S-Full (Algorithm 1,
   delta = eps, with early exit), then PGD-20 inside ``B_eps(x_r)``;
3. prints the table in the papers' layout, every accuracy with its 95% interval, the paired
   comparison of the robustified images against their originals under PGD-20 (same images,
   McNemar), and where the run, checkpoint, records and figure are.

Everything goes into a new directory ``$LOG_DIR/demo/runs/<time>_<id>/`` (``train/`` and
``evaluate/``). Arguments after the options are Hydra overrides of the training run
(``python -m safespot.demo trainer.max_epochs=2``); ``--eval KEY=VALUE`` overrides the evaluation.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from safespot.evaluate import evaluate
from safespot.paths import fresh_directory
from safespot.report import format_eps
from safespot.stats import accuracy, paired_difference, verdict
from safespot.train import train
from safespot.utils.compose import compose_config
from safespot.utils.resolvers import unique_suffix
from safespot.utils.tables import markdown_table
from safespot.utils.task import report_config_errors

EVALUATIONS = "[clean,pgd,preempt_sfull_fast]"
ROBUSTIFIED = "preempt_sfull_fast"


@dataclass
class DemoRun:
    """Where a demo wrote its outputs, and its measured figures."""

    directory: Path
    checkpoint: Path
    evaluation: Path
    table: pd.DataFrame
    comparison: str
    seconds: dict[str, float]

    @property
    def figure(self) -> Path:
        return self.evaluation / "images" / f"{ROBUSTIFIED}.png"


def new_directory(log_dir: str | Path) -> Path:
    """A fresh ``<log_dir>/demo/runs/<time>_<id>`` (never an existing one)."""
    root = Path(log_dir) / "demo" / "runs"
    # two demos of one process may start within one second: the later ones are numbered
    return fresh_directory(root, f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{unique_suffix()}")


def headline(records: pd.DataFrame, results: dict[str, Any]) -> tuple[pd.DataFrame, str]:
    """The papers' layout (paper 002, Table 1; paper 000, Table 1) from an evaluation's records:
    clean, PGD-20 on the originals, grey-box PGD-20 on the robustified images, safe-spot rate;
    and the paired comparison of the last two (same images)."""
    original = records["pgd/correct"].astype(bool).to_numpy()
    robustified = records[f"{ROBUSTIFIED}_pgd/correct"].astype(bool).to_numpy()
    clean_ok = records["clean/correct"].astype(bool).to_numpy()
    safe = robustified & records[f"{ROBUSTIFIED}/correct"].astype(bool).to_numpy()
    table = pd.DataFrame(
        [
            {
                "Model": str(results.get("model", "")),
                "Norm": str(results.get("norm", "")),
                "ε": format_eps(results.get("eps")),
                "Images": len(records),
                "Clean": accuracy(clean_ok).percent(),
                "PGD-20 (originals)": accuracy(original).percent(),
                "Grey-box PGD-20 (S-Full)": accuracy(robustified).percent(),
                "Safe-spot rate": accuracy(safe[clean_ok]).percent(),
            }
        ]
    )
    difference = paired_difference(robustified, original)
    comparison = (
        f"robustified minus original accuracy under PGD-20 (same {difference.n} images): "
        f"{difference.percent()}; 'robustification raises robust accuracy': {verdict(difference)}"
    )
    return table, comparison


def run_demo(
    train_overrides: list[str] | None = None,
    eval_overrides: list[str] | None = None,
    images: int = 200,
    log_dir: str | Path | None = None,
) -> DemoRun:
    """Train, evaluate and summarise (see the module docstring); returns where everything is."""
    directory = new_directory(log_dir or os.environ.get("LOG_DIR", "./logs")).resolve()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    train_cfg = compose_config("train", ["experiment=demo", *(train_overrides or [])], directory / "train")
    _, objects = train(train_cfg)
    seconds["train"] = time.perf_counter() - start
    checkpoint = Path(objects["best_path"] or Path(train_cfg.paths.output_dir) / "checkpoints" / "last.ckpt")

    start = time.perf_counter()
    eval_dir = directory / "evaluate"
    eval_cfg = compose_config(
        "evaluate",
        [f"ckpt_path={checkpoint}", f"evaluation={EVALUATIONS}", f"data.test_subset={images}", *(eval_overrides or [])],
        eval_dir,
    )
    results = evaluate(eval_cfg)
    seconds["evaluate"] = time.perf_counter() - start
    results = {**results, **{k: results.get("meta", {}).get(k) for k in ("model", "norm", "eps")}}
    records = pd.read_csv(eval_dir / "records.csv")
    table, comparison = headline(records, results)
    return DemoRun(directory, checkpoint, eval_dir, table, comparison, seconds)


def report(run: DemoRun) -> str:
    total = sum(run.seconds.values())
    lines = [
        "",
        "Preemptive robustification, grey-box (accuracy in %, 95% Wilson intervals):",
        "",
        markdown_table(run.table),
        run.comparison,
        "",
        f"time: train {run.seconds['train']:.0f} s, evaluate + robustify {run.seconds['evaluate']:.0f} s, "
        f"total {total / 60:.1f} min",
        f"run:        {run.directory}",
        f"checkpoint: {run.checkpoint}",
        f"records:    {run.evaluation / 'records.csv'} (one row per image), {run.evaluation / 'results.json'}",
        f"figure:     {run.figure} (originals, robustified images, amplified difference)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="safespot-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="test images to evaluate (default 200)")
    parser.add_argument("--eval", action="append", default=[], metavar="KEY=VALUE", help="evaluation override")
    parser.add_argument("--log-dir", default=None, help="default: $LOG_DIR or ./logs")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the training run")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images must be >= 1, got {args.images}")
    run = run_demo(args.overrides, args.eval, args.images, args.log_dir)
    print(report(run))
    return 0


if __name__ == "__main__":
    raise SystemExit(report_config_errors(main)())
