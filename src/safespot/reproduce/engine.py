"""The engine: runs what a spec's report needs, keeps the records, renders the report from them.

- :func:`run_spec` runs every training and evaluation command the spec names that the output
  directory does not hold yet, one after another, logging each (command, minutes, date) in
  ``log.jsonl``; a finished run is reused, so a stopped reproduction resumes where it stopped (an
  evaluation that was interrupted is set aside and run again, a training resumes from its last
  checkpoint, :mod:`safespot.reproduce.resume`). A training run the spec's kept records hold with
  its checkpoint is evaluated from there instead of being trained again.
- :func:`adopt` takes an earlier training run, trained with the spec's settings, as one of its runs
  (a ``train.py`` run directory, or a run another reproduction's records keep).
- :func:`keep` copies the records of a finished reproduction into the spec's ``records``.
- :func:`render` renders the report from a directory of records alone.
- :func:`check` re-renders every kept report (and every generated block of the docs,
  :mod:`safespot.reproduce.blocks`) from its kept records and lists the differences.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from safespot.paths import PROJECT_ROOT
from safespot.reproduce.evidence import (
    LOG,
    Evidence,
    find_checkpoint,
    finished_file,
    piece_dirs,
    read_log,
    stored_overrides,
)
from safespot.reproduce.resume import (
    UNFINISHED,
    history,
    interrupted_runs,
    keep_unfinished,
    last_epoch,
    resume_point,
    set_aside,
    write_rows,
)
from safespot.reproduce.sections import render_section
from safespot.reproduce.spec import CHECKPOINT_REF, EvaluationRun, Spec, SpecError
from safespot.reproduce.tables import SECTION_MODULES  # noqa: F401  (registers their section kinds)
from safespot.utils.checkpoint import keep_weights, read_checkpoint
from safespot.utils.compose import compose_config

#: what is kept of each run (besides the files an evaluation names in ``files``)
KEPT_TRAIN = (".hydra/overrides.yaml",)
KEPT_EVAL = ("records.csv", "results.json", ".hydra/overrides.yaml")

Runner = Callable[[list[str], Path], None]


def render(spec: Spec, root: Path, sections: tuple[dict, ...] | None = None) -> str:
    """The report of ``spec`` from the records under ``root`` (nothing else is read)."""
    evidence = Evidence(spec, root)
    lines = [f"# {spec.title}", ""]
    for part in spec.sections if sections is None else sections:
        lines += render_section(evidence, part)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip() + "\n"


# --- running ------------------------------------------------------------------------------------
def _subprocess(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True)


def _shown(cmd: list[str], root: Path) -> str:
    """A command line as a report shows it: ``python``, paths relative to the reproduction's
    directory (or the checkout), no ``hydra.run.dir`` (each run chooses its own)."""
    shown = ["python", *cmd[1:]]
    shown = [c for c in shown if not c.startswith("hydra.run.dir=")]
    for base in (f"{root}/", f"{PROJECT_ROOT}/"):
        shown = [c.replace(base, "") for c in shown]
    return " ".join(shlex.quote(c) for c in shown)


class Reproduction:
    """One reproduction being run into ``out``."""

    def __init__(self, spec: Spec, out: Path, runner: Runner | None = None, python: str = sys.executable) -> None:
        # absolute: the commands run in the checkout, where a relative ``out`` names another folder
        self.spec, self.out, self.python = spec, Path(out).absolute(), python
        self.runner = runner or _subprocess
        self.out.mkdir(parents=True, exist_ok=True)

    def done(self) -> set[str]:
        return {entry["key"] for entry in read_log(self.out)}

    def _run(self, key: str, cmd: list[str], run_dir: Path, resumed: Path | None = None) -> None:
        """Run ``cmd`` into ``run_dir`` and log it; ``resumed``: the interrupted training it resumes
        (its ``ckpt_path``), whose metrics and minutes the finished run's join."""
        if key in self.done():
            return
        set_aside(run_dir)  # interrupted: set aside, never overwritten
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        print(f"$ {_shown(cmd, self.out)}", flush=True)
        evaluated = _ckpt_path(cmd) if key.startswith("eval/") else None
        weights = weights_digest(Path(evaluated)) if evaluated else None
        before, epoch = (history(resumed)[1], last_epoch(resumed)) if resumed is not None else (0.0, None)
        start = time.perf_counter()
        self.runner([*cmd, f"hydra.run.dir={run_dir}"], PROJECT_ROOT)
        minutes = (time.perf_counter() - start) / 60 + before
        entry = {"key": key, "command": _shown(cmd, self.out), "minutes": round(minutes, 1)}
        entry["date"] = date.today().isoformat()
        if weights is not None:
            entry["weights"] = weights
        if resumed is not None and epoch is not None:  # the training's metrics over every segment
            write_rows(history(run_dir)[0], run_dir / "metrics.csv")
            entry["resumed_after_epoch"] = epoch + 1
        with (self.out / LOG).open("a") as log:
            log.write(json.dumps(entry) + "\n")

    def checkpoint(self, evaluation: EvaluationRun) -> Path:
        """The checkpoint an evaluation runs on (:meth:`checkpoint_of` its training run)."""
        assert evaluation.run is not None
        return self.checkpoint_of(evaluation.run, evaluation.checkpoint)

    def checkpoint_of(self, key: str, which: str) -> Path:
        """The ``which`` checkpoint of training run ``key``: the one the spec's kept records hold,
        else the run's here (trained when missing, after the runs whose checkpoints it names or it
        starts from, ``init_from``)."""
        kept = self.spec.records / "train" / key if self.spec.records else None
        if kept is not None and find_checkpoint(kept, which, missing_ok=True):
            return find_checkpoint(kept, which)
        run_dir = self.out / "train" / key
        if f"train/{key}" not in self.done():
            run = self.spec.runs[key]
            overrides = self.resolved(run.overrides)
            if run.init_from is not None:  # fine-tuned from another run's best checkpoint
                overrides.append(f"init_from={self.checkpoint_of(run.init_from, 'best')}")
            set_aside(run_dir)
            point = self.resume_point(key, overrides)
            if point is not None:
                print(f"resuming train/{key} after epoch {last_epoch(point) + 1}: {shown_path(point)}", flush=True)
                overrides.append(f"ckpt_path={point / 'checkpoints' / 'last.ckpt'}")
            self._run(f"train/{key}", [self.python, "train.py", *overrides], run_dir, point)
        return find_checkpoint(run_dir, which)

    def resume_point(self, key: str, overrides: list[str]) -> Path | None:
        """The interrupted training of run ``key`` to resume (:func:`resume_point`): set aside in
        this directory, or kept unfinished in the records, trained with the settings wanted."""
        kept = self.spec.records / UNFINISHED / "train" / key if self.spec.records else None
        candidates = [*interrupted_runs(self.out / "train" / key), *([kept] if kept and kept.is_dir() else [])]
        if not candidates:
            return None
        return _latest_trained_as(candidates, overrides, self.out)

    def resolved(self, overrides: tuple[str, ...]) -> list[str]:
        """``overrides`` with every ``{checkpoint:<run>/<which>}`` replaced by that checkpoint's path."""
        return [CHECKPOINT_REF.sub(lambda m: str(self.checkpoint_of(m["run"], m["which"])), o) for o in overrides]

    def evaluate(self, evaluation: EvaluationRun, pieces: list[int] | None = None) -> None:
        base = [self.python, f"{evaluation.command}.py"]
        ckpt = [f"ckpt_path={self.checkpoint(evaluation)}"] if evaluation.run else []
        overrides = self.resolved(evaluation.overrides)
        folder = self.out / "eval" / evaluation.key
        if evaluation.pieces == 1:
            self._run(f"eval/{evaluation.key}", [*base, *ckpt, *overrides], folder)
            return
        kept = kept_pieces(self.spec, evaluation.key)
        if len(kept) == evaluation.pieces:  # kept whole: asked again, it is measured again
            kept = set()
        for k in range(evaluation.pieces) if pieces is None else pieces:
            name = f"part{k}_of_{evaluation.pieces}"
            if name in kept:  # kept by an earlier sitting of an evaluation not kept whole yet
                print(f"kept: eval/{evaluation.key}/{name} (not run again)", flush=True)
                continue
            cmd = [*base, *ckpt, *overrides, f"data.test_part=[{k},{evaluation.pieces}]"]
            self._run(f"eval/{evaluation.key}/{name}", cmd, folder / name)


