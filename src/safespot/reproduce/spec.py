"""A reproduction as a spec: the runs it needs and the report it renders from their records.

A spec is ``conf/reproduce/<name>.yaml``::

    title: "Paper 002, smoothed networks (Tables 5 and 7), reduced"
    report: docs/reproduction_smoothed.md   # the kept report (relative to the checkout)
    records: docs/records/smoothed          # the kept records of its runs
    smallest_effect: 0.01                   # a claim "a beats b" is about gains of at least this
    include: [_cifar10_common]              # optional: partials (conf/reproduce/_NAME.yaml) merged under it
    runs:                                   # training runs: train.py with these overrides
      gaussian_0.1: {overrides: [experiment=cifar10_gaussian, scale=reduced, method.sigma=0.1]}
    evaluations:                            # evaluate.py / ood.py on a run's checkpoint
      table5:
        run: gaussian_0.1
        checkpoint: best                    # best | last
        pieces: 8                           # optional: 8 data.test_part jobs, joined as one run
        overrides: [threat=l2_0.5, ...]
    sections:                               # the report, top to bottom (safespot.reproduce.sections)
      - {kind: text, text: "..."}
      - {kind: accuracy_table, ...}

An override may name the checkpoint of another run of the spec as ``{checkpoint:<run>/<best|last>}``,
e.g. ``init_from={checkpoint:preemptive/last}`` (a run fine-tuned from another) or
``detector.oe.ckpt_path={checkpoint:oe/best}`` (an evaluation that also uses a second model); the
engine runs that run first and puts its checkpoint's path there.

Every run of a spec lives in ``<root>/train/<run>/`` or ``<root>/eval/<evaluation>/`` (pieces in
``part<k>_of_<K>/`` below it); the root is the engine's output directory while it runs and the
spec's ``records`` once kept. :mod:`safespot.reproduce.engine` runs what is missing,
:mod:`safespot.reproduce.evidence` reads a root, :mod:`safespot.reproduce.sections` renders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from safespot.errors import ConfigError
from safespot.paths import CONFIG_DIR, PROJECT_ROOT

COMMANDS = ("evaluate", "ood")
CHECKPOINTS = ("best", "last")
#: an override's reference to the checkpoint of a run of the spec, replaced by its path when run
CHECKPOINT_REF = re.compile(r"\{checkpoint:(?P<run>[^{}/]*)/(?P<which>[^{}]*)\}")


class SpecError(ConfigError):
    """A reproduction spec that cannot be run or rendered."""


@dataclass(frozen=True)
class TrainRun:
    """A training run: ``train.py`` with ``overrides``; ``keep_checkpoint`` keeps its evaluated
    checkpoint with the records (small models only, so a later sitting can evaluate it);
    ``init_from`` (a run of the spec) fine-tunes from that run's best checkpoint (``init_from=``)."""

    key: str
    overrides: tuple[str, ...]
    keep_checkpoint: bool = False
    init_from: str | None = None


@dataclass(frozen=True)
class EvaluationRun:
    """``evaluate.py`` (or ``ood.py``) on the ``checkpoint`` of training run ``run``, with
    ``overrides``; ``pieces`` > 1 runs it as that many ``data.test_part`` jobs."""

    key: str
    run: str | None
    overrides: tuple[str, ...]
    command: str = "evaluate"
    checkpoint: str = "best"
    pieces: int = 1
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class Spec:
    name: str
    title: str
    report: Path | None
    records: Path | None
    runs: dict[str, TrainRun]
    evaluations: dict[str, EvaluationRun]
    sections: tuple[dict[str, Any], ...]
    smallest_effect: float = 0.01
    settings: dict[str, Any] = field(default_factory=dict)


def spec_dir() -> Path:
    return CONFIG_DIR / "reproduce"


def spec_names() -> list[str]:
    """Every reproduction spec in ``conf/reproduce/``."""
    return sorted(p.stem for p in spec_dir().glob("*.yaml") if not p.stem.startswith("_"))


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple | ListConfig) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{where} must be a list of overrides (strings), got {value!r}")
    return tuple(value)


def _path(value: Any) -> Path | None:
    return None if value in (None, "") else PROJECT_ROOT / str(value)


