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
devices, directories and broken links included: :func:`collect_inputs`).

Every process appends each file's row to its own journal in the output directory
(``journal-<run>-rank<r>.jsonl``, flushed to disk before the file's PNG gets its name), so a
killed run loses nothing: ``skip_existing=true`` keeps the row of every file whose PNG exists
and whose journal row (same settings, same input and PNG bytes) says it finished, and
robustifies the others (:func:`finished_rows`, :func:`resumed_record`). Temporary files of
killed runs are removed at the start (:func:`safespot.utils.files.remove_stale_temporaries`).

Inputs are only ever read. Every setting is checked (checkpoint, inputs, output, runtime,
threat, robustifier) before a model is placed or a file written.

The command runs on a Lightning Fabric built from the ``runtime`` block
(:func:`safespot.runs.build_fabric`; ``device=``/``precision=`` are its aliases), in named steps:
:func:`make_plan` (:func:`check_settings`, the runtime, :func:`collect_inputs`,
:func:`check_output`, :func:`load_run`, the model), then in every process
:func:`robustify_process`: the model placed on the process's device, :func:`prepare_output` (rank
0 decides, before anything is written, which files exist or are resumed, and names the journals;
broadcast), :func:`run_shard` (process r of N robustifies the files at positions r, r+N, ...
under ``fabric.autocast()`` and :func:`publish_batch` writes each batch's PNGs and journal rows;
a file's seeds come from its bytes, so its PNG does not depend on the shard),
:func:`gather_records` (every record back in input order, in every process) and
:func:`write_outputs` (rank 0: the report). The input, journal, resume and report functions take
no Fabric.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import stat
import time
from collections.abc import Iterator
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
from safespot.utils.files import (
    JsonLines,
    NotRegularFile,
    discard,
    file_kind,
    json_line,
    publish,
    read_json_lines,
    read_regular,
    remove_stale_temporaries,
    stage,
    write_first_free,
)
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


def _entries(spec: Any) -> list[Any]:
    return list(spec) if isinstance(spec, ListConfig | list | tuple) else [spec]


def classify_input(path: Path, listed: bool) -> tuple[str | None, tuple[int, int] | None]:
    """``(skip reason or None, identity)`` of one input: ``None`` for a regular file to
    robustify (in a directory listing only with an image extension), else the row's status
    (``skipped: not an image``, ``skipped: not a regular file (fifo)``, ``skipped: a directory
    ...``, ``skipped: broken symbolic link``, ...). The identity ``(device, inode)`` of a regular
    file (links followed) finds duplicates. Only ``stat`` is called: a FIFO is never opened."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return ("skipped: broken symbolic link" if path.is_symlink() else "skipped: vanished"), None
    except OSError as err:
        return f"skipped: cannot be read: {err.strerror or err}", None
    if stat.S_ISDIR(info.st_mode):
        what = "a link to a directory" if path.is_symlink() else "a directory"
        return f"skipped: {what} (input directories are not read recursively)", None
    if not stat.S_ISREG(info.st_mode):
        return f"skipped: not a regular file ({file_kind(info.st_mode)})", None
    identity = (info.st_dev, info.st_ino)
    if listed and path.suffix.lower() not in IMAGE_EXTENSIONS:
        return "skipped: not an image", identity
    return None, identity


def _listing(path: Path, entry: Any) -> list[Path]:
    """The entries of an input directory, sorted (not recursive)."""
    try:
        return sorted(path.iterdir())
    except OSError as err:
        raise ConfigError(f"input={str(entry)!r} cannot be listed: {err.strerror or err}") from None


def collect_inputs(spec: Any) -> list[tuple[Path, str | None]]:
    """``(path, skip reason or None)`` for every input named by ``input``: a directory (each of
    its entries, sorted, not recursive), a file (tried whatever its extension) or a list of
    those. Every entry gets one row: files without an image extension in a directory, FIFOs,
    devices, sockets, directories inside a directory, broken links and second names of one
    file (given twice, through a link, or a hard link: ``skipped: duplicate of <first>``) are
    skipped with their reason (:func:`classify_input`)."""
    entries = _entries(spec)
    if not entries or any(e is None or not str(e).strip() for e in entries):
        raise ConfigError(f"input must be a directory, an image file or a list of them, got {spec!r}")
    found: list[tuple[Path, str | None]] = []
    first: dict[tuple[int, int], Path] = {}
    for entry in entries:
        path = Path(str(entry)).expanduser()
        if not os.path.lexists(path):
            raise ConfigError(f"input={str(entry)!r} does not exist")
        if path.is_dir():
            items = [(p, *classify_input(p, listed=True)) for p in _listing(path, entry)]
        else:
            items = [(path, *classify_input(path, listed=False))]
        for p, reason, identity in items:
            if identity is not None and identity in first:
                reason = f"skipped: duplicate of {first[identity]}"
            elif identity is not None:
                first[identity] = p
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
    entries = _entries(spec)
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


def encode_png(image: torch.Tensor) -> bytes:
    """A uint8 ``(C, H, W)`` image as lossless PNG bytes (torchvision.io)."""
    return torchvision.io.encode_png(image.detach().cpu().contiguous()).numpy().tobytes()


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

    def run(self, batch: list[dict[str, Any]], images: list[torch.Tensor], seeds: list[int]) -> list[bytes | None]:
        """Robustify and check one batch, filling in its records: the grey-box check after runs on
        x_r as decoded from its PNG bytes, which must give x_r back (lossless). Returns each
        file's PNG bytes, for :func:`publish_batch` to write (``None`` for a file that failed);
        nothing is written here."""
        x_o = torch.stack(images).to(self.device).float() / 255
        seed = torch.tensor(seeds, dtype=torch.long, device=self.device)
        with torch.no_grad():
            pred = self.net(x_o).argmax(1)
        before = self.survives(x_o, pred, derive(seed, "check_before"))
        result = self.robustifier(self.net, x_o, seeds=derive(seed, "robustify"))
        x_r = torch.round(result.x_r.detach().clamp(0, 1) * 255).to(torch.uint8).cpu()
        pngs: list[bytes | None] = [encode_png(image) for image in x_r]
        x_png = torch.stack([decode_image(png, x_r.shape[1]) for png in pngs])
        x_saved = x_png.to(self.device).float() / 255
        with torch.no_grad():
            pred_r = self.net(x_saved).argmax(1)
        after = self.survives(x_saved, result.protected.to(self.device), derive(seed, "check_after"))
        distance = self.ball.distance(x_saved, x_o)
        # the per-file fields moved to the host once per batch (not one transfer per value)
        fields = zip(
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
        for i, (record, values) in enumerate(zip(batch, fields, strict=True)):
            p, protected, survives, loss, iterations, p_r, d, survives_after = values
            record.update(
                pred=int(p),
                pred_name=self.name(int(p)),
                protected=int(protected),
                protected_name=self.name(int(protected)),
                pgd_survives_before=bool(survives),
                worst_loss=float(loss),
                iterations=int(iterations),
            )
            if not torch.equal(x_png[i], x_r[i]):
                record["status"], pngs[i] = "failed: write: the PNG decodes to another image than x_r", None
                continue
            record.update(
                status="ok", pred_robustified=int(p_r), distance=float(d), pgd_survives_after=bool(survives_after)
            )
        return pngs


def _unwritten(record: dict[str, Any], status: str) -> None:
    """A record whose PNG was not written: its status, and no check of an image that is not there."""
    record.update(status=status, pred_robustified=None, distance=None, pgd_survives_after=None)


def publish_batch(
    records: list[dict[str, Any]], pngs: list[bytes | None], digests: list[str | None], journal: JsonLines
) -> None:
    """Write a batch's PNGs and journal its rows, so that a killed run loses nothing: every PNG
    is first staged in a temporary file, then every record's row goes to the journal (flushed
    to disk; :func:`journal_row`), then each PNG is linked to its name (never replacing a file)
    and read back. A file that fails here (``failed: exists``, ``failed: write: ...``) gets a
    second row that supersedes the first; the temporary files are removed on every path out."""
    staged: dict[int, Path] = {}
    try:
        for i, (record, png) in enumerate(zip(records, pngs, strict=True)):
            if png is not None and record["status"] == "ok":
                try:
                    staged[i] = stage(Path(record["output"]), png)
                except OSError as err:
                    _unwritten(record, f"failed: write: {err.strerror or err}")
        journal.append(journal_row(r, png, d) for r, png, d in zip(records, pngs, digests, strict=True))
        failed = []
        for i, tmp in staged.items():
            record, out = records[i], Path(records[i]["output"])
            try:
                publish(tmp, out)
                if read_regular(out) != pngs[i]:
                    _unwritten(record, "failed: write: the PNG read back differs from the image written")
            except FileExistsError:
                _unwritten(record, "failed: exists")
            except OSError as err:
                _unwritten(record, f"failed: write: {err.strerror or err}")
            if record["status"] != "ok":
                failed.append(record)
        if failed:
            journal.append(journal_row(r, None, None) for r in failed)
    finally:
        for tmp in staged.values():
            discard(tmp)


def _record(path: Path, output: Path, status: str | None) -> dict[str, Any]:
    """A file's record; ``output`` is where its PNG goes (none for skipped files)."""
    record: dict[str, Any] = dict.fromkeys(FIELDS)
    record.update(input=str(path), output=None if status else str(output), status=status)
    return record