def run_spec(
    spec: Spec, out: Path, only: list[str] | None = None, runner: Runner | None = None, python: str = sys.executable
) -> Path:
    """Run every evaluation of ``spec`` (or those named in ``only``: ``KEY`` or ``KEY/k`` for piece
    k) into ``out`` with the training runs they need, skipping what ``out`` holds finished; then
    render ``out/report.md`` from what is there. Returns the report's path."""
    selected = _selection(spec, only)
    reproduction = Reproduction(spec, out, runner, python)
    out = reproduction.out
    for key, pieces in selected.items():
        reproduction.evaluate(spec.evaluations[key], pieces)
    report = out / "report.md"
    evidence = Evidence(spec, out)
    if all(evidence.has(key) for key in spec.evaluations):
        report.write_text(render(spec, out))
        print(f"report: {report}")
    else:
        missing = [key for key in spec.evaluations if not evidence.has(key)]
        print(f"not every evaluation has run yet ({', '.join(missing)}): no report; run again to continue")
    return report


def _selection(spec: Spec, only: list[str] | None) -> dict[str, list[int] | None]:
    if not only:
        return {key: None for key in spec.evaluations}
    selected: dict[str, list[int] | None] = {}
    for item in only:
        key, _, piece = item.partition("/")
        if key not in spec.evaluations:
            raise SpecError(f"--only {item}: {spec.name} has no evaluation {key!r} ({sorted(spec.evaluations)})")
        if not piece:
            selected[key] = None
            continue
        if not piece.isdigit() or not 0 <= int(piece) < spec.evaluations[key].pieces:
            raise SpecError(f"--only {item}: piece must be 0..{spec.evaluations[key].pieces - 1}")
        current = selected.setdefault(key, [])
        if current is not None:
            current.append(int(piece))
    return selected


# --- adopting an earlier training run ---------------------------------------------------------
#: settings of a training run that leave the weights it trains as they are (what it logs and
#: prints, what it tests after fitting, how many processes decode the data): an earlier run that
#: differs from a spec's run only in these is that run (:func:`adopt`)
WEIGHT_NEUTRAL = (
    "tags", "wandb_group", "test", "logger", "paths", "extras",
    "data.test_subset", "data.num_workers", "data.pin_memory",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "callbacks.progress_bar", "callbacks.model_summary", "callbacks.learning_rate_monitor",
)  # fmt: skip


