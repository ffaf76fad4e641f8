"""Robustifying image files: ``python robustify.py ckpt_path=PATH input=DIR output=DIR``.

Each image file is read as 8-bit RGB in [0, 1], brought to the model's input size (``resize``
policy), moved by a robustifier (the safe-spot search by default) to a point x_r inside
``B_delta(x_o)`` that protects the model's prediction, and written as a lossless PNG
``<output>/<stem>.png``: into a temporary file in the output directory first, then linked
into place, so a file is never half-written and an existing file is never overwritten. A
grey-box PGD check (``check_steps`` steps, step eps/4, random start seeded per file) runs on
x_o and on x_r as read back from the written PNG. ``report.csv`` and ``report.json`` hold one
row per input file with its status: ``ok``, ``failed: <reason>`` or ``skipped: <reason>``.

Inputs are only ever read. Every setting is checked (checkpoint, inputs, output, runtime,
threat, robustifier) before a model is placed or a file written.

The command runs on a Lightning Fabric built from the ``runtime`` block
(:func:`safespot.runs.build_fabric`; ``device=``/``precision=`` are its aliases), in named steps:
:func:`make_plan` (:func:`check_settings`, the runtime, :func:`collect_inputs`,
:func:`check_output`, :func:`load_run`, the model), then in every process
:func:`robustify_process`: the model placed on the process's device, :func:`plan_records` (rank 0
decides, before anything is written, which files exist; broadcast), :func:`run_shard` (process r
of N robustifies the files at positions r, r+N, ... under ``fabric.autocast()``; a file's seeds
come from its bytes, so its PNG does not depend on the shard), :func:`gather_records` (every
record back in input order, in every process) and :func:`write_outputs` (rank 0: the report).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torchvision
from lightning.fabric import Fabric
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import UnidentifiedImageError
from torch import nn
from tqdm import tqdm

from safespot.attacks import PGD
from safespot.checks import input_shape
from safespot.data.images import IMAGE_EXTENSIONS, decode_image, resize_and_crop
from safespot.errors import ConfigError
from safespot.runs import (
    build_fabric,
    describe_model,
    describe_runtime,
    leave_together,
    load_model,
    load_training_run,
    merge_positions,
    model_input,
    place_model,
    run_source,
    run_threat,
    shard,
)
from safespot.threat import LpBall, ThreatConfigError, check_budget, check_positive_int, parse_budget
from safespot.utils.distributed import gather_objects
from safespot.utils.instantiate import instantiate
from safespot.utils.logging import get_logger
from safespot.utils.plain import to_plain
from safespot.utils.rng import derive, host_seed
from safespot.utils.task import task_wrapper

log = get_logger("safespot.robustify")

RESIZE_POLICIES = ("crop", "refuse")
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
FIELDS = (
    "input",
    "output",
    "status",
    "original_size",
    "resized",
    "pred",
    "pred_name",
    "protected",
    "protected_name",
    "pred_robustified",
    "distance",
    "pgd_survives_before",
    "pgd_survives_after",
    "worst_loss",
    "iterations",
)


# --- settings -------------------------------------------------------------------------
def _positive_int(cfg: DictConfig, key: str) -> int:
    """``cfg[key]`` as an integer >= 1, or a :class:`ConfigError` naming the setting."""
    try:
        return check_positive_int(cfg.get(key), key)
    except ThreatConfigError as err:
        raise ConfigError(str(err)) from None


def collect_inputs(spec: Any) -> list[tuple[Path, str | None]]:
    """``(path, skip reason or None)`` for every file named by ``input``: a directory (its
    files, sorted, not recursive; files without an image extension are skipped), an image
    file (tried whatever its extension) or a list of those."""
    entries = list(spec) if isinstance(spec, ListConfig | list | tuple) else [spec]
    if not entries or any(e is None or not str(e).strip() for e in entries):
        raise ConfigError(f"input must be a directory, an image file or a list of them, got {spec!r}")
    found: list[tuple[Path, str | None]] = []
    seen: set[Path] = set()
    for entry in entries:
        path = Path(str(entry)).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file())
            items = [(p, None if p.suffix.lower() in IMAGE_EXTENSIONS else "skipped: not an image") for p in files]
        elif path.is_file():
            items = [(path, None)]
        else:
            raise ConfigError(f"input={str(entry)!r} does not exist")
        for p, reason in items:
            if p.resolve() not in seen:
                seen.add(p.resolve())
                found.append((p, reason))
    if not any(reason is None for _, reason in found):
        raise ConfigError(f"input={_show(spec)} holds no image files ({' '.join(IMAGE_EXTENSIONS)})")
    return found


def check_output(output: Any, spec: Any, inputs: list[tuple[Path, str | None]]) -> Path:
    """The output directory: not an existing file, and never a directory inputs come from."""
    if output is None or not str(output).strip():
        raise ConfigError("output must name a directory for the robustified images")
    out = Path(str(output)).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output={str(output)!r} exists and is not a directory")
    entries = list(spec) if isinstance(spec, ListConfig | list | tuple) else [spec]
    input_dirs = {Path(str(e)).expanduser().resolve() for e in entries if Path(str(e)).expanduser().is_dir()}
    input_dirs |= {p.resolve().parent for p, _ in inputs}
    if out.resolve() in input_dirs:
        raise ConfigError(
            f"output={str(output)!r} is an input directory; choose another directory so that inputs are never touched"
        )
    return out


def _show(spec: Any) -> str:
    return repr(OmegaConf.to_container(spec)) if isinstance(spec, ListConfig) else repr(str(spec))


def class_names(run_cfg: DictConfig) -> tuple[str, ...] | None:
    """CIFAR-10's class names when the checkpoint was trained on it, else ``None``."""
    target = str(run_cfg.data.get("_target_", ""))
    if target.rsplit(".", 1)[-1] == "CIFAR10DataModule" and int(run_cfg.data.get("num_classes", 10)) == 10:
        return CIFAR10_CLASSES
    return None


