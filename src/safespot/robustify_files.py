"""Robustifying image files: ``python robustify.py ckpt_path=PATH input=DIR output=DIR``.

Each image file is read as 8-bit RGB in [0, 1], brought to the model's input size (``resize``
policy), moved by a robustifier (the safe-spot search by default) to a point x_r inside
``B_delta(x_o)`` that protects the model's prediction, and written as a lossless PNG
``<output>/<stem>.png``: into a temporary file in the output directory first, then linked
into place, so a file is never half-written and an existing file is never overwritten. A
grey-box PGD check (``check_steps`` steps, step eps/4, random start seeded per file) runs on
x_o and on x_r as decoded from the PNG, whose written bytes are read back and compared.
``report.csv`` and ``report.json`` (``report-1.*``, ... when taken) hold one row per input
with its status: ``ok``, ``failed: <reason>`` or ``skipped: <reason>`` (duplicates, FIFOs,
devices, directories and broken links included).

With ``recursive=true`` the subdirectories of input directories are walked too (sorted, links to
directories not followed) and each PNG keeps its input's relative path,
``<output>/<sub/dir>/<stem>.png``. After the report rank 0 writes ``contact_sheet.png``
(``contact_sheet=true``, the default): every ``ok`` file's original and robustified image side by
side, labelled with its name, prediction and check verdicts
(:mod:`safespot.robustification.contact_sheet`).

Every process appends each file's row to its own journal in the output directory
(``journal-<run>-rank<r>.jsonl``, flushed to disk before the file's PNG gets its name), so a
killed run loses nothing: ``skip_existing=true`` keeps the row of every file whose PNG exists
and whose journal row (same settings, same input and PNG bytes) says it finished, and
robustifies the others. Temporary files of killed runs are removed at the start.

Inputs are only ever read. Every setting is checked (checkpoint, inputs, output, trainer,
threat, robustifier) before a model is placed or a file written.

The command runs on Lightning's Trainer (``trainer=cpu|gpu|ddp|ddp_spawn|ddp_sim``, like
``evaluate.py``): :class:`safespot.data.image_files.ImageFilesDataModule` reads the files (process
r of N the files at positions r, r+N, ...; a file's seeds come from its bytes, so its PNG does not
depend on the process), ``trainer.predict`` runs
:class:`safespot.robustification.RobustificationModule` on every batch, and
:class:`safespot.robustification.RobustificationWriter` writes each batch's PNGs and journal rows,
gathers every record and lets rank 0 write the report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from safespot.attacks import PGD
from safespot.checks import input_shape
from safespot.data.image_files import RESIZE_POLICIES, ImageFilesDataModule, collect_inputs
from safespot.errors import ConfigError
from safespot.robustification import (
    REPORT_INDEX,
    RobustificationModule,
    RobustificationWriter,
    any_failed,
    check_output,
    report_json,
    summary_line,
    write_contact_sheet,
)
from safespot.runs import describe_model, load_model, load_training_run, model_input, run_source, run_threat
from safespot.threat import ThreatConfigError, check_budget, check_positive_int, parse_budget
from safespot.utils.callbacks import runtime_callbacks
from safespot.utils.instantiate import instantiate, instantiate_callbacks
from safespot.utils.logging import get_logger
from safespot.utils.performance import prepare_net, refuse_float16
from safespot.utils.plain import to_plain
from safespot.utils.task import task_wrapper

__all__ = ["any_failed", "class_names", "robustify_files"]

log = get_logger("safespot.robustify_files")

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# float32, or bfloat16 autocast of the forward passes; float16 is refused (refuse_float16), and
# "-true" lower precisions would cast the weights, which neither the search nor the check expect
PRECISIONS = ("32-true", "32", "bf16-mixed", "auto")


# --- settings -------------------------------------------------------------------------
def _positive_int(cfg: DictConfig, key: str) -> int:
    """``cfg[key]`` as an integer >= 1, or a :class:`ConfigError` naming the setting."""
    try:
        return check_positive_int(cfg.get(key), key)
    except ThreatConfigError as err:
        raise ConfigError(str(err)) from None


def check_trainer(trainer: Any) -> None:
    """The ``trainer`` settings robustification refuses: float16 and casting precisions, and
    ``inference_mode`` (the search and the check take input gradients)."""
    precision = refuse_float16(trainer.get("precision", "32-true"), "trainer.precision", "robustification")
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if trainer.get("inference_mode", False):
        raise ConfigError(
            "trainer.inference_mode must be false: the safe-spot search and the check take input gradients"
        )


def check_settings(cfg: DictConfig) -> tuple[int, int]:
    """The required settings, ``resize``, the switches (``skip_existing``, ``recursive``,
    ``contact_sheet``), ``num_workers``, the trainer's and ``(batch_size, check_steps)``, each
    refused with a line naming it."""
    for key in ("input", "output"):
        if key not in cfg or OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{key} is required: python robustify.py ckpt_path=PATH input=DIR_OR_FILE output=DIR")
    if cfg.get("resize") not in RESIZE_POLICIES:
        raise ConfigError(f"resize must be one of {list(RESIZE_POLICIES)}, got {cfg.get('resize')!r}")
    for key, default in (("skip_existing", False), ("recursive", False), ("contact_sheet", True)):
        if not isinstance(cfg.get(key, default), bool):
            raise ConfigError(f"{key} must be true or false, got {cfg.get(key)!r}")
    workers = cfg.get("num_workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"num_workers must be an integer >= 0, got {workers!r}")
    check_trainer(cfg.trainer)
    return _positive_int(cfg, "batch_size"), _positive_int(cfg, "check_steps")


def class_names(run_cfg: DictConfig) -> tuple[str, ...] | None:
    """CIFAR-10's class names when the checkpoint was trained on it, else ``None``."""
    target = str(run_cfg.data.get("_target_", ""))
    if target.rsplit(".", 1)[-1] == "CIFAR10DataModule" and int(run_cfg.data.get("num_classes", 10)) == 10:
        return CIFAR10_CLASSES
    return None