def _weight_settings(cfg: Any) -> dict[str, Any]:
    """``cfg`` (unresolved) without the :data:`WEIGHT_NEUTRAL` settings, as a flat dict."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if prefix.rstrip(".") in WEIGHT_NEUTRAL:
            return
        if isinstance(node, dict) and node:
            for name, value in node.items():
                walk(value, f"{prefix}{name}.")
        else:
            flat[prefix.rstrip(".")] = node

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return flat


#: the settings naming the checkpoint a training resumed from or started from
START = ("ckpt_path", "init_from")


def _without_start(overrides: list[str]) -> list[str]:
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in START]


def _training_settings(cfg: Any) -> dict[str, Any]:
    """The settings that decide a training's weights (:func:`_weight_settings`) but for the
    checkpoint it resumed from or started from: a resumed run's weights come from its checkpoint."""
    return {k: v for k, v in _weight_settings(cfg).items() if k not in START}


def _ran_settings(folder: Path, out: Path) -> dict[str, Any]:
    """:func:`_training_settings` of the training run ``folder`` as it ran: its stored config (as
    :func:`adopt` reads a run directory), else its overrides composed now."""
    config = folder / ".hydra" / "config.yaml"
    if config.is_file():
        return _training_settings(OmegaConf.load(config))
    return _training_settings(compose_config("train", _without_start(stored_overrides(folder) or []), out))


def _latest_trained_as(candidates: list[Path], overrides: list[str], out: Path) -> Path | None:
    """:func:`resume_point` among ``candidates`` whose run trained with the settings ``overrides``
    compose (:func:`_training_settings`: where it started from aside)."""
    wanted = _training_settings(compose_config("train", _without_start(overrides), out))
    return resume_point(candidates, lambda folder: _ran_settings(folder, out) == wanted)


