"""The evaluation LightningModule: runs a list of evaluations on every test batch, keeps one
record per image, and merges the records of all processes exactly once, in index order.

Run it with ``Trainer(inference_mode=False)``: gradient attacks cannot run under
``torch.inference_mode``. With N processes the datamodule's :class:`ShardSampler` gives
each image to exactly one process; records are gathered with one collective at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from safespot.evaluation.evaluations import Clean, Evaluation
from safespot.evaluation.records import merge_shards, summarize, to_frame, write_results
from safespot.utils.rng import image_seeds


def _gather(frame: pd.DataFrame) -> list[pd.DataFrame]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        frames: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(frames, frame)
        return frames
    return [frame]


def panel(x: torch.Tensor, x_eval: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows: originals, evaluated images, and their difference amplified to fill [0, 1]."""
    diff = x_eval - x
    scale = 0.5 / max(float(diff.abs().max()), eps * 1e-3, 1e-12)
    return torch.cat([x, x_eval, (0.5 + scale * diff).clamp(0, 1)])


class EvaluationModule(L.LightningModule):
    """Args:
    net: the classifier (images in [0, 1] -> logits), in eval mode.
    evaluations: evaluation objects; a ``clean`` one is put first if missing.
    seed: base seed for per-image random starts.
    output_dir: where ``records.csv``, ``results.json`` and ``images/`` go (rank 0).
    meta: descriptive fields written into ``results.json``.
    panel_images: images per evaluation in the saved original/adversarial/difference panel.
    """

    def __init__(
        self,
        net: nn.Module,
        evaluations: Sequence[Evaluation],
        seed: int = 0,
        output_dir: str | Path | None = None,
        meta: dict[str, Any] | None = None,
        panel_images: int = 8,
    ) -> None:
        super().__init__()
        self.net = net.eval()
        evaluations = list(evaluations)
        names = [name for e in evaluations for name in e.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluation names must be unique, got {names}")
        if "clean" not in names:
            evaluations.insert(0, Clean(norm=evaluations[0].norm if evaluations else "linf"))
        self.evaluations = evaluations
        self.seed = int(seed)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.meta = dict(meta or {})
        self.panel_images = panel_images
        self._parts: list[dict[str, torch.Tensor]] = []
        self._panels: dict[str, torch.Tensor] = {}
        self.records = pd.DataFrame()
        self.summary: dict[str, float] = {}

    @property
    def names(self) -> list[str]:
        return [name for e in self.evaluations for name in e.outputs]

    @property
    def groups(self) -> dict[str, list[str]]:
        return {k: v for e in self.evaluations for k, v in e.groups.items()}

    def on_test_epoch_start(self) -> None:
        self.net.eval()
        self._parts, self._panels = [], {}

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        x, y, index = batch[0], batch[1], batch[2]
        fields: dict[str, torch.Tensor] = {"index": index.long(), "label": y.long()}
        for salt, evaluation in enumerate(self.evaluations):
            out, x_eval = evaluation(self.net, x, y, image_seeds(self.seed, index, salt))
            fields.update(out)
            if batch_idx == 0 and self.global_rank == 0 and self.panel_images:
                k = self.panel_images
                eps = float(getattr(getattr(evaluation, "ball", None), "eps", 1.0))
                self._panels[evaluation.name] = panel(x[:k], x_eval[:k], eps).detach().cpu()
        self._parts.append({k: v.detach().cpu() for k, v in fields.items()})

    def on_test_epoch_end(self) -> None:
        records = merge_shards(_gather(to_frame(self._parts)))
        self._parts = []
        self.records = records
        self.summary = summarize(records, self.names, self.groups) if len(records) else {}
        for key, value in self.summary.items():
            self.log(key, float(value), rank_zero_only=True)
        if self.global_rank == 0:
            if self.output_dir is not None:
                write_results(self.output_dir, records, self.summary, {**self.meta, "evaluations": self.names})
                self._save_panels()
            self._log_to_wandb()

    def _save_panels(self) -> None:
        from torchvision.utils import save_image

        folder = self.output_dir / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for name, grid in self._panels.items():
            if name != "clean":
                save_image(grid, folder / f"{name}.png", nrow=self.panel_images, padding=1)

    def _log_to_wandb(self) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            import wandb

            from safespot.utils.wandb_report import log_evaluation

            log_evaluation(
                logger.experiment, self.records, self.summary, self._panels, self.names, self.panel_images, wandb
            )