def load_run(cfg: DictConfig, check_steps: int) -> tuple[dict[str, Any], DictConfig, Any, PGD, DictConfig]:
    """``(checkpoint, run_cfg, robustifier, check, threat)``: the checkpoint and its training
    config (or a zoo model's, :func:`safespot.runs.load_training_run`), the threat (the run's,
    non-null ``threat.*`` written over it; checked), the robustifier and the grey-box PGD check,
    all validated before a model is built."""
    checkpoint, run_cfg = load_training_run(cfg, "robustify.py")
    threat = run_threat(cfg, run_cfg)
    if cfg.robustifier.get("protect", "prediction") != "prediction":
        raise ConfigError("robustifier.protect must be 'prediction': image files come without labels")
    try:
        robustifier = instantiate(cfg.robustifier)
    except ThreatConfigError as err:
        raise ConfigError(f"robustifier.{err}") from None
    delta = cfg.robustifier.get("delta", robustifier.delta)  # as given, for the message
    check_budget(delta, robustifier.norm, "robustifier.delta", input_shape(run_cfg.data))
    try:
        check = PGD(threat.norm, threat.eps, steps=check_steps, step_size=None, random_start=True, mode="eval")
    except ThreatConfigError as err:
        raise ConfigError(f"threat.{err}") from None
    if not robustifier.quantize:
        log.warning("robustifier.quantize=false: the saved PNG is x_r rounded to 8 bits, checked as saved")
    return checkpoint, run_cfg, robustifier, check, threat


def output_settings(
    cfg: DictConfig, checkpoint: dict[str, Any], run_cfg: DictConfig, robustifier: Any, threat: DictConfig,
    check_steps: int,
) -> dict[str, Any]:  # fmt: skip
    """The settings the PNGs depend on: the journals' header (a resumed file must have been made
    with the same) and the report's meta."""
    channels, size = model_input(run_cfg)
    return {
        "ckpt_path": run_source(cfg, checkpoint),
        "model": describe_model(run_cfg),
        "input_size": [channels, size, size],
        "resize": cfg.resize,
        "robustifier": to_plain(OmegaConf.to_container(cfg.robustifier, resolve=True)),
        "norm": str(threat.norm),
        "delta": float(robustifier.delta),
        "eps": parse_budget(threat.eps, "threat.eps"),
        "check": f"PGD-{check_steps}, step eps/4, random start seeded per file",
        "seed": int(cfg.seed),
    }