def adopt(spec: Spec, key: str, source: Path, out: Path) -> Path:
    """Take the finished training run ``source`` as the spec's run ``key`` in the reproduction
    ``out``, instead of training it again. ``source`` is either a ``train.py`` run directory, which
    must hold its ``last`` checkpoint at its last epoch and whose stored config must equal the
    spec's run's in every setting but the :data:`WEIGHT_NEUTRAL` ones, or a run kept in another
    reproduction's records (``docs/records/<name>/train/<run>``: e.g. the reduced family's ADV
    model, which ``cifar10_linf``, ``safe_spot_aware`` and ``figure3_adv`` share), which must keep
    the checkpoints this spec evaluates and whose stored overrides must compose to the spec's
    run's settings (a kept run keeps no config). Else a :class:`SpecError` lists the differences.
    The run is copied (``source`` is left as it is) and logged with the command that trained it,
    as ``.hydra/overrides.yaml`` records it, the date and, for a run of another reproduction, the
    minutes that reproduction's log recorded."""
    if key not in spec.runs:
        raise SpecError(f"{spec.name} has no training run {key!r} ({sorted(spec.runs)})")
    source, out = Path(source), Path(out)
    if not (source / ".hydra" / "overrides.yaml").is_file():
        raise SpecError(f"{source} is not a training run directory (no .hydra/config.yaml and overrides.yaml)")
    stored = source / ".hydra" / "config.yaml"
    kept = not stored.is_file()  # a run kept in a reproduction's records
    logged = [e for e in read_log(source.parent.parent) if e.get("key") == f"train/{source.name}"]
    if kept and not logged:
        raise SpecError(
            f"{source} is not a training run directory (no .hydra/config.yaml) nor a kept run "
            f"(no train/{source.name} in {source.parent.parent / LOG})"
        )
    run = spec.runs[key]
    if run.init_from is not None or any(CHECKPOINT_REF.search(o) for o in run.overrides):
        raise SpecError(f"run {key!r} starts from another run's checkpoint: adopt that run, then train this one")
    if kept:
        wanted_checkpoints = {e.checkpoint for e in spec.evaluations.values() if e.run == key}
        if key in {r.init_from for r in spec.runs.values()}:
            wanted_checkpoints.add("best")
        absent = sorted(w for w in wanted_checkpoints if find_checkpoint(source, w, missing_ok=True) is None)
        if absent:
            raise SpecError(f"{source} keeps no {' or '.join(absent)} checkpoint, which {spec.name} evaluates")
        stamp = logged[-1].get("date") or date.today().isoformat()
    else:
        last = find_checkpoint(source, "last", missing_ok=True)
        if last is None:
            raise SpecError(f"{source} holds no last checkpoint: it has not finished training")
        epochs = OmegaConf.load(stored).trainer.get("max_epochs")
        reached = int(read_checkpoint(last, "RUN_DIR").get("epoch", -1)) + 1
        if epochs is not None and reached < int(epochs):  # last.ckpt is written every epoch
            raise SpecError(
                f"{source} has not finished training: its last checkpoint is of epoch {reached} of {epochs}"
            )
        stamp = date.fromtimestamp(last.stat().st_mtime).isoformat()
    target = out / "train" / key
    if target.exists() or f"train/{key}" in {e["key"] for e in read_log(out)}:
        raise SpecError(f"{out} already holds its run {key!r}")
    overrides = [str(o) for o in OmegaConf.load(source / ".hydra" / "overrides.yaml")]
    resumed = kept and logged[-1].get("resumed_after_epoch") is not None  # joined by the engine over its segments
    wanted = _weight_settings(compose_config("train", list(run.overrides), out))
    found = _weight_settings(
        compose_config("train", _without_start(overrides) if resumed else overrides, out)
        if kept
        else OmegaConf.load(stored)
    )
    differ = sorted(k for k in wanted.keys() | found.keys() if wanted.get(k, "<unset>") != found.get(k, "<unset>"))
    if differ:
        shown = "; ".join(
            f"{k}: {found.get(k, '<unset>')!r} there, {wanted.get(k, '<unset>')!r} in the spec" for k in differ[:6]
        )
        shown += f" (and {len(differ) - 6} more)" if len(differ) > 6 else ""
        raise SpecError(f"{source} is not {spec.name}'s run {key!r}: {shown}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target)
    entry = {
        "key": f"train/{key}",
        "command": _shown(["python", "train.py", *overrides], out),
        "minutes": logged[-1].get("minutes") if logged else None,
        "date": stamp,
        "adopted": True,
    }
    out.mkdir(parents=True, exist_ok=True)
    with (out / LOG).open("a") as log:
        log.write(json.dumps(entry) + "\n")
    return target


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = read_checkpoint(ckpt)
    return state.get("state_dict", state) if isinstance(state, dict) else {}


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def weights_digest(ckpt: Path) -> str:
    """``sha256:<hex>`` of the weights checkpoint ``ckpt`` holds (its ``state_dict``: every name,
    dtype, shape and value, in name order), not of its file: a kept checkpoint stripped of its
    training state (:func:`keep_weights`) has the digest of the one it was kept from. Logged with
    each evaluation (``weights``), so that its records name the weights they measured."""
    digest = hashlib.sha256()
    for name, value in sorted(_weights(ckpt).items()):
        if not isinstance(value, torch.Tensor):
            continue
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return f"sha256:{digest.hexdigest()}"


def _ckpt_path(cmd: list[str]) -> str | None:
    """The ``ckpt_path`` a command's overrides name (the last one), if any."""
    given = [a.split("=", 1)[1] for a in cmd if a.startswith("ckpt_path=")]
    return given[-1] if given else None


def _checkout_of(root: Path) -> Path | None:
    """The checkout whose ``docs/records/<name>`` is ``root``, if it is one."""
    for folder in (root, *root.parents):
        if folder.name == "records" and folder.parent.name == "docs":
            return folder.parent.parent
    return None


def _evaluated_checkpoint(given: str, root: Path) -> Path | None:
    """The checkpoint a stored evaluation of the reproduction ``root`` ran on (its ``ckpt_path``):
    absolute as a run leaves it, else as a kept record names it, relative to the checkout that
    keeps ``root`` (``docs/records/...``) or to ``root`` itself (``train/<run>/...``), never to
    this checkout or the working directory (another checkout's records name their own files)."""
    path = Path(given)
    if path.is_absolute():
        return path if path.is_file() else None
    checkout = _checkout_of(root)
    bases = [checkout] if checkout is not None and path.parts[:2] == ("docs", "records") else []
    for candidate in (*(base / path for base in bases), root / path):
        if candidate.is_file():
            return candidate
    return None


def adopt_evaluation(spec: Spec, key: str, source: Path, out: Path) -> Path:
    """Take an evaluation another reproduction ran (``<root>/eval/<name>``: kept in its records or
    in its output directory) as the spec's evaluation ``key`` in ``out``, instead of running it
    again. It is the same evaluation when it ran the same command with the same overrides, but for
    the checkpoint's path, on a checkpoint with the same weights as the one ``key`` evaluates (its
    training run adopted, trained or kept first), in the same pieces (``data.test_part``), each
    finished and logged; else a :class:`SpecError` says what differs. An evaluation is a function
    of its model, images, seed and settings (records are batch- and process-independent), so its
    records are this evaluation's. Copied (``source`` is left as it is) and logged with the
    commands, minutes and dates that made it, marked adopted."""
    if key not in spec.evaluations:
        raise SpecError(f"{spec.name} has no evaluation {key!r} ({sorted(spec.evaluations)})")
    evaluation, source, out = spec.evaluations[key], Path(source).resolve(), Path(out)
    root = source.parent.parent
    if source.parent.name != "eval" or not source.is_dir():
        raise SpecError(
            f"{source} is not an evaluation of a reproduction (<records or DIR>/eval/<name>, the whole "
            "evaluation, not one of its pieces)"
        )
    if any(CHECKPOINT_REF.search(o) for o in evaluation.overrides):
        raise SpecError(f"evaluation {key!r} names another run's checkpoint in its overrides: run it")
    target = out / "eval" / key
    if target.exists() or any(e["key"].split("/")[:2] == ["eval", key] for e in read_log(out)):
        raise SpecError(f"{out} already holds its evaluation {key!r}")
    dirs = piece_dirs(source)
    names = [f"part{k}_of_{evaluation.pieces}" for k in range(evaluation.pieces)]
    if (evaluation.pieces > 1 and [d.name for d in dirs] != names) or (evaluation.pieces == 1 and dirs != [source]):
        raise SpecError(f"{source} is not in the {evaluation.pieces} piece(s) evaluation {key!r} runs in")
    logged = {e["key"]: e for e in read_log(root)}
    wanted = finished_file(evaluation)
    for folder in dirs:
        name = str(folder.relative_to(root))
        if not (folder / wanted).is_file() or name not in logged:
            raise SpecError(f"{folder} has not finished (no {wanted}, or no {name} in {root / LOG})")
        script = str(logged[name].get("command", "")).split()[1:2]
        if script != [f"{evaluation.command}.py"]:
            raise SpecError(
                f"{folder} was made by {' '.join(script) or 'an unlogged command'}, not {evaluation.command}.py"
            )
        absent = [f for f in evaluation.files if not (folder / f).is_file()]
        if absent:
            raise SpecError(f"{folder} lacks {', '.join(absent)}, which {spec.name}'s evaluation {key!r} keeps")
    if evaluation.run is None:
        ours = None
    else:
        kept = spec.records / "train" / evaluation.run if spec.records is not None else None
        here = out / "train" / evaluation.run
        held = [d for d in (kept, here) if d is not None and find_checkpoint(d, evaluation.checkpoint, True)]
        if not held:
            raise SpecError(
                f"{out} holds no {evaluation.checkpoint} checkpoint of run {evaluation.run!r}: adopt or train it first"
            )
        ours = find_checkpoint(held[0], evaluation.checkpoint)
    expected = Reproduction(spec, out).resolved(evaluation.overrides)
    evaluated: dict[Path, tuple[str, str]] = {}
    for k, folder in enumerate(dirs):
        stored = stored_overrides(folder) or []
        part = [f"data.test_part=[{k},{evaluation.pieces}]"] if evaluation.pieces > 1 else []
        settings = [o for o in stored if not o.startswith("ckpt_path=")]
        if settings != [*expected, *part]:
            extra = sorted(set(settings) ^ set([*expected, *part])) or "their order"
            raise SpecError(f"{folder} is not {spec.name}'s evaluation {key!r}: its overrides differ in {extra}")
        given = [o.split("=", 1)[1] for o in stored if o.startswith("ckpt_path=")]
        if (ours is None) != (not given):
            raise SpecError(f"{folder} and {spec.name}'s evaluation {key!r} do not both evaluate a checkpoint")
        if ours is None:
            continue
        theirs = _evaluated_checkpoint(given[-1], root)
        if theirs is None:
            raise SpecError(f"{folder} evaluated {given[-1]}, which is not there to compare")
        recorded = logged[str(folder.relative_to(root))].get("weights")  # what it measured, as it ran
        if not (_same_weights(ours, theirs) if recorded is None else recorded == weights_digest(ours)):
            raise SpecError(
                f"{folder} did not evaluate the weights of {evaluation.run!r}'s {evaluation.checkpoint} checkpoint"
            )
        evaluated[folder] = (given[-1], str(theirs.resolve()))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target)
    for folder, (given_path, found) in evaluated.items():  # name the file evaluated, not a path of root's
        for name in (".hydra/overrides.yaml", "results.json"):
            copied = target / folder.relative_to(source) / name
            if copied.is_file():
                copied.write_text(copied.read_text().replace(given_path, found))
    with (out / LOG).open("a") as log:
        for folder in dirs:
            entry = logged[str(folder.relative_to(root))]
            renamed = str((target / folder.relative_to(source)).relative_to(out)) if folder != source else f"eval/{key}"
            log.write(json.dumps({**entry, "key": renamed, "adopted": True}) + "\n")
    return target