# --- the journal: per-file rows as they finish, and resuming from them -------------------
JOURNAL = re.compile(r"^journal-(?P<run>\d+)-rank(?P<rank>\d+)\.jsonl$")


def journal_row(record: dict[str, Any], png: bytes | None, input_sha256: str | None) -> dict[str, Any]:
    """A record as a journal row: its report fields and the SHA-256 of the input's bytes and of
    the PNG, which :func:`resumed_record` checks before a file is skipped as done."""
    output_sha256 = hashlib.sha256(png).hexdigest() if png is not None and record["status"] == "ok" else None
    return {**{k: record[k] for k in FIELDS}, "input_sha256": input_sha256, "output_sha256": output_sha256}


def journal_header(settings: dict[str, Any], started: str) -> dict[str, Any]:
    """The first line of a journal: the settings its rows were made with."""
    return {"journal": "safespot.robustify", "started": started, "settings": settings}


def create_journals(out: Path, world_size: int, header: dict[str, Any]) -> list[Path]:
    """This run's journal files, one per process (``journal-<run>-rank<r>.jsonl``, ``<run>`` the
    first number free for every rank, each name taken atomically), each starting with ``header``
    and its rank."""

    def names(run: int) -> list[str]:
        return [f"journal-{run}-rank{r}.jsonl" for r in range(world_size)]

    heads = [json_line({**header, "rank": r, "world_size": world_size}) for r in range(world_size)]
    return list(write_first_free(out, (names(run) for run in range(1, 100_000)), heads))