# --- files ----------------------------------------------------------------------------
class FileFailure(Exception):
    """A per-file failure; its message is the record's status."""


def file_seed(seed: int, content: bytes) -> int:
    """A seed from the run seed and the file's bytes: a file's checks and search do not
    depend on its name, its batch or the other files."""
    digest = int.from_bytes(hashlib.sha256(content).digest()[:8], "little")
    return host_seed(seed, "file", digest)


def load_image(content: bytes, channels: int, size: int, policy: str) -> tuple[torch.Tensor, str, bool]:
    """The image as a uint8 tensor ``(C, size, size)``, its original ``WxH`` and whether it
    was resized; raises :class:`FileFailure` for unreadable files and refused sizes.

    Decoding and resizing are :mod:`safespot.data.images` (upright by EXIF orientation; shorter
    side resized, bilinear with antialiasing, centre crop), the loader of the outlier folders."""
    try:
        image = decode_image(content, channels)
    except UnidentifiedImageError:
        raise FileFailure("failed: unreadable: not an image format PIL can read") from None
    except Exception as err:  # any other decoder error: truncated, corrupt, too large
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileFailure(f"failed: unreadable: {reason}") from None
    height, width = image.shape[-2:]
    original = f"{width}x{height}"
    resized = (height, width) != (size, size)
    if resized and policy == "refuse":
        raise FileFailure(f"failed: size {original} differs from the model's input size {size}x{size} (resize=refuse)")
    return resize_and_crop(image, size), original, resized