# --- keeping ------------------------------------------------------------------------------------
def _copy(source: Path, target: Path, names: tuple[str, ...]) -> None:
    for name in names:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, target / name)
        elif path.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / name)


def _carried(spec: Spec, out: Path, kept: Path) -> list[str]:
    """The runs (``train/<run>``, ``eval/<evaluation>``) the kept records hold and ``out`` does not:
    e.g. a training evaluated from its kept checkpoint, an evaluation left out with ``--only``."""
    keys = [f"train/{key}" for key in spec.runs] + [f"eval/{key}" for key in spec.evaluations]
    return [key for key in keys if (kept / key).is_dir() and not (out / key).is_dir()]


def keep(spec: Spec, out: Path, replace: bool = False, partial: bool = False) -> Path:
    """Copy the records of the finished reproduction in ``out`` into the spec's ``records`` (and
    the report, rendered from them, to the spec's ``report``). Existing kept records are replaced
    only with ``replace``; the runs they hold that ``out`` does not (a training whose kept
    checkpoint ``out`` evaluated, an evaluation ``out`` did not repeat) stay, with their log lines.

    ``partial`` keeps what ``out`` has finished of a reproduction that has not (its finished
    trainings with the checkpoints the spec keeps, its finished evaluations) and leaves the report
    a stub: the spec stays :func:`pending` until ``keep NAME DIR --only KEY`` adds the evaluations
    it lacks, each run where the kept checkpoints are (:meth:`Reproduction.checkpoint_of`)."""
    if spec.records is None or spec.report is None:
        raise SpecError(f"{spec.name} names no records / report to keep")
    target = spec.records
    occupied = target.exists() and any(target.iterdir())
    if occupied and not replace:
        raise SpecError(f"{target} already holds kept records; --replace to replace them")
    carried = _carried(spec, out, target) if occupied else []
    evidence = Evidence(spec, out)
    missing = [key for key in spec.evaluations if not evidence.has(key) and f"eval/{key}" not in carried]
    if missing and not partial:
        raise SpecError(f"{out} has not finished {spec.name}: no records for {missing} (--partial keeps what it has)")
    finished = {entry["key"] for entry in read_log(out)}
    interrupted = [key for key in spec.runs if _interrupted_training(spec, out, key)] if partial else []
    if partial and not finished and not interrupted:
        raise SpecError(f"{out} has finished no run of {spec.name}: nothing to keep")
    stage = target.with_name(f"{target.name}.keeping")
    if stage.exists():
        shutil.rmtree(stage)
    _stage(spec, out, stage, finished if partial else None)
    for key in carried:
        shutil.copytree(target / key, stage / key)
    if partial:  # unfinished trainings: out's, else those kept before (unless out finished them)
        for key in set(spec.runs) - set(_stage_unfinished(spec, out, stage, interrupted)):
            kept_before = target / UNFINISHED / "train" / key
            if kept_before.is_dir() and not (stage / "train" / key).is_dir():
                shutil.copytree(kept_before, stage / UNFINISHED / "train" / key)
    earlier = [e for e in read_log(target) if "/".join(e["key"].split("/")[:2]) in carried] if carried else []
    (stage / LOG).write_text("".join(json.dumps(e) + "\n" for e in [*earlier, *_with_weights(read_log(out), out)]))
    relative_paths(stage, {out: "", target: "", PROJECT_ROOT: ""})
    if target.exists():
        shutil.rmtree(target)
    stage.rename(target)
    _write_report(spec, target)
    return target


