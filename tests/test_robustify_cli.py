"""Robustifying image files (robustify.py): PNGs inside B_delta of the inputs, per-file
failures, no overwriting, reports, recursive inputs, the contact sheet, and the command line's
exit codes."""

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import safespot.robustification.outputs as outputs_module
from conftest import SYNTHETIC, compose_config
from safespot.errors import ConfigError
from safespot.robustification import RobustificationModule, summary_line, write_contact_sheet
from safespot.robustification.contact_sheet import BROKEN, HEADER, SURVIVES, Layout, labels, relative_name
from safespot.robustification.writer import place
from safespot.robustify_files import CIFAR10_CLASSES, any_failed, class_names, robustify_files, trainer_precision
from safespot.runs import model_input
from safespot.train import train
from safespot.utils.files import stage

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16  # the synthetic data's image size
DELTA = 8 / 255  # linf_8, the checkpoint's training threat
SMALL = ["data.n_train=256", "data.val_size=32"]  # a quick checkpoint
QUIET = "trainer.enable_progress_bar=false"
FAST = ["robustifier.max_iter=3", "robustifier.inner_steps=2", "check_steps=2", QUIET]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    cfg = compose_config("train", [*SYNTHETIC, "method=natural", "trainer.max_epochs=1", "test=false", *SMALL], out)
    _, objs = train(cfg)
    return Path(objs["trainer"].checkpoint_callback.last_model_path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / "cat.png")
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / "dog.jpg", quality=95)
    Image.fromarray(rng.integers(0, 256, (48, 32, 3), dtype=np.uint8)).save(folder / "big.jpeg")  # 32 wide, 48 high
    (folder / "corrupt.png").write_bytes(rng.bytes(300))
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def run(ckpt: Path, input_: str, output: Path, *overrides: str) -> list[dict]:
    cfg = compose_config(
        "robustify", [f"ckpt_path={ckpt}", f"input={input_}", f"output={output}", *overrides], output.parent / "run"
    )
    return robustify_files(cfg)