def journal_files(out: Path) -> list[Path]:
    """The journal files in ``out``, oldest run first."""
    found = [(m, p) for p in out.iterdir() if (m := JOURNAL.match(p.name))]
    return [p for m, p in sorted(found, key=lambda item: (int(item[0]["run"]), int(item[0]["rank"])))]


def finished_rows(out: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{output file name: row}`` of every file an earlier run in ``out`` finished (its last row
    in its journal says ``ok``) with these ``settings`` (the journal's header); of several, the
    latest run's. Torn lines of a killed run are left out."""
    wanted = json.loads(json.dumps(settings, default=str))
    done: dict[str, dict[str, Any]] = {}
    for path in journal_files(out):
        rows = read_json_lines(path)
        if not rows or rows[0].get("settings") != wanted:
            continue
        last = {row.get("input"): row for row in rows[1:] if "status" in row}
        for row in last.values():
            if row["status"] == "ok" and row.get("output") and row.get("output_sha256"):
                done[Path(row["output"]).name] = row
    return done


def _sha256_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(read_regular(path)).hexdigest()
    except OSError:
        return None


def resumed_record(path: Path, target: Path, row: dict[str, Any] | None) -> dict[str, Any] | None:
    """The earlier ``row`` as this input's record when it still holds: ``target`` is a regular
    file (not a link) with the PNG bytes the row names and ``path`` has the input bytes it names;
    else ``None``. The row's values are kept; its paths become this run's."""
    if row is None or target.is_symlink() or _sha256_of(target) != row["output_sha256"]:
        return None
    if _sha256_of(path) != row.get("input_sha256"):
        return None
    return {**{k: row.get(k) for k in FIELDS}, "input": str(path), "output": str(target)}


# --- the report ---------------------------------------------------------------------------
def report_names() -> Iterator[tuple[str, str]]:
    """``report.csv``/``report.json``, then ``report-1.*``, ``report-2.*``, ..."""
    yield "report.csv", "report.json"
    for k in range(1, 100_000):
        yield f"report-{k}.csv", f"report-{k}.json"


def write_report(out: Path, records: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[Path, Path]:
    """The report under the first free pair of :func:`report_names`, each name taken atomically
    (:func:`safespot.utils.files.write_first_free`): an existing file, a link (dangling or not) or
    a concurrent run's report is never overwritten and never makes the report fail."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in FIELDS} for r in records)
    payload = {"meta": meta, "summary": summarize(records), "files": records}
    contents = [buffer.getvalue().encode(), (json.dumps(payload, indent=2) + "\n").encode()]
    csv_path, json_path = write_first_free(out, report_names(), contents)
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
    skip_existing: bool = False
    meta: dict[str, Any] = field(default_factory=dict)  # the settings the outputs depend on


def check_settings(cfg: DictConfig) -> tuple[int, int]:
    """The required settings, ``resize`` and ``(batch_size, check_steps)``, each refused with a
    line naming it."""
    for key in ("input", "output"):
        if key not in cfg or OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{key} is required: python robustify.py ckpt_path=PATH input=DIR_OR_FILE output=DIR")
    if cfg.get("resize") not in RESIZE_POLICIES:
        raise ConfigError(f"resize must be one of {list(RESIZE_POLICIES)}, got {cfg.get('resize')!r}")
    if not isinstance(cfg.get("skip_existing", False), bool):
        raise ConfigError(f"skip_existing must be true or false, got {cfg.get('skip_existing')!r}")
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
        skip_existing=bool(cfg.get("skip_existing", False)),
        meta=meta,
    )
    return plan, fabric


def plan_records(
    plan: Plan, finished: dict[str, dict[str, Any]] | None = None
) -> tuple[list[dict[str, Any]], list[int], int]:
    """One record per input, the positions of the files to robustify and how many files keep an
    earlier run's row. A file whose PNG exists already (a file or a link), or whose output name
    an earlier input takes (the same stem), is ``failed: exists`` before any work, so that which
    file is written never depends on the order in which processes finish. With ``finished``
    (``skip_existing=true``: :func:`finished_rows`), a file whose PNG exists and that an earlier
    run finished keeps that run's row (:func:`resumed_record`) and is not robustified again."""
    records: list[dict[str, Any]] = []
    todo: list[int] = []
    taken: set[Path] = set()
    resumed = 0
    for path, skip in plan.inputs:
        record = _record(path, plan.out / f"{path.stem}.png", skip)
        target = plan.out / f"{path.stem}.png"
        if skip is None and target in taken:
            record["status"] = "failed: exists"
        elif skip is None and os.path.lexists(target):
            earlier = None if finished is None else resumed_record(path, target, finished.get(target.name))
            if earlier is not None:
                record, resumed = earlier, resumed + 1
            else:
                unfinished = "" if finished is None else " (no earlier run with these settings finished it)"
                record["status"] = f"failed: exists{unfinished}"
        elif skip is None:
            todo.append(len(records))
        if skip is None:
            taken.add(target)
        records.append(record)
    return records, todo, resumed


def prepare_output(
    plan: Plan, world_size: int, started: str
) -> tuple[list[dict[str, Any]], list[int], int, list[Path]]:
    """Rank 0, before any process writes: the output directory (created), the temporary files of
    killed runs removed, :func:`plan_records` (from the journals with ``skip_existing``) and this
    run's journal files; returns ``(records, todo, resumed, journals)``."""
    plan.out.mkdir(parents=True, exist_ok=True)
    for tmp in remove_stale_temporaries(plan.out):
        log.info("removed %s, left behind by a killed run", tmp)
    finished = finished_rows(plan.out, plan.meta) if plan.skip_existing else None
    records, todo, resumed = plan_records(plan, finished)
    journals = create_journals(plan.out, world_size, journal_header(plan.meta, started))
    return records, todo, resumed, journals


def read_batch(
    plan: Plan, batch: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[torch.Tensor], list[int], list[str]]:
    """The readable files of ``batch`` as ``(records, uint8 images, per-file seeds, SHA-256 of
    their bytes)``; the records of unreadable or refused files get their ``failed`` status. Only
    regular files are read (:func:`safespot.utils.files.read_regular`: a FIFO that took a file's
    place fails instead of blocking)."""
    kept, images, seeds, digests = [], [], [], []
    for record in batch:
        try:
            content = read_regular(Path(record["input"]))
            image, record["original_size"], record["resized"] = load_image(
                content, plan.channels, plan.size, plan.resize
            )
        except FileFailure as err:
            record.update(status=str(err), output=None)
            continue
        except (NotRegularFile, OSError) as err:
            record.update(status=f"failed: unreadable: {err.strerror or err}", output=None)
            continue
        kept.append(record)
        images.append(image)
        seeds.append(file_seed(plan.seed, content))
        digests.append(hashlib.sha256(content).hexdigest())
    return kept, images, seeds, digests


def robustify_batch(
    fabric: Fabric, job: _Job, batch: list[dict[str, Any]], images: list[torch.Tensor], seeds: list[int]
) -> list[bytes | None]:
    """:meth:`_Job.run` under ``fabric.autocast()``; a batch that raises a ``RuntimeError`` (e.g.
    out of memory) fails as a whole and the run goes on with the next one."""
    try:
        with fabric.autocast():
            return job.run(batch, images, seeds)
    except RuntimeError as err:
        log.exception("robustifying a batch of %d files failed", len(batch))
        for record in batch:
            if not str(record["status"] or "").startswith("failed"):
                record["status"] = f"failed: error: {str(err).splitlines()[0]}"
        return [None] * len(batch)


def run_shard(fabric: Fabric, plan: Plan, job: _Job, todo: list[dict[str, Any]], journal: JsonLines) -> None:
    """Robustify this process's share of ``todo`` (positions ``rank, rank + N, ...``) in batches
    of ``batch_size``, filling in their records; each batch's PNGs and journal rows written as
    it finishes (:func:`publish_batch`); a progress bar on rank 0."""
    mine = [todo[i] for i in shard(len(todo), fabric)]
    disable = not (plan.progress and fabric.is_global_zero)
    with tqdm(total=len(mine), desc="robustify", unit="img", disable=disable) as bar:
        for start in range(0, len(mine), plan.batch_size):
            chunk = mine[start : start + plan.batch_size]
            batch, images, seeds, digests = read_batch(plan, chunk)
            journal.append(journal_row(r, None, None) for r in chunk if r["status"] is not None)  # unreadable
            if batch:
                pngs = robustify_batch(fabric, job, batch, images, seeds)
                publish_batch(batch, pngs, digests, journal)
            bar.update(len(chunk))


def gather_records(fabric: Fabric, records: list[dict[str, Any]], todo: list[int]) -> list[dict[str, Any]]:
    """Every process's robustified records put back in input order, in every process."""
    fabric.barrier("robustify: every shard done")
    mine = [(i, records[todo[i]]) for i in shard(len(todo), fabric)]
    for i, record in enumerate(merge_positions(gather_objects(mine), len(todo))):
        records[todo[i]] = record
    return records


def write_outputs(plan: Plan, records: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """``report.csv``/``report.json`` and the summary line (rank 0). Should the report fail (a
    full disk), the error names the journals, which hold every finished file's row."""
    try:
        csv_path, json_path = write_report(plan.out, records, meta)
    except OSError:
        log.error("the report could not be written; every finished file's row is in %s", ", ".join(meta["journal"]))
        raise
    s = summarize(records)
    survival = f"{s['pgd_survives_before']}/{s['ok']} before, {s['pgd_survives_after']}/{s['ok']} after"
    kept = f" ({meta['resumed']} kept from an earlier run)" if meta.get("resumed") else ""
    rate = (s["ok"] - meta.get("resumed", 0)) / meta["seconds"] if meta.get("seconds") else float("nan")
    print(
        f"[safespot] {s['ok']} ok{kept}, {s['failed']} failed, {s['skipped']} skipped "
        f"in {meta.get('seconds', 0):.1f} s "
        f"({rate:.2f} images/s); safe-spot check (PGD-{plan.check_steps} survives): {survival}; report: {csv_path}"
    )
    log.info("report: %s, %s", csv_path, json_path)


def robustify_process(fabric: Fabric, plan: Plan) -> list[dict[str, Any]]:
    """One process of the runtime: place the model, take rank 0's records (:func:`prepare_output`),
    robustify this process's shard into its own journal, gather every record, and (rank 0) write
    the report; returns every record."""
    started, clock = datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    net = place_model(fabric, plan.net, plan.perf)
    if fabric.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has the model's input size
    job = _Job(net, plan.robustifier, plan.check, fabric.device, plan.names)
    # rank 0 decides (before any process writes) which files exist already and names the journals
    prepared = prepare_output(plan, fabric.world_size, started) if fabric.is_global_zero else None
    records, todo, resumed, journals = fabric.broadcast(prepared, src=0)
    with JsonLines(journals[fabric.global_rank]) as journal:
        run_shard(fabric, plan, job, [records[i] for i in todo], journal)
    records = gather_records(fabric, records, todo)
    if fabric.is_global_zero:
        meta = {**plan.meta, **describe_runtime(fabric), "started": started}
        meta["finished"] = datetime.now().isoformat(timespec="seconds")
        meta["seconds"] = round(time.perf_counter() - clock, 3)
        meta.update(resumed=resumed, journal=[p.name for p in journals])
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
