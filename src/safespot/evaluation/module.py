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
from torch import nn

from safespot.evaluation.evaluations import CertifyEvaluation, Clean, Evaluation
from safespot.evaluation.records import merge_shards, summarize, to_frame, write_results
from safespot.smoothing.certified import write_certified_accuracy
from safespot.utils.distributed import gather_objects
from safespot.utils.progress import note_progress
from safespot.utils.rng import streams
from safespot.utils.wandb_report import log_evaluation, log_records_artifact


def write_certificates(records: pd.DataFrame, evaluations: Sequence[Evaluation], out: Path, title: str | None) -> None:
    """Certified accuracy versus radius (``certified_accuracy.csv`` / ``.md`` / ``.png``) for the
    certify evaluations that ran, if any (Cohen et al.'s CERTIFY; paper 002, Table 7)."""
    certify = [e for e in evaluations if isinstance(e, CertifyEvaluation)]
    certify += [e.certify for e in evaluations if e.certify is not None]
    if certify and len(records):
        radii = sorted({r for e in certify for r in e.radii})
        write_certified_accuracy(records, [e.name for e in certify], radii, out, title)


def panel(x: torch.Tensor, x_eval: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows: originals, evaluated images, and their difference amplified to fill [0, 1]."""
    diff = x_eval - x
    scale = 0.5 / max(float(diff.abs().max()), eps * 1e-3, 1e-12)
    return torch.cat([x, x_eval, (0.5 + scale * diff).clamp(0, 1)])


#: evaluation batches are computed in multiples of this many rows (:meth:`EvaluationModule._batch_rows`)
ROW_MULTIPLE = 8


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with its last row repeated up to ``rows`` rows (a copy; the padding rows' outputs are
    dropped)."""
    if len(t) >= rows:
        return t
    return torch.cat([t, t[-1:].expand(rows - len(t), *t.shape[1:])])


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
        artifacts: bool = False,
    ) -> None:
        super().__init__()
        self.artifacts = bool(artifacts)
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
        self._panel_rows: dict[str, tuple[torch.Tensor, ...]] = {}
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
        self._parts, self._panels, self._panel_rows = [], {}, {}

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        x, y, index = batch[0], batch[1], batch[2]
        n = len(index)
        x, y, index = (pad_rows(t, self._batch_rows(n)) for t in (x, y, index))
        fields: dict[str, torch.Tensor] = {"index": index[:n].long(), "label": y[:n].long()}
        for salt, evaluation in enumerate(self.evaluations):
            out, x_eval = evaluation(self.net, x, y, streams(self.seed, index, "evaluation", salt))
            fields.update({k: v[:n] for k, v in out.items()})
            if self.panel_images:
                self._keep_panel_rows(evaluation.name, index[:n], x[:n], x_eval[:n])
            note_progress(self._trainer, (salt + 1) / len(self.evaluations))
        self._parts.append({k: v.detach().cpu() for k, v in fields.items()})

    def _batch_rows(self, n: int) -> int:
        """The rows a batch of ``n`` images is computed with: ``n`` rounded up to a multiple of
        :data:`ROW_MULTIPLE` (the last batch of a process, or a share smaller than a batch, padded
        with copies of its last image whose outputs are dropped). An odd-shaped small batch can make
        the kernels that shapes select add in another order than the full batches of another
        process count do, and an attack's sign steps can then part on float noise; the padding
        costs at most ``ROW_MULTIPLE - 1`` images per process."""
        return -(-n // ROW_MULTIPLE) * ROW_MULTIPLE

    def _keep_panel_rows(self, name: str, index: torch.Tensor, x: torch.Tensor, x_eval: torch.Tensor) -> None:
        """Keep, per evaluation, the ``panel_images`` images with the smallest dataset indices seen
        by this process; :meth:`on_test_epoch_end` merges them across processes, so the panels
        show the same images whatever the batching or the number of processes."""
        k = self.panel_images
        kept = self._panel_rows.get(name)
        first = index.argsort()[:k]  # this batch's candidates, chosen on the device: k rows cross to the host
        rows = (index[first].detach().cpu(), x[first].detach().cpu(), x_eval[first].detach().cpu())
        if kept is not None:
            rows = tuple(torch.cat([a, b]) for a, b in zip(kept, rows, strict=True))
        order = rows[0].argsort()[:k]
        self._panel_rows[name] = tuple(t[order] for t in rows)

    def on_test_epoch_end(self) -> None:
        """Gather -> records -> results.json -> certificates -> panels -> wandb, on rank 0 after
        one collective; every process ends with the same records and summary."""
        records = merge_shards(gather_objects(to_frame(self._parts)))
        panel_rows = gather_objects(self._panel_rows)
        self._parts, self._panel_rows = [], {}
        self.records = records
        self.summary = summarize(records, self.names, self.groups) if len(records) else {}
        self._panels = self._merge_panels(panel_rows)
        for key, value in self.summary.items():
            self.log(key, float(value), rank_zero_only=True)
        if self.global_rank == 0:
            if self.output_dir is not None:
                meta = {**self.meta, "evaluations": self.names, "groups": self.groups}
                write_results(self.output_dir, records, self.summary, meta)
                write_certificates(records, self.evaluations, self.output_dir, self.meta.get("title"))
                self._save_panels()
            self._log_to_wandb()
        if self._trainer is not None:
            self._trainer.strategy.barrier("evaluation-written")  # the files exist on every rank's return

    def _merge_panels(self, parts: list[dict[str, tuple[torch.Tensor, ...]]]) -> dict[str, torch.Tensor]:
        panels = {}
        for evaluation in self.evaluations:
            found = [p[evaluation.name] for p in parts if evaluation.name in p]
            if not found:
                continue
            index, x, x_eval = (torch.cat(t) for t in zip(*found, strict=True))
            order = index.argsort()[: self.panel_images]
            eps = 1.0 if evaluation.ball is None else float(evaluation.ball.eps)
            panels[evaluation.name] = panel(x[order], x_eval[order], eps)
        return panels

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
            import wandb  # optional at import time: only runs that log to wandb load it

            log_evaluation(
                logger.experiment, self.records, self.summary, self._panels, self.names, self.panel_images, wandb
            )
            if self.artifacts and self.output_dir is not None:
                log_records_artifact(logger.experiment, self.output_dir, wandb)