def _file_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_exclusive(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically without ever replacing an existing file: into a
    temporary file in the same directory, then hard-linked into place (which fails if
    ``path`` exists). Where hard links are unsupported, ``os.replace`` after a check.
    Raises :class:`FileExistsError` when ``path`` exists."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # no hard links on this file system
            if path.exists():
                raise FileExistsError(str(path)) from None
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def encode_png(image: torch.Tensor) -> bytes:
    """A uint8 ``(C, H, W)`` image as lossless PNG bytes (torchvision.io)."""
    return torchvision.io.encode_png(image.detach().cpu().contiguous()).numpy().tobytes()


def read_png(path: Path, channels: int) -> torch.Tensor:
    """A written PNG read back as a uint8 tensor ``(C, H, W)``."""
    return decode_image(path, channels)


# --- the work -------------------------------------------------------------------------
class _Job:
    """Everything a batch needs: model, robustifier, the grey-box check and settings."""

    def __init__(self, net: nn.Module, robustifier: Any, check: PGD, device: torch.device, names: Any) -> None:
        self.net, self.robustifier, self.check, self.device, self.names = net, robustifier, check, device, names
        self.ball = LpBall(robustifier.norm, robustifier.delta)

    def name(self, index: int) -> str | None:
        return self.names[index] if self.names is not None and 0 <= index < len(self.names) else None

    def survives(self, x: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Whether x is classified as ``labels`` and PGD from a seeded start cannot change it."""
        x_adv = self.check(self.net, x, labels, seeds=seeds)
        with torch.no_grad():
            return (self.net(x).argmax(1) == labels) & (self.net(x_adv).argmax(1) == labels)

    def run(self, batch: list[dict[str, Any]], images: list[torch.Tensor], seeds: list[int]) -> None:
        """Robustify, write, re-read and check one batch, filling in its records."""
        x_o = torch.stack(images).to(self.device).float() / 255
        seed = torch.tensor(seeds, dtype=torch.long, device=self.device)
        with torch.no_grad():
            pred = self.net(x_o).argmax(1)
        before = self.survives(x_o, pred, derive(seed, "check_before"))
        result = self.robustifier(self.net, x_o, seeds=derive(seed, "robustify"))
        x_r = torch.round(result.x_r.detach().clamp(0, 1) * 255).to(torch.uint8).cpu()
        # the per-file fields moved to the host once per batch (not one transfer per value)
        fields = zip(
            pred.tolist(),
            result.protected.tolist(),
            before.tolist(),
            result.worst_loss.tolist(),
            result.iterations.tolist(),
            strict=True,
        )
        written = []
        for i, (record, (p, protected, survives, loss, iterations)) in enumerate(zip(batch, fields, strict=True)):
            record.update(
                pred=int(p),
                pred_name=self.name(int(p)),
                protected=int(protected),
                protected_name=self.name(int(protected)),
                pgd_survives_before=bool(survives),
                worst_loss=float(loss),
                iterations=int(iterations),
            )
            out = Path(record["output"])
            try:
                write_exclusive(out, encode_png(x_r[i]))
            except FileExistsError:
                record["status"] = "failed: exists"
                continue
            except OSError as err:
                record["status"] = f"failed: write: {err}"
                continue
            saved = read_png(out, x_r.shape[1])
            if not torch.equal(saved, x_r[i]):
                record["status"] = "failed: write: the PNG read back differs from the image written"
                continue
            written.append((i, record, saved))
        if not written:
            return
        index = torch.tensor([i for i, _, _ in written], device=self.device)
        x_saved = torch.stack([s for _, _, s in written]).to(self.device).float() / 255
        protected = result.protected.to(self.device)[index]
        with torch.no_grad():
            pred_r = self.net(x_saved).argmax(1)
        after = self.survives(x_saved, protected, derive(seed[index], "check_after"))
        distance = self.ball.distance(x_saved, x_o[index])
        checked = zip(pred_r.tolist(), distance.tolist(), after.tolist(), strict=True)
        for (_, record, _), (p, d, survives) in zip(written, checked, strict=True):
            record.update(status="ok", pred_robustified=int(p), distance=float(d), pgd_survives_after=bool(survives))


def _record(path: Path, output: Path, status: str | None) -> dict[str, Any]:
    """A file's record; ``output`` is where its PNG goes (none for skipped files)."""
    record: dict[str, Any] = dict.fromkeys(FIELDS)
    record.update(input=str(path), output=None if status else str(output), status=status)
    return record


def _report_paths(out: Path) -> tuple[Path, Path]:
    """``report.csv``/``report.json``, or timestamped names if either exists already."""
    candidates = [("report.csv", "report.json")]
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    suffixes = ["", *(f"-{k}" for k in range(1, 100))]
    candidates += [(f"report-{stamp}{s}.csv", f"report-{stamp}{s}.json") for s in suffixes]
    for csv_name, json_name in candidates:
        if not (out / csv_name).exists() and not (out / json_name).exists():
            return out / csv_name, out / json_name
    raise FileExistsError(f"no free report name in {out}")


def write_report(out: Path, records: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[Path, Path]:
    csv_path, json_path = _report_paths(out)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in FIELDS} for r in records)
    write_exclusive(csv_path, buffer.getvalue().encode())
    payload = {"meta": meta, "summary": summarize(records), "files": records}
    write_exclusive(json_path, (json.dumps(payload, indent=2) + "\n").encode())
    return csv_path, json_path


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if r["status"] == "ok"]
    return {
        "n_files": len(records),
        "ok": len(ok),
        "failed": sum(r["status"].startswith("failed") for r in records),
        "skipped": sum(r["status"].startswith("skipped") for r in records),
        "pgd_survives_before": sum(bool(r["pgd_survives_before"]) for r in ok),
        "pgd_survives_after": sum(bool(r["pgd_survives_after"]) for r in ok),
    }