def _with_weights(entries: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """``entries`` of ``out``'s log, each evaluation that names a checkpoint with the digest of its
    weights (:func:`weights_digest`): a run logs it as it starts; one logged without it (by an
    earlier version of the engine) gets the digest of the checkpoint its command names as it is
    when kept."""
    done = []
    for entry in entries:
        given = _ckpt_path(shlex.split(str(entry.get("command", ""))))
        if given is not None and "weights" not in entry and str(entry.get("key")).startswith("eval/"):
            path = Path(given)  # absolute, or as _shown wrote it: relative to out or the checkout
            found = [p for p in ((path,) if path.is_absolute() else (out / path, PROJECT_ROOT / path)) if p.is_file()]
            if found:
                entry = {**entry, "weights": weights_digest(found[0])}
        done.append(entry)
    return done


def kept_evaluations(spec: Spec) -> list[str]:
    """The evaluations of ``spec`` its kept records hold."""
    if spec.records is None or not spec.records.is_dir():
        return []
    evidence = Evidence(spec, spec.records)
    return [key for key in spec.evaluations if evidence.has(key)]


def _write_report(spec: Spec, target: Path) -> None:
    """The report rendered from the kept records, unless it is a stub waiting for evaluations the
    records do not hold yet (:func:`pending`: kept with ``--partial``), which it stays."""
    assert spec.report is not None
    if not pending(spec):
        spec.report.write_text(render(spec, target))


def kept_pieces(spec: Spec, key: str) -> set[str]:
    """The pieces (``part<k>_of_<K>``) of evaluation ``key`` whose records the spec's kept
    records hold, for an evaluation run in pieces (empty otherwise)."""
    evaluation = spec.evaluations[key]
    if evaluation.pieces == 1 or spec.records is None:
        return set()
    folder = spec.records / "eval" / key
    wanted = finished_file(evaluation)
    return {
        d.name
        for d in piece_dirs(folder)
        if d != folder and d.name.endswith(f"_of_{evaluation.pieces}") and (d / wanted).is_file()
    }


def not_kept(spec: Spec) -> list[str]:
    """The evaluations of ``spec`` its kept records lack, each with how many of its pieces they
    hold when some are (``"adv (3 of 8 pieces)"``)."""
    kept = kept_evaluations(spec)
    shown = []
    for key in (k for k in spec.evaluations if k not in kept):
        held = len(kept_pieces(spec, key))
        shown.append(f"{key} ({held} of {spec.evaluations[key].pieces} pieces)" if held else key)
    return shown


def _finished_pieces(spec: Spec, out: Path, key: str) -> list[Path]:
    """The run directories of evaluation ``key`` that ``out`` logs as finished."""
    done = {entry["key"] for entry in read_log(out)}
    folder = out / "eval" / key
    if spec.evaluations[key].pieces == 1:
        return [folder] if f"eval/{key}" in done and folder.is_dir() else []
    return [d for d in piece_dirs(folder) if d != folder and f"eval/{key}/{d.name}" in done]


def keep_evaluations(spec: Spec, out: Path, keys: list[str], partial: bool = False) -> Path:
    """Add (or replace) the evaluations ``keys`` of ``out`` in the spec's kept records, leaving
    every other kept run, evaluation and log line as it is: what ``safespot-reproduce run NAME
    --only KEY --out DIR`` made, kept with ``keep NAME DIR --only KEY``. The evaluations the spec
    names that neither holds stay unmeasured (the report says so).

    An evaluation run in pieces is joined from the pieces ``out`` finished and those the kept
    records hold already (a piece in both is taken from ``out``); ``partial`` keeps its finished
    pieces before all are there (``run`` skips them until the evaluation is kept whole, and the
    report waits for the rest), so a long evaluation accumulates over sittings."""
    if spec.records is None or spec.report is None:
        raise SpecError(f"{spec.name} names no records / report to keep")
    if not out.is_dir():
        raise SpecError(f"{out} does not exist (give the --out DIR of a safespot-reproduce run)")
    target = spec.records
    if not (target.is_dir() and any(target.iterdir())):
        raise SpecError(f"{target} holds no kept records to add to: keep the whole of {out} (no --only)")
    added: dict[str, list[Path]] = {}
    for key in keys:
        if key not in spec.evaluations:
            raise SpecError(f"{spec.name} names no evaluation {key!r}; it has {sorted(spec.evaluations)}")
        added[key] = _finished_pieces(spec, out, key)
        pieces = spec.evaluations[key].pieces
        run = spec.evaluations[key].run
        if not added[key] and partial and run is not None and _interrupted_training(spec, out, run) is not None:
            continue  # nothing measured yet; its training is kept unfinished
        if not added[key]:
            raise SpecError(f"{out} has not finished evaluation {key!r} of {spec.name} (no piece of it)")
        missing = sorted(
            {f"part{k}_of_{pieces}" for k in range(pieces)} - {d.name for d in added[key]} - kept_pieces(spec, key),
            key=lambda name: int(name[4 : name.index("_")]),
        )
        if pieces > 1 and missing and not partial:
            raise SpecError(
                f"evaluation {key!r} of {spec.name} lacks {', '.join(missing)} in {out} and in the kept records "
                "(--partial keeps the pieces it has)"
            )
    stage = target.with_name(f"{target.name}.keeping")
    if stage.exists():
        shutil.rmtree(stage)
    shutil.copytree(target, stage)
    trained = [
        f"train/{run}"
        for run in {spec.evaluations[key].run for key in keys} - {None}
        if f"train/{run}" in {e["key"] for e in read_log(out)} and not (target / "train" / str(run)).is_dir()
    ]
    for run in trained:  # trained in out (the kept records held no checkpoint of it)
        _stage_training(spec, out, stage, run.split("/", 1)[1])
    if partial:
        staged = _stage_unfinished(spec, out, stage, sorted({spec.evaluations[key].run for key in keys} - {None}))
        idle = [key for key in keys if not added[key] and spec.evaluations[key].run not in staged]
        if idle:
            shutil.rmtree(stage)
            raise SpecError(f"{out} has not finished evaluation {idle[0]!r} of {spec.name}, nor a training to keep")
    replaced = set(trained)  # log keys: train/<run>, eval/<key> or eval/<key>/part<k>_of_<K>
    for key in keys:
        pieces = spec.evaluations[key].pieces
        if not added[key]:  # only its training, kept unfinished
            continue
        if pieces == 1 or not kept_pieces(spec, key):  # replaced whole (no kept piece to join)
            shutil.rmtree(stage / "eval" / key, ignore_errors=True)
            replaced.add(f"eval/{key}")
        for folder in added[key]:
            shutil.rmtree(stage / folder.relative_to(out), ignore_errors=True)
            _copy(folder, stage / folder.relative_to(out), (*KEPT_EVAL, *spec.evaluations[key].files))
            replaced.add(str(folder.relative_to(out)))

    def hit(entry: dict[str, Any]) -> bool:
        parts = entry["key"].split("/")
        return "/".join(parts[:2]) in replaced or "/".join(parts[:3]) in replaced

    entries = [e for e in read_log(target) if not hit(e)] + _with_weights([e for e in read_log(out) if hit(e)], out)
    (stage / LOG).write_text("".join(json.dumps(e) + "\n" for e in entries))
    relative_paths(stage, {out: "", target: "", PROJECT_ROOT: ""})
    shutil.rmtree(target)
    stage.rename(target)
    _write_report(spec, target)
    return target


def _stage(spec: Spec, out: Path, target: Path, finished: set[str] | None = None) -> None:
    """What is kept of the runs in ``out`` (those logged as ``finished`` when given), copied into
    ``target``."""
    target.mkdir(parents=True)
    for key in spec.runs:
        if (out / "train" / key).is_dir() and (finished is None or f"train/{key}" in finished):
            _stage_training(spec, out, target, key)
    for key, evaluation in spec.evaluations.items():
        if finished is not None and not any(k.split("/")[:2] == ["eval", key] for k in finished):
            continue
        for folder in piece_dirs(out / "eval" / key):
            if folder.is_dir() and (finished is None or str(folder.relative_to(out)) in finished):
                _copy(folder, target / folder.relative_to(out), (*KEPT_EVAL, *evaluation.files))


def _stage_training(spec: Spec, out: Path, target: Path, key: str) -> None:
    """What is kept of training run ``key`` of ``out``: its overrides and metrics, and the
    checkpoints its evaluations (and the runs starting from it) use when the spec keeps them."""
    source, run = out / "train" / key, spec.runs[key]
    _copy(source, target / "train" / key, KEPT_TRAIN)
    (target / "train" / key).mkdir(parents=True, exist_ok=True)
    for metrics in (source / "metrics.csv", source / "csv" / "metrics.csv"):  # joined over resumes, else its own
        if metrics.is_file():
            shutil.copy2(metrics, target / "train" / key / "metrics.csv")
            break
    _drop_unfinished(target, key)
    if run.keep_checkpoint:
        wanted = {e.checkpoint for e in spec.evaluations.values() if e.run == key}
        if key in {r.init_from for r in spec.runs.values()}:  # a run another starts from keeps its start
            wanted.add("best")
        for which in sorted(wanted):
            ckpt = find_checkpoint(source, which)
            keep_weights(ckpt, target / "train" / key / ckpt.relative_to(source))


def _drop_unfinished(target: Path, key: str) -> None:
    """Remove the unfinished training of run ``key`` from the records being staged in ``target``
    (its finished run is kept)."""
    folder = target / UNFINISHED / "train" / key
    if folder.is_dir():
        shutil.rmtree(folder)
    for parent in (folder.parent, folder.parent.parent):
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


def _interrupted_training(spec: Spec, out: Path, key: str) -> Path | None:
    """The latest interrupted training of run ``key`` in ``out`` (not finished there) trained with
    the spec's settings: its run directory or one set aside, whichever holds the latest last
    checkpoint."""
    if f"train/{key}" in {entry["key"] for entry in read_log(out)}:
        return None
    run_dir = out / "train" / key
    candidates = [run_dir, *interrupted_runs(run_dir)]
    if not any((folder / "checkpoints" / "last.ckpt").is_file() for folder in candidates):
        return None
    if spec.runs[key].init_from is not None or any(CHECKPOINT_REF.search(o) for o in spec.runs[key].overrides):
        return resume_point(candidates, lambda folder: True)  # its start is another run's: not composed here
    return _latest_trained_as(candidates, list(spec.runs[key].overrides), out)


def _stage_unfinished(spec: Spec, out: Path, target: Path, keys: list[str]) -> list[str]:
    """Keep in ``target`` the interrupted trainings of the runs ``keys`` that ``out`` holds and the
    staged records do not keep finished (:func:`safespot.reproduce.resume.keep_unfinished`), in
    place of those kept before; returns the runs kept so."""
    staged = []
    for key in keys:
        folder = _interrupted_training(spec, out, key)
        if (
            folder is None
            or find_checkpoint(target / "train" / key, "last", missing_ok=True)
            or (find_checkpoint(target / "train" / key, "best", missing_ok=True))
        ):
            continue
        earlier = last_epoch(target / UNFINISHED / "train" / key)
        if earlier is not None and earlier >= (last_epoch(folder) or 0):  # kept further along already
            continue
        _drop_unfinished(target, key)
        keep_unfinished(folder, target / UNFINISHED / "train" / key)
        staged.append(key)
    return staged


#: the kept text files whose contents may name paths of the machine that ran them
PATH_BEARING = (".json", ".jsonl", ".yaml")


def relative_paths(folder: Path, bases: dict[Path, str]) -> None:
    """Rewrite, in the kept text files under ``folder``, every absolute path under one of
    ``bases`` as relative to it (prefixed with the base's replacement): a run's ``ckpt_path``
    under the reproduction directory becomes ``train/<run>/checkpoints/...``, as it lies in the
    kept records, and no kept file names a directory of the machine that ran it. The most
    specific base wins."""
    prefixes = sorted(
        ((f"{base}/", to) for b, to in bases.items() for base in {str(b), str(Path(b).resolve())}),
        key=lambda pair: -len(pair[0]),
    )
    for path in sorted(folder.rglob("*")):
        if not (path.is_file() and path.suffix in PATH_BEARING):
            continue
        text = path.read_text()
        new = text
        for prefix, to in prefixes:
            new = new.replace(prefix, to)
        new = RECORDS_PATH.sub("", new)  # another checkout's kept records: relative to the checkout
        if new != text:
            path.write_text(new)


#: an absolute path in a kept text file: a directory of the machine that ran it
ABSOLUTE_PATH = re.compile(r"""(?:^|[\s"'=\[,(])(/(?:[\w.+-]+/)+[\w.+-]*)""", re.M)
#: the machine's part of a path into some checkout's kept records (``/x/y/docs/records/...``)
RECORDS_PATH = re.compile(r"""(?<![\w.+:/-])/(?:[\w.+-]+/)*?(?=docs/records/)""")


def machine_paths(folder: Path) -> list[str]:
    """``file: path`` for each kept text file under ``folder`` naming an absolute path."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in PATH_BEARING:
            match = ABSOLUTE_PATH.search(path.read_text())
            if match:
                found.append(f"{shown_path(path)}: {match[1]}")
    return found


# --- checking -----------------------------------------------------------------------------------
#: a line of a report whose measurement is being redone: until records are kept for it, the spec
#: is pending, not a failure of :func:`check_spec`
PENDING = "<!-- safespot-reproduce pending {name} -->"


def pending(spec: Spec) -> bool:
    """Whether ``spec``'s report is a stub holding the line :data:`PENDING` with the spec's name
    and its kept records (if any: ``keep --partial``) lack some evaluation."""
    if spec.report is None or not spec.report.is_file():
        return False
    if len(kept_evaluations(spec)) == len(spec.evaluations):
        return False
    marker = PENDING.format(name=spec.name)
    return any(line.strip() == marker for line in spec.report.read_text().splitlines())


def check_spec(spec: Spec) -> list[str]:
    """Differences between the kept report of ``spec`` and the one its kept records render (none
    while the spec is :func:`pending`), and every kept text file that names a directory of the
    machine that ran it (:func:`machine_paths`)."""
    if spec.records is not None and spec.records.is_dir():
        machine = [f"{spec.name}: {found} (an absolute path in a kept record)" for found in machine_paths(spec.records)]
        if machine:
            return machine
        changed = changed_weights(spec)
        if changed:
            return changed
    if spec.report is None or pending(spec):
        return []
    if spec.records is None or not spec.records.is_dir():
        return [f"{spec.name}: no kept records for {shown_path(spec.report)}"]
    rendered = render(spec, spec.records)
    kept = spec.report.read_text() if spec.report.is_file() else ""
    if rendered == kept:
        return []
    return [f"{spec.name}: {shown_path(spec.report)} differs from its records\n{_diff(kept, rendered)}"]


def changed_weights(spec: Spec) -> list[str]:
    """Each kept evaluation whose logged ``weights`` differ from those of the checkpoint its command
    names as the records keep it now (a kept checkpoint replaced after it was evaluated): its
    records no longer measure the kept model."""
    assert spec.records is not None
    digests: dict[Path, str] = {}
    found = []
    for entry in read_log(spec.records):
        given = _ckpt_path(shlex.split(str(entry.get("command", ""))))
        if given is None or "weights" not in entry:
            continue
        ckpt = _evaluated_checkpoint(given, spec.records)
        if ckpt is None:  # a checkpoint the records do not keep: nothing to compare with
            continue
        if ckpt not in digests:
            digests[ckpt] = weights_digest(ckpt)
        if digests[ckpt] != entry["weights"]:
            found.append(
                f"{spec.name}: {entry['key']} measured the weights {entry['weights'][:19]}..., "
                f"{shown_path(ckpt)} now holds {digests[ckpt][:19]}..."
            )
    return found


def shown_path(path: Path) -> str:
    """``path`` relative to the checkout when it is inside it."""
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


def _diff(kept: str, rendered: str) -> str:
    lines = difflib.unified_diff(kept.splitlines(), rendered.splitlines(), "kept", "rendered", lineterm="", n=1)
    return "\n".join(list(lines)[:40])