def checkpoint_refs(overrides: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """The ``(run, best|last)`` checkpoints that ``overrides`` name with ``{checkpoint:<run>/<which>}``."""
    return [(m["run"], m["which"]) for override in overrides for m in CHECKPOINT_REF.finditer(override)]


def _check_refs(runs: dict[str, TrainRun], where: str, overrides: tuple[str, ...]) -> None:
    for run, which in checkpoint_refs(overrides):
        if run not in runs:
            raise SpecError(f"{where}: {{checkpoint:{run}/{which}}} names no run of the spec: {sorted(runs)}")
        if which not in CHECKPOINTS:
            raise SpecError(f"{where}: {{checkpoint:{run}/{which}}} must name one of {CHECKPOINTS}")


def _check_order(runs: dict[str, TrainRun]) -> None:
    """Refuse runs that need their own checkpoint, directly or through others."""

    def visit(key: str, path: tuple[str, ...]) -> None:
        if key in path:
            raise SpecError(f"runs {' -> '.join((*path, key))}: a run cannot start from its own checkpoint")
        for run, _ in checkpoint_refs(runs[key].overrides):
            visit(run, (*path, key))

    for key in runs:
        visit(key, ())


def spec_config(name: str) -> DictConfig:
    """``conf/reproduce/<name>.yaml`` as written, over the partials its ``include`` list names
    (``_<partial>.yaml`` files of the same folder, e.g. the settings several reproductions share),
    so that its interpolations may refer to them."""
    path = spec_dir() / f"{name}.yaml"
    if not path.is_file():
        raise SpecError(f"no reproduction named {name!r}: choose one of {spec_names()}")
    cfg = OmegaConf.load(path)
    partials = []
    for partial in cfg.pop("include", None) or []:
        found = spec_dir() / f"{partial}.yaml"
        if not str(partial).startswith("_") or not found.is_file():
            raise SpecError(f"{name}: include names a partial _NAME of {spec_dir()}, got {partial!r}")
        partials.append(OmegaConf.load(found))
    return OmegaConf.merge(*partials, cfg) if partials else cfg


def load_spec(name: str, overrides: list[str] | None = None) -> Spec:
    """The spec ``conf/reproduce/<name>.yaml`` (:func:`spec_config`) with dotted ``overrides``
    (``key=value``) applied, checked: every evaluation names a run of the spec, a known command
    and checkpoint."""
    cfg = spec_config(name)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return parse_spec(name, cfg)


def _check_init_from(runs: dict[str, TrainRun]) -> None:
    """Every ``init_from`` names another run of the spec, and no run starts (through others) from itself."""
    for key, run in runs.items():
        seen, current = {key}, run.init_from
        while current is not None:
            if current not in runs:
                raise SpecError(f"runs.{key}.init_from={current!r} is not a run of the spec: {sorted(runs)}")
            if current in seen:
                raise SpecError(f"runs.{key}.init_from: the runs start from each other ({sorted(seen)})")
            seen.add(current)
            current = runs[current].init_from


def parse_spec(name: str, cfg: DictConfig | dict[str, Any]) -> Spec:
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    runs = {
        key: TrainRun(
            key,
            _strings(entry.get("overrides"), f"runs.{key}.overrides"),
            bool(entry.get("keep_checkpoint")),
            entry.get("init_from"),
        )
        for key, entry in (data.get("runs") or {}).items()
    }
    for key, run in runs.items():
        _check_refs(runs, f"runs.{key}.overrides", run.overrides)
    _check_init_from(runs)
    _check_order(runs)
    evaluations = {}
    for key, entry in (data.get("evaluations") or {}).items():
        evaluation = EvaluationRun(
            key=key,
            run=entry.get("run"),
            overrides=_strings(entry.get("overrides"), f"evaluations.{key}.overrides"),
            command=str(entry.get("command", "evaluate")),
            checkpoint=str(entry.get("checkpoint", "best")),
            pieces=int(entry.get("pieces", 1)),
            files=_strings(entry.get("files"), f"evaluations.{key}.files"),
        )
        if evaluation.run is not None and evaluation.run not in runs:
            raise SpecError(f"evaluations.{key}.run={evaluation.run!r} is not a run of the spec: {sorted(runs)}")
        if evaluation.command not in COMMANDS:
            raise SpecError(f"evaluations.{key}.command must be one of {COMMANDS}, got {evaluation.command!r}")
        if evaluation.checkpoint not in CHECKPOINTS:
            raise SpecError(f"evaluations.{key}.checkpoint must be one of {CHECKPOINTS}, got {evaluation.checkpoint!r}")
        _check_refs(runs, f"evaluations.{key}.overrides", evaluation.overrides)
        if evaluation.pieces < 1:
            raise SpecError(f"evaluations.{key}.pieces must be >= 1, got {evaluation.pieces}")
        evaluations[key] = evaluation
    sections = tuple(data.get("sections") or ())
    if not all(isinstance(s, dict) and "kind" in s for s in sections):
        raise SpecError(f"{name}: every section needs a kind")
    known = {"title", "report", "records", "runs", "evaluations", "sections", "smallest_effect"}
    return Spec(
        name=name,
        title=str(data.get("title", name)),
        report=_path(data.get("report")),
        records=_path(data.get("records")),
        runs=runs,
        evaluations=evaluations,
        sections=sections,
        smallest_effect=float(data.get("smallest_effect", 0.01)),
        settings={k: v for k, v in data.items() if k not in known},
    )
