"""The models of a reproduction as their training logs record them (section ``training_runs``):
how long each trained, the checkpoint its evaluation ran on, and the accuracies ``train.py`` logged,
so that a report says what it evaluated (e.g. whether a baseline was trained as long as the method
it is compared with) from the kept ``metrics.csv`` of each run, never from a typed number."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from safespot.reproduce.evidence import Evidence, find_checkpoint, piece_dirs
from safespot.reproduce.sections import MISSING, section
from safespot.reproduce.spec import SpecError
from safespot.reproduce.tables.ood import checkpoint_epoch, last_epoch, metric_at
from safespot.stats import accuracy
from safespot.utils.tables import markdown_table

#: the post-training test's images when a run's command names no ``data.test_subset``
FULL_TEST_SPLIT = 10_000


def test_images(overrides: list[str] | None, default: int | None) -> int | None:
    """The number of test images ``train.py``'s test after fitting ran on, from the run's command
    line (``data.test_subset=N``), else ``default`` (the test split of the spec's scale)."""
    for override in reversed(overrides or []):
        if override.startswith(("data.test_subset=", "+data.test_subset=")):
            value = override.split("=", 1)[1]
            return None if value in ("null", "None") else int(value)
    return default


def _rate(value: float, n: int | None) -> str:
    """``value`` (a fraction) as % with the Wilson interval of ``round(value * n)`` of ``n``."""
    if value != value:  # NaN: not logged
        return MISSING
    if not n:
        return f"{100 * value:.1f}"
    k = round(value * n)
    acc = accuracy([True] * k + [False] * (n - k))
    return f"{100 * acc.value:.1f} [{100 * acc.low:.1f}, {100 * acc.high:.1f}]"


def evaluated_checkpoint(evidence: Evidence, key: str) -> str:
    """The checkpoint evaluation ``key`` ran on, as its ``results.json`` records it; before it has
    run, the one it will run on (the spec's ``checkpoint`` of its run, as the records keep it)."""
    if not evidence.has(key):
        evaluation = evidence.spec.evaluations[key]
        return str(find_checkpoint(evidence.train_dir(str(evaluation.run)), evaluation.checkpoint))
    folder = piece_dirs(evidence.eval_dir(key))[0]
    meta = json.loads((folder / "results.json").read_text()).get("meta", {})
    if not meta.get("ckpt_path"):
        raise SpecError(f"{evidence.spec.name}: evaluation {key!r} records no checkpoint")
    return str(meta["ckpt_path"])


@section("training_runs")
def training_runs_section(evidence: Evidence, spec_section: dict[str, Any]) -> list[str]:
    """One row per model (``models``: label -> evaluation key): the epochs its run trained, the
    epoch of the checkpoint the evaluation ran on, the validation accuracies logged at that epoch
    (clean and under the validation attack, on the run's validation images), and the test accuracies
    ``train.py`` logged after training (of the run's best checkpoint, which it tests), with their
    Wilson intervals and number of test images; for preemptive models also both robust accuracies
    at their training safe spots x_r
    (``test_images``: that number when a command names none)."""
    rows = []
    default = spec_section.get("test_images", FULL_TEST_SPLIT)
    for label, key in dict(spec_section["models"]).items():
        run = evidence.spec.evaluations[key].run
        if run is None:
            raise SpecError(f"{evidence.spec.name}: evaluation {key!r} evaluates no training run of the spec")
        metrics = evidence.training_metrics(run)
        epoch = checkpoint_epoch(evaluated_checkpoint(evidence, key), metrics)
        n = test_images(evidence.overrides("train", run), default)
        tested = metrics.dropna(subset=["test/acc"]) if "test/acc" in metrics else metrics.iloc[0:0]
        test = tested.iloc[-1] if len(tested) else pd.Series(dtype=float)
        rows.append(
            {
                "Model": label,
                "Epochs": last_epoch(metrics) + 1,
                "Evaluated checkpoint (epoch)": epoch + 1,
                "Val clean": _rate(metric_at(metrics, "val/acc", epoch), None),
                "Val robust": _rate(metric_at(metrics, "val/robust_acc", epoch), None),
                "Test images": f"{n:,}" if n else MISSING,
                "Test clean": _rate(float(test.get("test/acc", float("nan"))), n),
                "Test robust": _rate(float(test.get("test/robust_acc", float("nan"))), n),
                # a preemptive model's robustness where it is meant to be robust: at x_r, the
                # safe spot its one training step finds (logged by the preemptive methods only)
                "Val robust at x_r": _rate(metric_at(metrics, "val/safe_robust_acc", epoch), None),
                "Test robust at x_r": _rate(float(test.get("test/safe_robust_acc", float("nan"))), n),
            }
        )
    lines = [str(spec_section["title"]).strip(), ""] if spec_section.get("title") else []
    if spec_section.get("text"):
        lines += [str(spec_section["text"]).strip(), ""]
    table = pd.DataFrame(rows)
    if (table[["Val robust at x_r", "Test robust at x_r"]] == MISSING).all(axis=None):
        table = table.drop(columns=["Val robust at x_r", "Test robust at x_r"])
    return [*lines, markdown_table(table), ""]
