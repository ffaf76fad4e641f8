"""Helpers of the reduced-reproduction scripts (``scripts/reproduce_*.py``): running the
project's commands with a log of what ran and how long, finding a run's checkpoint, reading
``PRESET=DIR`` options. Each script renders its own report with :mod:`safespot.stats` intervals."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from safespot.paths import fresh_directory

ROOT = Path(__file__).resolve().parents[3]


def run_logged(cmd: list[str], log: list[str], cwd: Path = ROOT) -> float:
    """Run ``cmd`` (``[python, script, overrides...]``) in the checkout, failing on a non-zero exit;
    append the command line (the interpreter shown as ``python``, paths inside ``cwd`` relative to
    it, so a report's commands run from any checkout) and its minutes to ``log``."""
    inside = f"{cwd}{os.sep}"
    line = " ".join(["python", *(shlex.quote(c.replace(inside, "")) for c in cmd[1:])])
    print(f"$ {line}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True)
    minutes = (time.perf_counter() - start) / 60
    log.append(f"{line}    # {minutes:.1f} min")
    return minutes


def checkpoint_in(run_dir: Path, which: str) -> Path:
    """The ``last`` checkpoint of a training run, or its newest ``best-*`` one."""
    ckpts = run_dir / "checkpoints"
    found = [ckpts / "last.ckpt"] if which == "last" else sorted(ckpts.glob("best-*.ckpt"))
    if not found or not found[-1].is_file():
        raise SystemExit(f"error: no {which} checkpoint in {ckpts}")
    return found[-1]


def parse_pairs(parser: argparse.ArgumentParser, items: list[str], flag: str, allowed: Iterable[str]) -> dict[str, str]:
    """``PRESET=DIR`` options as a mapping; a malformed item or an unknown preset is a usage error."""
    allowed = list(allowed)
    pairs = dict(item.split("=", 1) for item in items if "=" in item)
    if len(pairs) != len(items) or set(pairs) - set(allowed):
        parser.error(f"{flag} takes PRESET=DIR with PRESET one of {allowed}, got {items}")
    return pairs


def new_output_dir(name: str, out: Path | None) -> Path:
    """``out``, or ``$LOG_DIR/<name>/<time>`` (default log dir ``./logs``), created; an existing
    directory is refused, so no earlier report is overwritten."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=False)
        return out
    # two reproductions started within one second get numbered directories, never a shared one
    return fresh_directory(Path(os.environ.get("LOG_DIR", ROOT / "logs")) / name, f"{datetime.now():%Y-%m-%d_%H-%M-%S}")


def write_report(out: Path, report: str, docs: Path | None) -> None:
    """``out/report.md``, and a copy at ``docs`` when given; prints where it is."""
    (out / "report.md").write_text(report)
    if docs:
        docs.write_text(report)
    print(f"report: {out / 'report.md'}")


def evaluation_parts(spec: str | Path) -> list[Path]:
    """The run directories of one evaluation: ``DIR``, or ``DIR1,DIR2,...`` when it ran in pieces
    (``data.test_part=[k,K]``, one directory per piece)."""
    return [Path(part) for part in str(spec).split(",") if part]


def check_evaluations(parser: argparse.ArgumentParser, pairs: dict[str, str], flag: str, needed: str) -> None:
    """Every reused evaluation directory of ``flag`` (each piece of a ``DIR1,DIR2`` one) holds
    ``needed`` (``records.csv``, ``results.json``); else a usage error before any work."""
    for key, spec in pairs.items():
        for folder in evaluation_parts(spec) or [Path(spec)]:
            if not (folder / needed).is_file():
                parser.error(f"{flag} {key}: no {needed} in {folder}")


def read_records(spec: str | Path) -> pd.DataFrame:
    """An evaluation's ``records.csv`` indexed by image, sorted; ``DIR1,DIR2,...`` joins the pieces
    of one evaluation run as ``data.test_part`` jobs (records are keyed and seeded by image, so the
    pieces together are the whole run's). An image in two pieces, or pieces whose fields differ,
    is an error."""
    frames = [pd.read_csv(folder / "records.csv") for folder in evaluation_parts(spec)]
    if not frames:
        raise ValueError(f"no evaluation directory in {spec!r}")
    if any(set(frame.columns) != set(frames[0].columns) for frame in frames):
        raise ValueError(f"the pieces of {spec} hold different fields: not one evaluation")
    records = pd.concat(frames, ignore_index=True)
    shared = sorted(records["index"][records["index"].duplicated()])
    if shared:
        raise ValueError(f"the pieces of {spec} share images: {shared[:5]}")
    return records.set_index("index").sort_index()


def stored_overrides(run_dir: Path) -> list[str] | None:
    """The overrides of a Hydra run as its ``.hydra/overrides.yaml`` stores them (in order, repeats
    kept), or ``None`` when the run stores none."""
    stored = Path(run_dir) / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(stored)] if stored.is_file() else None


def reused_command(run_dir: Path, script: str) -> str:
    """The command line that made a reused Hydra run, from its ``.hydra/overrides.yaml`` (marked
    as reused; its wall time is in that run's own report), or a comment naming the directory when
    the run has no stored overrides."""
    overrides = stored_overrides(run_dir)
    if overrides is None:
        return f"# reused {run_dir}"
    overrides.append(f"hydra.run.dir={run_dir}")
    return " ".join(["python", script, *(shlex.quote(o) for o in overrides)]) + "    # reused"


def effective_overrides(run_dir: Path) -> list[str] | None:
    """:func:`stored_overrides` one per key (a repeated key keeps its last value, as Hydra does)."""
    overrides = stored_overrides(run_dir)
    if overrides is None:
        return None
    last: dict[str, str] = {}
    for override in overrides:
        key = override.split("=", 1)[0]
        last.pop(key, None)
        last[key] = override
    return list(last.values())


def commands_section(commands: list[str]) -> list[str]:
    """The report's closing section: every command that ran (or the runs it reused), in order."""
    return ["## Commands", "", "```bash", *commands, "```", ""]