# --- the Trainer ------------------------------------------------------------------------
def trainer_precision(trainer: Any) -> str:
    """``trainer.precision``, with ``auto`` resolved: bf16-mixed where the run lands on a CUDA
    device that supports bfloat16, float32 elsewhere (CPUs gain nothing from bf16 autocast here)."""
    precision = str(trainer.get("precision", "32-true"))
    if precision != "auto":
        return precision
    accelerator = str(trainer.get("accelerator", "auto"))
    on_cuda = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_cuda and torch.cuda.is_bf16_supported() else "32-true"


def build_trainer(cfg: DictConfig, writer: RobustificationWriter) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` with the ``callbacks`` group (the progress bar), the writer
    and :func:`safespot.utils.callbacks.runtime_callbacks`; a setting Lightning refuses is a
    :class:`ConfigError` naming the trainer's devices."""
    callbacks = [*instantiate_callbacks(cfg.get("callbacks"), cfg.trainer), writer, *runtime_callbacks(cfg.trainer)]
    precision = trainer_precision(cfg.trainer)
    try:
        return instantiate(cfg.trainer, logger=False, callbacks=callbacks, precision=precision)
    except InstantiationException as err:
        cause = err.__cause__ or err
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        keys = [k for k in ("accelerator", "devices", "strategy", "num_nodes") if cfg.trainer.get(k) is not None]
        shown = ", ".join([*(f"trainer.{k}={cfg.trainer[k]}" for k in keys), f"trainer.precision={precision}"])
        raise ConfigError(f"trainer ({shown}): {reason}") from None


# --- the command ------------------------------------------------------------------------
@task_wrapper
def robustify_files(cfg: DictConfig) -> list[dict[str, Any]]:
    """Robustify every image named by ``cfg.input`` into ``cfg.output`` (see the module
    docstring) on the Trainer of ``cfg.trainer``; returns one record per input, also written to
    the report, in input order."""
    batch_size, check_steps = check_settings(cfg)
    recursive = bool(cfg.get("recursive", False))
    inputs = collect_inputs(cfg.input, recursive)
    out = check_output(cfg.output, cfg.input, inputs, recursive)
    checkpoint, run_cfg, robustifier, check, threat = load_run(cfg, check_steps)
    net = prepare_net(load_model(checkpoint, run_cfg, int(run_cfg.data.num_classes)), cfg.get("perf"))
    channels, size = model_input(run_cfg)
    settings = output_settings(cfg, checkpoint, run_cfg, robustifier, threat, check_steps)

    datamodule = ImageFilesDataModule(
        inputs, channels, size, str(cfg.resize), int(cfg.seed), batch_size, int(cfg.get("num_workers", 0))
    )
    module = RobustificationModule(net, robustifier, check, class_names(run_cfg))
    writer = RobustificationWriter(out, settings, bool(cfg.get("skip_existing", False)))
    trainer = build_trainer(cfg, writer)
    trainer.predict(module, datamodule=datamodule, return_predictions=False)

    if not trainer.is_global_zero:  # a script-launched rank: the gathered records; rank 0 prints
        return writer.records
    # written by the writer on rank 0 before every rank returned from predict; under ddp_spawn this
    # process never held the records, and reads the report the workers name
    json_path = writer.report or report_json(out, int(trainer.callback_metrics[REPORT_INDEX]))
    report = json.loads(json_path.read_text())
    sheet = contact_sheet(out, report, class_names(run_cfg)) if cfg.get("contact_sheet", True) else None
    print(summary_line(report, json_path.with_suffix(".csv"), check_steps, sheet))
    return writer.records if writer.records is not None else report["files"]


def contact_sheet(out: Path, report: dict[str, Any], names: tuple[str, ...] | None) -> list[Path] | str:
    """Rank 0, after the report: the contact sheet of the report's rows
    (:func:`safespot.robustification.contact_sheet.write_contact_sheet`), or why it was not
    written: the report and the PNGs are the run's results, so a sheet that fails (a full disk)
    is logged, not raised."""
    try:
        pages = write_contact_sheet(out, report["files"], report["meta"], names)
    except OSError as err:
        log.error("the contact sheet could not be written: %s", err)
        return f"not written: {err.strerror or err}"
    return pages or "none (no file ok)"
