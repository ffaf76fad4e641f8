"""What an evaluation sends to wandb: summary metrics, a sample of the per-image table,
loss histograms, and an original / adversarial / amplified-difference image panel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

TABLE_ROWS = 1000


def log_evaluation(
    run: Any,
    records: pd.DataFrame,
    summary: dict[str, float],
    panels: dict[str, torch.Tensor],
    names: list[str],
    per_row: int,
    wandb: Any,
) -> None:
    for key, value in summary.items():
        run.summary[key] = value
    payload: dict[str, Any] = {"eval/records": wandb.Table(dataframe=records.head(TABLE_ROWS))}
    for name in names:
        column = f"{name}/loss"
        if column in records:
            payload[f"eval/loss_hist/{name}"] = wandb.Histogram(records[column].to_numpy())
    for name, grid in panels.items():
        if name == "clean":
            continue
        from torchvision.utils import make_grid

        image = make_grid(grid, nrow=per_row, padding=1).permute(1, 2, 0).numpy()
        payload[f"eval/panel/{name}"] = wandb.Image(image, caption="original / adversarial / amplified difference")
    run.log(payload)


def log_records_artifact(run: Any, output_dir: Path, wandb: Any) -> None:
    """The evaluation's per-image ``records.csv`` and ``results.json`` as a wandb artifact of type
    ``evaluation`` named after the run (``evaluate.py wandb_artifacts=true``)."""
    artifact = wandb.Artifact(name=f"records-{run.id}", type="evaluation")
    for name in ("records.csv", "results.json"):
        if (output_dir / name).is_file():
            artifact.add_file(str(output_dir / name))
    run.log_artifact(artifact)