def original(path: Path) -> np.ndarray:
    """The model's view of an input: decoded, shorter side resized to SIZE (bilinear,
    antialiased), centre-cropped."""
    x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
    h, w = x.shape[1:]
    if (h, w) != (SIZE, SIZE):
        scale = SIZE / min(h, w)
        h, w = round(h * scale), round(w * scale)
        x = TF.resize(x, [h, w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        x = x[:, (h - SIZE) // 2 : (h - SIZE) // 2 + SIZE, (w - SIZE) // 2 : (w - SIZE) // 2 + SIZE]
    return x.permute(1, 2, 0).numpy().astype(np.int16)


def test_every_format_the_outlier_folders_read_is_robustified_too(ckpt, tmp_path):
    """One list of image extensions (safespot.data.images): TIFF and PPM files are robustified,
    not skipped as "not an image" (robustify.py kept a shorter list of its own)."""
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("scan.tif", "frame.ppm"):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / name)
    records = run(ckpt, str(folder), tmp_path / "out", *FAST)
    assert {Path(r["input"]).name: r["status"] for r in records} == {"frame.ppm": "ok", "scan.tif": "ok"}
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["contact_sheet.png", "frame.png", "scan.png"]


def test_robustify_folder_writes_pngs_within_delta_and_never_overwrites(ckpt, inputs, tmp_path):
    before = hashes(inputs)
    out = tmp_path / "out"
    records = run(ckpt, str(inputs), out, *FAST)

    status = {Path(r["input"]).name: r["status"] for r in records}
    assert status == {
        "big.jpeg": "ok",
        "cat.png": "ok",
        "corrupt.png": "failed: unreadable: not an image format PIL can read",
        "dog.jpg": "ok",
        "notes.txt": "skipped: not an image",
    }
    assert sorted(p.name for p in out.glob("*.png")) == ["big.png", "cat.png", "contact_sheet.png", "dog.png"]
    for r in records:
        if r["status"] != "ok":
            continue
        saved = Image.open(r["output"])
        assert saved.format == "PNG" and saved.mode == "RGB" and saved.size == (SIZE, SIZE)
        x_r = np.asarray(saved, dtype=np.int16)
        gap = np.abs(x_r - original(Path(r["input"]))).max()
        assert gap <= 8  # l_inf <= 8/255 on the 8-bit grid
        assert r["distance"] == pytest.approx(gap / 255, abs=1e-6) and r["distance"] <= DELTA + 1e-6
        assert r["protected"] == r["pred"] and r["iterations"] == 3
        assert isinstance(r["pgd_survives_before"], bool) and isinstance(r["pgd_survives_after"], bool)
    assert next(r for r in records if r["input"].endswith("big.jpeg"))["original_size"] == "32x48"
    assert hashes(inputs) == before  # inputs untouched

    with (out / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [Path(row["input"]).name for row in rows] == sorted(status)
    assert [row["status"] for row in rows] == [status[n] for n in sorted(status)]
    report = json.loads((out / "report.json").read_text())
    assert len(report["files"]) == 5 and report["summary"]["ok"] == 3 and report["meta"]["norm"] == "linf"

    # a second run into the same directory overwrites nothing and writes a new report
    written = hashes(out)
    again = run(ckpt, str(inputs), out, *FAST)
    assert [r["status"] for r in again if r["input"].endswith((".jpg", ".jpeg", "cat.png"))] == ["failed: exists"] * 3
    assert {k: v for k, v in hashes(out).items() if k in written} == written
    assert len(list(out.glob("report-*.csv"))) == 1 and len(list(out.glob("report-*.json"))) == 1
    assert not list(out.glob(".*"))  # no temporary files left behind
    assert hashes(inputs) == before


def test_same_stem_and_resize_refuse(ckpt, inputs, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "cat.jpg").write_bytes((inputs / "dog.jpg").read_bytes())
    files = f"[{inputs / 'cat.png'},{other / 'cat.jpg'},{inputs / 'big.jpeg'}]"
    records = run(ckpt, files, tmp_path / "out", "robustifier=none", "resize=refuse", "check_steps=1", QUIET)
    assert [r["status"] for r in records] == [
        "ok",
        f"failed: exists (same output name as {inputs / 'cat.png'})",
        "failed: size 32x48 differs from the model's input size 16x16 (resize=refuse)",
    ]
    assert records[0]["distance"] == 0 and sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "cat.png",
        "contact_sheet.png",
    ]


def test_settings_are_refused_before_any_work(ckpt, inputs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    (empty / "readme.md.ckpt").touch()
    files = [f"ckpt_path={ckpt}", f"input={inputs}", f"output={tmp_path / 'o'}"]
    cases = {
        "does not exist": [f"ckpt_path={tmp_path / 'missing.ckpt'}", f"input={inputs}", f"output={tmp_path / 'o'}"],
        "is an input directory": [f"ckpt_path={ckpt}", f"input={inputs}", f"output={inputs}"],
        "holds no image files": [f"ckpt_path={ckpt}", f"input={empty}", f"output={tmp_path / 'o'}"],
        "input=": [f"ckpt_path={ckpt}", f"input={tmp_path / 'nothing'}", f"output={tmp_path / 'o'}"],
        "output is required": [f"ckpt_path={ckpt}", f"input={inputs}"],
        "threat.eps must be > 0": [f"ckpt_path={ckpt}", f"input={inputs}", f"output={tmp_path / 'o'}", "threat.eps=0"],
        "resize must be one of": [f"ckpt_path={ckpt}", f"input={inputs}", f"output={tmp_path / 'o'}", "resize=pad"],
        "skip_existing must be true or false": [
            f"ckpt_path={ckpt}",
            f"input={inputs}",
            f"output={tmp_path / 'o'}",
            "skip_existing=maybe",
        ],
        # budgets in 8-bit levels (8 meant as 8/255) or beyond the image's diagonal (3x16x16: 27.71)
        "threat.eps=8 is above 1 for norm linf": [*files, "threat.eps=8"],
        "robustifier.delta=8 is above 1 for norm linf": [*files, "robustifier.delta=8"],
        "robustifier.delta=30 is above 27.71 for norm l2": [
            *files,
            "threat.norm=l2",
            "threat.eps=0.5",
            "robustifier.delta=30",
        ],
        # checkpoints that cannot be read, each with its reason
        "is a directory, not a checkpoint file": [f"ckpt_path={tmp_path}", *files[1:]],
        "is an empty file, not a checkpoint": [f"ckpt_path={empty / 'readme.md'}.ckpt", *files[1:]],
        "is not a readable checkpoint": [f"ckpt_path={empty / 'readme.md'}", *files[1:]],
        # the trainer: precisions that cast the weights, inference mode, what Lightning refuses
        "trainer.precision must be one of": [*files, "trainer.precision=bf16-true"],
        "trainer.inference_mode must be false": [*files, "trainer.inference_mode=true"],
        "trainer (trainer.accelerator=cpu, trainer.devices=0": [*files, "trainer.accelerator=cpu", "trainer.devices=0"],
        "num_workers must be an integer >= 0": [*files, "num_workers=-1"],
        "recursive must be true or false": [*files, "recursive=deep"],
        "contact_sheet must be true or false": [*files, "contact_sheet=yes"],
        # recursive: the output inside an input directory would be read by the next run
        "is inside the input directory": [
            f"ckpt_path={ckpt}",
            f"input={inputs}",
            f"output={inputs / 'robust'}",
            "recursive=true",
        ],
    }
    for message, overrides in cases.items():
        cfg = compose_config("robustify", overrides, tmp_path / "run")
        with pytest.raises(ConfigError, match=re.escape(message)):
            robustify_files(cfg)
    assert not (tmp_path / "o").exists() and not (inputs / "robust").exists()


def test_input_size_and_class_names_come_from_the_checkpoint_config():
    cifar = OmegaConf.create({"data": {"_target_": "safespot.data.CIFAR10DataModule", "num_classes": 10}})
    assert model_input(cifar) == (3, 32) and class_names(cifar)[0] == "airplane" and class_names(cifar)[9] == "truck"
    folder = OmegaConf.create({"data": {"_target_": "safespot.data.ImageFolderDataModule", "image_size": 64}})
    assert model_input(folder) == (3, 64) and class_names(folder) is None


def test_cli_exit_codes(ckpt, inputs, tmp_path):
    def cli(*args: str) -> subprocess.Popen:
        cmd = [sys.executable, "robustify.py", f"paths.log_dir={tmp_path / 'logs'}", QUIET, *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the two processes share the cores
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    fast = ["robustifier=none", "check_steps=1"]
    failing = cli(f"ckpt_path={ckpt}", f"input={inputs}", f"output={tmp_path / 'out'}", *fast)
    missing = cli(f"ckpt_path={tmp_path / 'missing.ckpt'}", f"input={inputs}", f"output={tmp_path / 'out2'}")
    stdout, stderr = failing.communicate(timeout=120)
    assert failing.returncode == 1, stderr[-2000:]
    assert "3 ok, 1 failed, 1 skipped" in stdout and (tmp_path / "out" / "cat.png").is_file()
    assert "images/s" in stdout and "safe-spot check (PGD-1 survives)" in stdout  # speed and check in one line
    assert f"; contact sheet: {tmp_path / 'out' / 'contact_sheet.png'}" in stdout
    _, stderr = missing.communicate(timeout=120)
    assert missing.returncode == 2
    assert stderr.strip() == f"error: ckpt_path='{tmp_path / 'missing.ckpt'}' does not exist"
    assert not (tmp_path / "out2").exists()


def test_bf16_robustification_writes_images_inside_the_ball(ckpt, inputs, tmp_path):
    records = run(ckpt, str(inputs / "cat.png"), tmp_path / "out", *FAST, "trainer.precision=bf16-mixed")
    assert [r["status"] for r in records] == ["ok"]
    saved = np.asarray(Image.open(tmp_path / "out" / "cat.png"), dtype=np.int16)
    assert np.abs(saved - original(inputs / "cat.png")).max() <= round(DELTA * 255)
    with pytest.raises(ConfigError, match="precision"):
        run(ckpt, str(inputs / "cat.png"), tmp_path / "bad", *FAST, "trainer.precision=fp8")
    assert not (tmp_path / "bad").exists()


TWO_CPU_PROCESSES = ["trainer=ddp_sim"]


def tree(folder: Path) -> dict[str, str]:
    """``{path relative to folder: SHA-256}`` of every file under ``folder``."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


NESTED = ["img0.png", "img1.png", "other/img5.png", "sub/deeper/img4.png", "sub/img2.png", "sub/img3.png"]


def test_two_processes_write_the_pngs_and_report_rows_of_one(ckpt, tmp_path):
    """The files of a tree (recursive=true) sharded over two ddp_spawn processes (each file
    robustified once, by position) give the same PNG bytes at the same relative paths, the same
    report rows and the same contact sheet as one process: the per-file seeds come from the file's
    bytes, rank 0 writes the gathered report in input order and draws the sheet from it, and either
    process creates the directories it needs (both need sub/). Each process journals its own
    files; a one-process rerun with skip_existing=true reads both journals, keeps every row and
    draws the same sheet under the next name."""
    folder = tmp_path / "six"
    rng = np.random.default_rng(1)
    for i in range(6):
        name = next(n for n in NESTED if n.endswith(f"img{i}.png"))
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / name)
    nested = [*FAST, "recursive=true"]
    one = run(ckpt, str(folder), tmp_path / "one", *nested, "trainer=cpu")
    two = run(ckpt, str(folder), tmp_path / "two", *nested, *TWO_CPU_PROCESSES)

    assert [r["status"] for r in one] == ["ok"] * 6
    journals = ["journal-1-rank0.jsonl", "journal-1-rank1.jsonl"]
    assert sorted(tree(tmp_path / "two")) == sorted([*tree(tmp_path / "one"), journals[1]])
    assert [len(journal_rows(tmp_path / "two" / j)) for j in journals] == [3, 3]  # positions 0, 2, 4 and 1, 3, 5
    pngs = sorted(n for n in tree(tmp_path / "one") if n.endswith(".png"))
    assert pngs == sorted([*NESTED, "contact_sheet.png"])
    assert {n: tree(tmp_path / "two")[n] for n in pngs} == {n: tree(tmp_path / "one")[n] for n in pngs}

    def rows(out: Path) -> list[dict]:
        with (out / "report.csv").open() as f:
            table = list(csv.DictReader(f))
        for row in table:  # the output directories differ; the relative paths must not
            row["output"] = Path(row["output"]).relative_to(out).as_posix()
        return table

    # worst_loss is a float of a batched forward pass (a batch of 6 here, two of 3 there): equal up to
    # float rounding in general, bit-equal in practice; every other column is compared exactly
    rows_one, rows_two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["output"] for r in rows_one] == NESTED  # input order: each subdirectory in its place
    assert [{k: v for k, v in r.items() if k != "worst_loss"} for r in rows_two] == [
        {k: v for k, v in r.items() if k != "worst_loss"} for r in rows_one
    ]
    assert [float(r["worst_loss"]) for r in rows_two] == pytest.approx([float(r["worst_loss"]) for r in rows_one])
    assert [Path(r["input"]).name for r in two] == [Path(r["input"]).name for r in one]  # returned in input order

    meta_one = json.loads((tmp_path / "one" / "report.json").read_text())["meta"]
    meta_two = json.loads((tmp_path / "two" / "report.json").read_text())["meta"]
    assert (meta_one["world_size"], meta_two["world_size"]) == (1, 2)
    differ = {"world_size", "strategy", "started", "finished", "seconds", "journal"}
    assert {k: v for k, v in meta_two.items() if k not in differ} == {
        k: v for k, v in meta_one.items() if k not in differ
    }
    assert not list((tmp_path / "two").rglob(".*")) and not list((tmp_path / "two").glob("report-*"))

    written = tree(tmp_path / "two")
    again = run(ckpt, str(folder), tmp_path / "two", *nested, "trainer=cpu", "skip_existing=true")
    assert [r["status"] for r in again] == ["ok"] * 6
    assert report_rows(tmp_path / "two" / "report-1.csv") == report_rows(tmp_path / "two" / "report.csv")
    assert {n: tree(tmp_path / "two")[n] for n in written} == written
    assert json.loads((tmp_path / "two" / "report-1.json").read_text())["meta"]["resumed"] == 6
    assert tree(tmp_path / "two")["contact_sheet-1.png"] == written["contact_sheet.png"]


@pytest.mark.slow
def test_two_processes_with_fewer_files_to_do_than_processes(ckpt, tmp_path):
    """One file on two processes, then a rerun with nothing left to do: every process still runs
    the predict loop (placeholders fill its share), so the records are gathered and the report
    written; the rerun refuses the existing PNG and writes the next report."""
    folder = noise_folder(tmp_path / "in", 1)
    out = tmp_path / "out"
    quick = ["robustifier=none", "check_steps=1", QUIET, *TWO_CPU_PROCESSES]
    assert [r["status"] for r in run(ckpt, str(folder), out, *quick)] == ["ok"]
    assert [r["status"] for r in run(ckpt, str(folder), out, *quick)] == ["failed: exists"]
    assert [len(report_rows(out / name)) for name in ("report.csv", "report-1.csv")] == [1, 1]
    assert sorted(p.name for p in out.glob("journal-*")) == [
        f"journal-{n}-rank{r}.jsonl" for n in (1, 2) for r in (0, 1)
    ]
    assert [row["status"] for row in journal_rows(out)] == ["ok"]  # the rerun robustified nothing


def test_the_command_defaults_to_the_fast_search_and_names_the_paper_schedule(tmp_path):
    """robustify.py robustifies with early exit and compaction (same safe-spot rate, 17x the
    images/s on the quickstart model) and bf16 on a CUDA GPU; the paper's fixed schedule is
    ``robustifier=sfull_paper``."""
    base = ["ckpt_path=x", "input=x", f"output={tmp_path}"]
    fast = compose_config("robustify", base, tmp_path / "a")
    paper = compose_config("robustify", [*base, "robustifier=sfull_paper"], tmp_path / "b")
    assert fast.robustifier.early_exit == 5 and fast.robustifier.active_batch == 64
    assert paper.robustifier.early_exit is None and paper.robustifier.max_iter == 100
    assert paper.robustifier.inner_steps == 20 and paper.robustifier.quantize is True
    assert (
        fast.trainer.precision == "auto" and trainer_precision({"precision": "auto", "accelerator": "cpu"}) == "32-true"
    )


def noise_folder(folder: Path, n: int, seed: int = 2) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def report_rows(path: Path) -> list[dict]:
    """The rows of a report.csv with the output column reduced to its file name."""
    with path.open() as f:
        table = list(csv.DictReader(f))
    for row in table:
        row["output"] = Path(row["output"]).name if row["output"] else ""
    return table


def journal_rows(where: Path) -> list[dict]:
    """The rows (after the header) of a journal file, or of every journal file in a directory."""
    paths = sorted(where.glob("journal-*.jsonl")) if where.is_dir() else [where]
    return [json.loads(line) for p in paths for line in p.read_text().splitlines()[1:]]


def test_an_interrupted_run_resumes_with_skip_existing(ckpt, tmp_path, monkeypatch):
    """A run interrupted at its 3rd file has journalled the 2 files it finished; the rerun with
    skip_existing=true keeps their rows, robustifies only the other 2 and writes a report with
    every file: the rows and PNG bytes of an uninterrupted run."""
    folder = noise_folder(tmp_path / "in", 4)
    one_by_one = [*FAST, "batch_size=1"]
    run(ckpt, str(folder), tmp_path / "full", *one_by_one)

    calls, interrupt = [], [3]  # the batch (of one file) to interrupt at, once
    robustify = RobustificationModule.robustify

    def interrupted_at_the_third(self, images, seeds):
        calls.append(len(images))
        if len(calls) in interrupt:
            interrupt.clear()
            raise KeyboardInterrupt
        return robustify(self, images, seeds)

    out = tmp_path / "out"
    monkeypatch.setattr(RobustificationModule, "robustify", interrupted_at_the_third)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's answer to Ctrl-C: a graceful shutdown, exit status 1
            run(ckpt, str(folder), out, *one_by_one)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C while it shuts down
    assert sorted(p.name for p in out.glob("*.png")) == ["img0.png", "img1.png"]
    assert not list(out.glob("report*")) and not list(out.glob(".*"))
    earlier = {row["input"]: row for row in journal_rows(out)}
    assert [Path(i).name for i in earlier] == ["img0.png", "img1.png"]

    calls.clear()
    records = run(ckpt, str(folder), out, *one_by_one, "skip_existing=true")
    assert calls == [1, 1]  # only the 2 unfinished files are robustified again
    assert not any_failed(records) and [r["status"] for r in records] == ["ok"] * 4
    rows = report_rows(out / "report.csv")
    assert rows == report_rows(tmp_path / "full" / "report.csv")
    for row in rows[:2]:  # the earlier rows' values, as journalled
        journalled = earlier[row["input"]]
        assert {k: str(journalled[k]) for k in ("distance", "worst_loss", "pred", "pgd_survives_after")} == {
            k: row[k] for k in ("distance", "worst_loss", "pred", "pgd_survives_after")
        }
    pngs = [f"img{i}.png" for i in range(4)]
    assert {n: hashes(out)[n] for n in pngs} == {n: hashes(tmp_path / "full")[n] for n in pngs}
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["resumed"] == 2 and report["summary"]["ok"] == 4
    assert not list(out.glob(".*"))


def test_skip_existing_keeps_only_files_an_earlier_run_finished_with_these_settings(ckpt, tmp_path):
    """A PNG changed after its run, or one made with other settings, is not taken for done: it
    stays ``failed: exists`` (never overwritten); without skip_existing every PNG is refused."""
    folder = noise_folder(tmp_path / "in", 3)
    out = tmp_path / "out"
    quick = ["robustifier=none", "check_steps=1", QUIET]
    run(ckpt, str(folder), out, *quick)
    (out / "img1.png").write_bytes((out / "img2.png").read_bytes())
    refused = "failed: exists (no earlier run with these settings finished it)"

    assert [r["status"] for r in run(ckpt, str(folder), out, *quick)] == ["failed: exists"] * 3
    assert [r["status"] for r in run(ckpt, str(folder), out, *quick, "skip_existing=true")] == ["ok", refused, "ok"]
    assert [r["status"] for r in run(ckpt, str(folder), out, *quick, "seed=1", "skip_existing=true")] == [refused] * 3
    assert (out / "img1.png").read_bytes() == (out / "img2.png").read_bytes()


def test_every_input_gets_a_row(ckpt, tmp_path):
    """Duplicates (a file given twice, a link to it: the first name in input order is robustified),
    FIFOs (never opened), devices, directories, links to directories and broken links each get a
    row saying why they were skipped."""
    folder = noise_folder(tmp_path / "in", 1)
    (folder / "link.png").symlink_to(folder / "img0.png")
    (folder / "broken.png").symlink_to(folder / "missing.png")
    (folder / "sub").mkdir()
    (folder / "sub-link").symlink_to(folder / "sub")
    os.mkfifo(folder / "pipe.png")
    fifo = tmp_path / "lone.png"
    os.mkfifo(fifo)
    inputs = f"[{folder},{folder / 'img0.png'},/dev/null,{fifo}]"
    records = run(ckpt, inputs, tmp_path / "out", "robustifier=none", "check_steps=1", QUIET)
    first = folder / "img0.png"
    assert [(r["input"], r["status"]) for r in records] == [
        (str(folder / "broken.png"), "skipped: broken symbolic link"),
        (str(first), "ok"),
        (str(folder / "link.png"), f"skipped: duplicate of {first}"),
        (str(folder / "pipe.png"), "skipped: not a regular file (fifo)"),
        (str(folder / "sub"), "skipped: a directory (input directories are not read recursively)"),
        (str(folder / "sub-link"), "skipped: a link to a directory (input directories are not read recursively)"),
        (str(first), f"skipped: duplicate of {first}"),
        ("/dev/null", "skipped: not a regular file (character device)"),
        (str(fifo), "skipped: not a regular file (fifo)"),
    ]
    assert len(report_rows(tmp_path / "out" / "report.csv")) == 9


def test_report_names_never_follow_a_link_nor_fail_after_the_work(ckpt, inputs, tmp_path):
    """A dangling ``report.csv`` link and a ``report-1.json`` link to a file: the report goes to
    ``report-2.*``, the links and their target untouched; a temporary file a killed run left
    behind is removed at the start."""
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.json"
    victim.write_text("keep")
    (out / "report.csv").symlink_to(tmp_path / "nowhere.csv")
    (out / "report-1.json").symlink_to(victim)
    child = subprocess.Popen(["true"])
    child.wait()
    left = stage(out / "cat.png", b"half a PNG")
    stale = left.rename(out / left.name.replace(f".{os.getpid()}.", f".{child.pid}."))
    records = run(ckpt, str(inputs / "cat.png"), out, "robustifier=none", "check_steps=1", QUIET)
    assert [r["status"] for r in records] == ["ok"]
    assert (out / "report-2.csv").is_file() and (out / "report-2.json").is_file()
    assert victim.read_text() == "keep" and not (out / "report.csv").exists() and (out / "report.csv").is_symlink()
    assert not os.path.lexists(out / "report-1.csv") and not os.path.lexists(stale)


def test_a_png_name_taken_while_writing_is_refused_and_superseded_in_the_journal(ckpt, inputs, tmp_path, monkeypatch):
    """Rows go to the journal before the PNGs get their names; a name another run takes in
    between makes the file ``failed: exists`` (the other file kept), with a second journal row
    that supersedes the first, so a resumed run does not take the other file for this one."""
    link = outputs_module.publish

    def racing(tmp, path):
        path.write_bytes(b"another run's")
        link(tmp, path)

    out = tmp_path / "out"
    monkeypatch.setattr(outputs_module, "publish", racing)
    quick = ["robustifier=none", "check_steps=1", QUIET]
    records = run(ckpt, str(inputs / "cat.png"), out, *quick)
    assert [(r["status"], r["pred_robustified"]) for r in records] == [("failed: exists", None)]
    assert [(row["status"], row["output_sha256"] is None) for row in journal_rows(out)] == [
        ("ok", False),
        ("failed: exists", True),
    ]
    assert (out / "cat.png").read_bytes() == b"another run's" and not list(out.glob(".*"))
    monkeypatch.undo()
    again = run(ckpt, str(inputs / "cat.png"), out, *quick, "skip_existing=true")
    assert [r["status"] for r in again] == ["failed: exists (no earlier run with these settings finished it)"]


def test_gathered_records_take_each_file_to_do_exactly_once():
    """The writer puts every process's records back by input position, refusing a file robustified
    twice, one not to be robustified, and one that no process robustified."""
    records = [{"input": "a"}, {"input": "b", "status": "skipped: not an image"}, {"input": "c"}]
    place(records, [0, 2], [[(0, {"input": "a", "status": "ok"})], [(2, {"input": "c", "status": "ok"})]])
    assert [r.get("status") for r in records] == ["ok", "skipped: not an image", "ok"]
    with pytest.raises(RuntimeError, match="input 0 was robustified by two processes"):
        place(list(records), [0], [[(0, {})], [(0, {})]])
    with pytest.raises(RuntimeError, match="input 1 was robustified by two processes or was not to be"):
        place(list(records), [0], [[(0, {}), (1, {})]])
    with pytest.raises(RuntimeError, match=r"inputs \[2\] were robustified by no process"):
        place(list(records), [0, 2], [[(0, {})], []])


def test_recursive_inputs_keep_their_tree_collisions_and_links_get_rows_and_resume(ckpt, tmp_path):
    """recursive=true: each PNG keeps its input's relative path (directories created as needed);
    two inputs of one output name (a.jpg, a.png; also in a subdirectory) follow the flat rule, the
    first in input order is written and the other is ``failed: exists (same output name as
    <first>)``; a directory whose output is another input's PNG, and an output directory that is a
    link, are refused before any work; a link to a directory is not followed. The journals name
    each PNG by its relative path, so skip_existing keeps one/x.png and two/x.png apart."""
    folder = tmp_path / "in"
    rng = np.random.default_rng(3)
    names = ["a.jpg", "a.png", "blocked/q.png", "clash.jpg", "clash.png/z.png", "one/x.png", "one/y.jpg"]
    names += ["one/y.png", "two/x.png"]
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / name)
    (folder / "linked").symlink_to(folder / "one")
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "blocked").symlink_to(elsewhere)  # a PNG never goes through a link
    quick = ["robustifier=none", "check_steps=1", QUIET, "recursive=true"]

    records = run(ckpt, str(folder), out, *quick)
    assert [(Path(r["input"]).relative_to(folder).as_posix(), r["status"]) for r in records] == [
        ("a.jpg", "ok"),
        ("a.png", f"failed: exists (same output name as {folder / 'a.jpg'})"),
        ("blocked/q.png", f"failed: exists ({out / 'blocked'} is a symbolic link, not followed)"),
        ("clash.jpg", "ok"),
        ("clash.png/z.png", f"failed: exists ({out / 'clash.png'} is the output of {folder / 'clash.jpg'})"),
        ("linked", "skipped: a link to a directory (links to directories are not followed)"),
        ("one/x.png", "ok"),
        ("one/y.jpg", "ok"),
        ("one/y.png", f"failed: exists (same output name as {folder / 'one' / 'y.jpg'})"),
        ("two/x.png", "ok"),
    ]
    written = ["a.png", "clash.png", "contact_sheet.png", "one/x.png", "one/y.png", "two/x.png"]
    assert sorted(n for n in tree(out) if n.endswith(".png")) == written and not list(elsewhere.iterdir())
    ok = [r for r in records if r["status"] == "ok"]
    assert [Path(r["output"]).relative_to(out).as_posix() for r in ok] == ["a.png", "clash.png", "one/x.png",
                                                                             "one/y.png", "two/x.png"]  # fmt: skip
    assert [r["output"] for r in report_rows(out / "report.csv") if r["status"] == "ok"] == [
        "a.png", "clash.png", "x.png", "y.png", "x.png",
    ]  # fmt: skip
    assert [row["output_name"] for row in journal_rows(out) if row["status"] == "ok"] == [
        "a.png", "clash.png", "one/x.png", "one/y.png", "two/x.png",
    ]  # fmt: skip
    for r in ok:  # robustifier=none: each PNG is its own input's image
        assert np.array_equal(np.asarray(Image.open(r["output"]), dtype=np.int16), original(Path(r["input"])))

    before = tree(out)
    resumed = run(ckpt, str(folder), out, *quick, "skip_existing=true")
    assert [r["status"] for r in resumed] == [r["status"] for r in records]
    assert json.loads((out / "report-1.json").read_text())["meta"]["resumed"] == 5
    refused = run(ckpt, str(folder), out, *quick)
    assert [r["status"] for r in refused if r["status"] == "failed: exists"] == ["failed: exists"] * 5
    assert {n: tree(out)[n] for n in before} == before and not list(out.rglob(".*"))


def test_the_contact_sheet_shows_each_ok_file_before_and_after(ckpt, inputs, tmp_path, capsys):
    """One tile per ok file, in input order (the corrupt and the skipped file have none): the
    original as the model saw it and the PNG as written, each upscaled 6 times by nearest
    neighbour (16 x 16 images), framed green when the PNG survives the check and red when not.
    An existing contact_sheet.png is never overwritten (the sheet takes the next name); the
    summary names it; contact_sheet=false writes none."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "contact_sheet.png").write_bytes(b"an earlier sheet")
    records = run(ckpt, str(inputs), out, *FAST)
    assert (out / "contact_sheet.png").read_bytes() == b"an earlier sheet"
    assert f"; contact sheet: {out / 'contact_sheet-1.png'}" in capsys.readouterr().out

    ok = [r for r in records if r["status"] == "ok"]
    assert [Path(r["input"]).name for r in ok] == ["big.jpeg", "cat.png", "dog.jpg"]
    assert any(r["distance"] > 0 for r in ok)  # the robustified images differ from the originals
    layout = Layout.of(SIZE, len(ok))
    assert (layout.scale, layout.columns) == (6, 3)
    sheet = np.asarray(Image.open(out / "contact_sheet-1.png").convert("RGB"))
    width, height = layout.tile
    assert (sheet.shape[1], sheet.shape[0]) == layout.page_size(3) == (8 + 3 * (width + 8), HEADER + 8 + height + 8)

    def upscaled(image: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(image.astype(np.uint8), 6, axis=0), 6, axis=1)

    side = SIZE * 6
    for i, r in enumerate(ok):
        (ox, oy), (rx, ry) = layout.images(i)
        assert np.array_equal(sheet[oy : oy + side, ox : ox + side], upscaled(original(Path(r["input"]))))
        assert np.array_equal(sheet[ry : ry + side, rx : rx + side], upscaled(np.asarray(Image.open(r["output"]))))
        x, y = layout.origin(i)
        assert tuple(sheet[y, x]) == (SURVIVES if r["pgd_survives_after"] else BROKEN)
        label = sheet[oy + side + 4 : y + height - 4, x + 4 : x + width - 4]
        assert (label.min(axis=2) < 128).any()  # text under the images

    run(
        ckpt,
        str(inputs / "cat.png"),
        tmp_path / "off",
        "robustifier=none",
        "check_steps=1",
        QUIET,
        "contact_sheet=false",
    )
    assert not list((tmp_path / "off").glob("contact_sheet*")) and "contact sheet" not in capsys.readouterr().out


def test_a_sheet_of_several_pages_and_its_labels(ckpt, inputs, tmp_path):
    """More ok files than fit a page: contact_sheet-page1.png, -page2.png, ... with the same
    columns; drawn again, the pages take the next free names. A tile's lines: the file's name
    relative to its input directory (its original size when resized), the prediction as class
    names and the check before -> after."""
    out = tmp_path / "out"
    run(ckpt, str(inputs), out, "robustifier=none", "check_steps=1", QUIET, "contact_sheet=false")
    report = json.loads((out / "report.json").read_text())
    first = write_contact_sheet(out, report["files"], report["meta"], per_page=2)
    assert [p.name for p in first] == ["contact_sheet-page1.png", "contact_sheet-page2.png"]
    pages = [np.asarray(Image.open(p).convert("RGB")) for p in first]
    layout = Layout.of(SIZE, 2)
    assert [(page.shape[1], page.shape[0]) for page in pages] == [layout.page_size(2), layout.page_size(1)]
    (ox, oy), _ = layout.images(0)
    dog = next(r for r in report["files"] if r["input"].endswith("dog.jpg"))
    assert np.array_equal(pages[1][oy : oy + SIZE * 6, ox : ox + SIZE * 6],
                          np.repeat(np.repeat(original(Path(dog["input"])).astype(np.uint8), 6, 0), 6, 1))  # fmt: skip
    again = write_contact_sheet(out, report["files"], report["meta"], per_page=2)
    assert [p.name for p in again] == ["contact_sheet-1-page1.png", "contact_sheet-1-page2.png"]
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in first]

    record = {"input": str(inputs / "sub" / "big.jpeg"), "output": str(out / "sub" / "big.png"), "status": "ok"}
    record |= {"original_size": "32x48", "resized": True, "pred": 3, "pred_name": "cat", "pred_robustified": 5}
    record |= {"pgd_survives_before": False, "pgd_survives_after": True}
    name = relative_name(record, out)
    assert name == "sub/big.jpeg"
    assert labels(record, name, CIFAR10_CLASSES) == (
        "sub/big.jpeg (32x48)",
        "pred: cat -> dog",
        "PGD: broken -> survives",
    )
    assert summary_line(report, out / "report.csv", 1, first).endswith(
        f"; contact sheet: {first[0]} ... contact_sheet-page2.png (2 pages)"
    )