def any_failed(records: list[dict[str, Any]]) -> bool:
    return any(r["status"].startswith("failed") for r in records)


# --- the command, step by step ----------------------------------------------------------
@dataclass
class Plan:
    """Everything the processes of a robustification need, checked and loaded in the process
    that launches them (picklable: ``ddp_spawn`` sends it to every process)."""

    inputs: list[tuple[Path, str | None]]
    out: Path
    net: nn.Module  # on the CPU; each process moves it to its device
    robustifier: Any
    check: PGD
    names: tuple[str, ...] | None
    channels: int
    size: int
    batch_size: int
    check_steps: int
    resize: str
    seed: int
    progress: bool
    perf: dict[str, Any] | None
    meta: dict[str, Any] = field(default_factory=dict)


def check_settings(cfg: DictConfig) -> tuple[int, int]:
    """The required settings, ``resize`` and ``(batch_size, check_steps)``, each refused with a
    line naming it."""
    for key in ("input", "output"):
        if key not in cfg or OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{key} is required: python robustify.py ckpt_path=PATH input=DIR_OR_FILE output=DIR")
    if cfg.get("resize") not in RESIZE_POLICIES:
        raise ConfigError(f"resize must be one of {list(RESIZE_POLICIES)}, got {cfg.get('resize')!r}")
    return _positive_int(cfg, "batch_size"), _positive_int(cfg, "check_steps")


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


