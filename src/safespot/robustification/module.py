"""The robustification LightningModule: ``predict_step`` robustifies a batch of image files.

Each loaded image x_o is moved by the robustifier (the safe-spot search by default) to x_r inside
``B_delta(x_o)``, rounded to 8 bits and encoded as a lossless PNG, whose bytes are decoded again
and must give x_r back. A grey-box PGD check (``check``: random start seeded per file) runs on x_o
and on x_r as decoded from the PNG. Every random draw of a file comes from its own seed
(:func:`safespot.data.image_files.file_seed`), so a file's PNG and values depend neither on its
batch nor on the process.

Run it with ``Trainer(inference_mode=False)``: the search and the check take input gradients
(``predict_step`` turns gradients on inside the Trainer's ``no_grad``). Nothing is written here:
:class:`safespot.robustification.writer.RobustificationWriter` writes what each step returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torchvision
from torch import nn

from safespot.attacks import PGD
from safespot.data.image_files import FileBatch
from safespot.data.images import decode_image
from safespot.threat import LpBall
from safespot.utils.logging import get_logger
from safespot.utils.progress import note_progress
from safespot.utils.rng import derive

log = get_logger("safespot.robustification")


@dataclass
class FileResult:
    """What ``predict_step`` gives for one file: its ``position`` among the inputs, the report
    fields it filled in (``fields``: its status first), the PNG bytes to write (``None`` when there
    is nothing to write) and the SHA-256 of the input's bytes (``None`` for a file that did not load)."""

    position: int
    fields: dict[str, Any] = field(default_factory=dict)
    png: bytes | None = None
    input_sha256: str | None = None


def encode_png(image: torch.Tensor) -> bytes:
    """A uint8 ``(C, H, W)`` image as lossless PNG bytes (torchvision.io)."""
    return torchvision.io.encode_png(image.detach().cpu().contiguous()).numpy().tobytes()


class RobustificationModule(L.LightningModule):
    """Args:
    net: the classifier (images in [0, 1] -> logits).
    robustifier: a robustifier protecting the prediction (:mod:`safespot.defenses.robustifier`).
    check: the grey-box PGD check run before and after (``mode="eval"``, random start).
    class_names: the names of the classes, for the report (``None``: no names).
    """

    def __init__(
        self, net: nn.Module, robustifier: Any, check: PGD, class_names: tuple[str, ...] | None = None
    ) -> None:
        super().__init__()
        self.net = net.eval()
        self.robustifier, self.check, self.class_names = robustifier, check, class_names
        self.ball = LpBall(robustifier.norm, robustifier.delta)

    def name(self, index: int) -> str | None:
        names = self.class_names
        return names[index] if names is not None and 0 <= index < len(names) else None

    def on_predict_start(self) -> None:
        self.net.eval()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every batch has the model's input size

    def survives(self, x: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Whether x is classified as ``labels`` and PGD from a seeded start cannot change it."""
        x_adv = self.check(self.net, x, labels, seeds=seeds)
        with torch.no_grad():
            return (self.net(x).argmax(1) == labels) & (self.net(x_adv).argmax(1) == labels)

    def robustify(self, images: torch.Tensor, seeds: torch.Tensor) -> list[tuple[dict[str, Any], bytes | None]]:
        """Robustify and check uint8 ``images`` ``(k, C, H, W)`` with their per-file ``seeds``: each
        file's report fields and PNG bytes (``None`` when the PNG does not decode to x_r). The check
        after runs on x_r as decoded from its PNG bytes (lossless)."""
        x_o = images.float() / 255
        with torch.no_grad():
            pred = self.net(x_o).argmax(1)
        before = self.survives(x_o, pred, derive(seeds, "check_before"))
        result = self.robustifier(self.net, x_o, seeds=derive(seeds, "robustify"))
        note_progress(self._trainer, 0.9)
        x_r = torch.round(result.x_r.detach().clamp(0, 1) * 255).to(torch.uint8).cpu()
        pngs: list[bytes | None] = [encode_png(image) for image in x_r]
        x_png = torch.stack([decode_image(png, x_r.shape[1]) for png in pngs])
        x_saved = x_png.to(self.device).float() / 255
        with torch.no_grad():
            pred_r = self.net(x_saved).argmax(1)
        after = self.survives(x_saved, result.protected.to(self.device), derive(seeds, "check_after"))
        distance = self.ball.distance(x_saved, x_o)
        # the per-file fields moved to the host once per batch (not one transfer per value)
        values = zip(
            pred.tolist(),
            result.protected.tolist(),
            before.tolist(),
            result.worst_loss.tolist(),
            result.iterations.tolist(),
            pred_r.tolist(),
            distance.tolist(),
            after.tolist(),
            strict=True,
        )
        outcomes: list[tuple[dict[str, Any], bytes | None]] = []
        for i, (p, protected, survives, loss, iterations, p_r, d, survives_after) in enumerate(values):
            fields: dict[str, Any] = {
                "status": "ok",
                "pred": int(p),
                "pred_name": self.name(int(p)),
                "protected": int(protected),
                "protected_name": self.name(int(protected)),
                "pgd_survives_before": bool(survives),
                "worst_loss": float(loss),
                "iterations": int(iterations),
            }
            if not torch.equal(x_png[i], x_r[i]):
                fields["status"], pngs[i] = "failed: write: the PNG decodes to another image than x_r", None
            else:
                fields.update(pred_robustified=int(p_r), distance=float(d), pgd_survives_after=bool(survives_after))
            outcomes.append((fields, pngs[i]))
        return outcomes

    def predict_step(self, batch: FileBatch, batch_idx: int = 0) -> list[FileResult]:
        """One :class:`FileResult` per file of the batch: files that did not load with their status,
        the others robustified (:meth:`robustify`). A batch that raises a ``RuntimeError`` (e.g. out
        of memory) fails as a whole and the run goes on with the next one."""
        results = [FileResult(f.position, {"status": f.failure, "output": None}) for f in batch.files if f.failure]
        loaded = [f for f in batch.files if not f.failure]
        if not loaded:
            return results
        try:
            with torch.enable_grad():
                outcomes = self.robustify(batch.images, batch.seeds)
        except RuntimeError as err:
            log.exception("robustifying a batch of %d files failed", len(loaded))
            outcomes = [({"status": f"failed: error: {str(err).splitlines()[0]}"}, None) for _ in loaded]
        for f, (fields, png) in zip(loaded, outcomes, strict=True):
            fields = {"status": fields.pop("status"), "original_size": f.original_size, "resized": f.resized, **fields}
            results.append(FileResult(f.position, fields, png, f.sha256))
        return results