def make_plan(cfg: DictConfig) -> tuple[Plan, Fabric]:
    """Check every setting (checkpoint, inputs, output, runtime, threat, robustifier), load the
    model and build the runtime, before a model is placed or a file written."""
    batch_size, check_steps = check_settings(cfg)
    fabric = build_fabric(cfg, "robustification")
    inputs = collect_inputs(cfg.input)
    out = check_output(cfg.output, cfg.input, inputs)
    checkpoint, run_cfg, robustifier, check, threat = load_run(cfg, check_steps)
    net = load_model(checkpoint, run_cfg, int(run_cfg.data.num_classes))
    channels, size = model_input(run_cfg)
    meta = {
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
    plan = Plan(
        inputs=inputs,
        out=out,
        net=net,
        robustifier=robustifier,
        check=check,
        names=class_names(run_cfg),
        channels=channels,
        size=size,
        batch_size=batch_size,
        check_steps=check_steps,
        resize=str(cfg.resize),
        seed=int(cfg.seed),
        progress=bool(cfg.get("progress", True)),
        perf=to_plain(cfg.get("perf")),
        meta=meta,
    )
    return plan, fabric


def plan_records(plan: Plan) -> tuple[list[dict[str, Any]], list[int]]:
    """One record per input and the positions of the files to robustify. A file whose PNG
    exists already, or whose output name an earlier input takes (the same stem), is
    ``failed: exists`` before any work, so that which file is written never depends on the
    order in which processes finish."""
    records: list[dict[str, Any]] = []
    todo: list[int] = []
    taken: set[Path] = set()
    for path, skip in plan.inputs:
        record = _record(path, plan.out / f"{path.stem}.png", skip)
        records.append(record)
        if skip is not None:
            continue
        target = Path(record["output"])
        if target.exists() or target in taken:
            record["status"] = "failed: exists"
        else:
            taken.add(target)
            todo.append(len(records) - 1)
    return records, todo


def read_batch(plan: Plan, batch: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[torch.Tensor], list[int]]:
    """The readable files of ``batch`` as ``(records, uint8 images, per-file seeds)``; the
    records of unreadable or refused files get their ``failed`` status."""
    kept, images, seeds = [], [], []
    for record in batch:
        try:
            content = Path(record["input"]).read_bytes()
            image, record["original_size"], record["resized"] = load_image(
                content, plan.channels, plan.size, plan.resize
            )
        except FileFailure as err:
            record.update(status=str(err), output=None)
            continue
        except OSError as err:
            record.update(status=f"failed: unreadable: {err.strerror or err}", output=None)
            continue
        kept.append(record)
        images.append(image)
        seeds.append(file_seed(plan.seed, content))
    return kept, images, seeds


def run_shard(fabric: Fabric, plan: Plan, job: _Job, todo: list[dict[str, Any]]) -> None:
    """Robustify this process's share of ``todo`` (positions ``rank, rank + N, ...``) in batches
    of ``batch_size``, filling in their records; a progress bar on rank 0."""
    mine = [todo[i] for i in shard(len(todo), fabric)]
    disable = not (plan.progress and fabric.is_global_zero)
    with tqdm(total=len(mine), desc="robustify", unit="img", disable=disable) as bar:
        for start in range(0, len(mine), plan.batch_size):
            batch, images, seeds = read_batch(plan, mine[start : start + plan.batch_size])
            if batch:
                try:
                    with fabric.autocast():
                        job.run(batch, images, seeds)
                except RuntimeError as err:  # e.g. out of memory: report, go on with the next batch
                    log.exception("robustifying a batch of %d files failed", len(batch))
                    for record in batch:
                        if record["status"] is None:
                            record["status"] = f"failed: error: {str(err).splitlines()[0]}"
            bar.update(len(mine[start : start + plan.batch_size]))


def gather_records(fabric: Fabric, records: list[dict[str, Any]], todo: list[int]) -> list[dict[str, Any]]:
    """Every process's robustified records put back in input order, in every process."""
    fabric.barrier("robustify: every shard done")
    mine = [(i, records[todo[i]]) for i in shard(len(todo), fabric)]
    for i, record in enumerate(merge_positions(gather_objects(mine), len(todo))):
        records[todo[i]] = record
    return records


def write_outputs(plan: Plan, records: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """``report.csv``/``report.json`` and the summary line (rank 0)."""
    csv_path, json_path = write_report(plan.out, records, meta)
    s = summarize(records)
    survival = f"{s['pgd_survives_before']}/{s['ok']} before, {s['pgd_survives_after']}/{s['ok']} after"
    rate = s["ok"] / meta["seconds"] if meta.get("seconds") else float("nan")
    print(
        f"[safespot] {s['ok']} ok, {s['failed']} failed, {s['skipped']} skipped in {meta.get('seconds', 0):.1f} s "
        f"({rate:.2f} images/s); safe-spot check (PGD-{plan.check_steps} survives): {survival}; report: {csv_path}"
    )
    log.info("report: %s, %s", csv_path, json_path)


def robustify_process(fabric: Fabric, plan: Plan) -> list[dict[str, Any]]:
    """One process of the runtime: place the model, take rank 0's records, robustify this
    process's shard, gather every record, and (rank 0) write the report; returns every record."""
    started, clock = datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    net = place_model(fabric, plan.net, plan.perf)
    if fabric.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has the model's input size
    job = _Job(net, plan.robustifier, plan.check, fabric.device, plan.names)
    if fabric.is_global_zero:
        plan.out.mkdir(parents=True, exist_ok=True)
    # rank 0 decides (before any process writes) which files exist already
    records, todo = fabric.broadcast(plan_records(plan) if fabric.is_global_zero else None, src=0)
    run_shard(fabric, plan, job, [records[i] for i in todo])
    records = gather_records(fabric, records, todo)
    if fabric.is_global_zero:
        meta = {**plan.meta, **describe_runtime(fabric), "started": started}
        meta["finished"] = datetime.now().isoformat(timespec="seconds")
        meta["seconds"] = round(time.perf_counter() - clock, 3)
        write_outputs(plan, records, meta)
    leave_together(fabric, "robustify: report written")
    return records


@task_wrapper
def robustify_files(cfg: DictConfig) -> list[dict[str, Any]]:
    """Robustify every image named by ``cfg.input`` into ``cfg.output`` (see the module
    docstring) on the ``runtime`` (a Lightning Fabric: one process, or the files sharded over
    several); returns one record per input file, also written to the report, in every process."""
    plan, fabric = make_plan(cfg)
    return fabric.launch(robustify_process, plan)
