"""OOD detection entry point (paper 000, Section 4.4): ``python ood.py ckpt_path=PATH``.

The checkpoint's model and in-distribution data are rebuilt from the config stored in it (as
:mod:`safespot.evaluate` does). Every selected detector (``detector=[msp,energy,mahalanobis,
gram,safe_spot]``, each optionally on its own checkpoint through ``detector.NAME.ckpt_path``,
e.g. OE on an Outlier-Exposure model) is fitted on the in-distribution training images, tuned
on the in-distribution validation images against ``D_out^train`` (the data's held-out training
outliers, or ``tune_outliers``), and scores the in-distribution test images and every
``D_out^test`` set (the data's own and ``outliers``). Written into a fresh run directory:

- ``scores.csv``: one row per image (set, index, label, prediction) with every detector's
  anomaly score (higher = more anomalous) and its extra columns (``<detector>/<part>``);
- ``table.md``, ``table.csv``, ``results.json``: FPR95, AUROC and AUPR (percent; outliers
  positive) per test outlier set and their average, in paper 000's Table 4 layout, with the
  tuned settings (noise magnitude, ensemble weights, mu);
- ``histograms/<detector>.png`` and, for the safe-spot score, ``figure3.png`` (paper 000,
  Figure 3).

Every setting (runtime, checkpoint, outlier roots, detectors and their layers, threat) is
checked before images are scored, with one line naming the setting.

The command runs on a Lightning Fabric built from the ``runtime`` block
(:func:`safespot.runs.build_fabric`; ``device=``/``precision=`` are its aliases), in named steps:
:func:`make_plan` (:func:`build_runtime`, :func:`load_run`, :func:`check_settings`,
:func:`load_detector_checkpoints`, :func:`collect_inputs`, :func:`prepare_detectors`), then in
every process :func:`ood_process`: the models placed on the process's device,
:func:`fit_detectors` (every process ends with the same fitted detectors, the work split over them),
:func:`score_shard` (process r of N scores the images at positions r, r+N, ... of each test set
under ``fabric.autocast()``; per-image seeds come from the dataset index, so a score does not
depend on the shard), :func:`gather_scores` (every row back in index order, in every process)
and :func:`write_outputs` (rank 0: scores, tables, histograms).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.fabric import Fabric
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from safespot.data.base import IndexedSubset, seeded_choice
from safespot.data.ood import OutlierDataMixin
from safespot.data.outliers import build_outlier_dataset, check_outlier_spec
from safespot.errors import ConfigError
from safespot.ood.detectors import Batches, Detector, DetectorError, SafeSpotScore, ShardedBatches
from safespot.ood.report import IN_DISTRIBUTION, detector_metrics, plot_figure3, plot_histograms, write_tables
from safespot.runs import (
    build_fabric,
    describe_model,
    describe_runtime,
    leave_together,
    load_model,
    load_run_checkpoint,
    load_run_settings,
    place_model,
    run_source,
    shard,
    training_preset,
)
from safespot.threat import ThreatConfigError, parse_budget
from safespot.utils.distributed import gather_objects
from safespot.utils.instantiate import instantiate
from safespot.utils.logging import get_logger
from safespot.utils.performance import refuse_float16
from safespot.utils.plain import to_plain
from safespot.utils.rng import host_seed, image_seeds
from safespot.utils.task import task_wrapper

log = get_logger("safespot.ood")


def build_detectors(cfg: DictConfig | None) -> list[tuple[Detector, str | None]]:
    """``(detector, its checkpoint or None for ckpt_path)`` in config order, validated."""
    entries = [(k, v) for k, v in (cfg or {}).items() if v is not None]
    if not entries:
        raise ConfigError("detector: select at least one detector, e.g. detector=[msp,energy,mahalanobis]")
    detectors: list[tuple[Detector, str | None]] = []
    for key, entry in entries:
        spec = OmegaConf.to_container(entry, resolve=True)
        if not isinstance(spec, dict) or "_target_" not in spec:
            raise ConfigError(f"detector.{key} must be a mapping with a _target_")
        ckpt = spec.pop("ckpt_path", None)
        try:
            detector = instantiate(spec)
        except (DetectorError, ThreatConfigError) as err:  # e.g. a robustifier budget above 1 for l_inf
            raise ConfigError(f"detector.{key}: {err}") from None
        if not isinstance(detector, Detector):
            raise ConfigError(f"detector.{key}: {spec['_target_']} is not a safespot.ood.Detector")
        detectors.append((detector, None if ckpt is None else str(ckpt)))
    names = [d.name for d, _ in detectors]
    if len(set(names)) != len(names):
        raise ConfigError(f"detector names must be unique, got {names}")
    return detectors


def _positive(cfg: DictConfig, key: str, allow_none: bool = False) -> int | None:
    value = cfg.get(key)
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be an integer >= 1{' or null' if allow_none else ''}, got {value!r}")
    return value


def _subset(dataset: Dataset, n: int | None, seed: int, name: str) -> IndexedSubset:
    """A seeded subset (all of it when ``n`` is None or covers it), keeping dataset indices."""
    base_indices = dataset.indices if isinstance(dataset, IndexedSubset) else list(range(len(dataset)))
    base = dataset.dataset if isinstance(dataset, IndexedSubset) else dataset
    if n is not None and n < len(base_indices):
        base_indices = seeded_choice(base_indices, n, seed, name)
    return IndexedSubset(base, base_indices)


# --- the command, step by step ----------------------------------------------------------
@dataclass
class Settings:
    """The checked settings of an OOD run (before any data is read)."""

    detectors: list[tuple[Detector, str | None]]
    extra_specs: dict[str, Any]
    tune_spec: Any | None
    batch_size: int
    fit_subset: int | None
    tune_subset: int | None
    outlier_subset: int | None
    seed: int


@dataclass
class Inputs:
    """The image sets of an OOD run, each a dataset of ``(image, label, index)``."""

    fit: IndexedSubset
    tune_in: IndexedSubset
    tune_out: Dataset | None
    test: dict[str, Dataset]  # the in-distribution test images first, then each outlier set
    num_classes: int
    workers: int


@dataclass
class Plan:
    """Everything the processes of an OOD run need, checked and built in the process that
    launches them (picklable: ``ddp_spawn`` sends it to every process; the detectors' layers
    refer to modules of ``nets``, which travel in the same pickle)."""

    settings: Settings
    inputs: Inputs
    nets: dict[str | None, nn.Module]  # per detector checkpoint (None: ckpt_path), on the CPU
    out: Path
    histograms: bool
    progress: bool
    perf: dict[str, Any] | None
    meta: dict[str, Any] = field(default_factory=dict)


def build_runtime(cfg: DictConfig) -> Fabric:
    """The runtime (:func:`safespot.runs.build_fabric`), first of all settings: float16 is refused
    for ``runtime.precision``, its alias ``precision`` and a stray ``trainer.precision``."""
    value = OmegaConf.select(cfg, "trainer.precision", default=None)
    if value is not None:
        refuse_float16(value, "trainer.precision", "OOD scoring")
    return build_fabric(cfg, "OOD scoring")


def check_settings(cfg: DictConfig) -> Settings:
    """The detectors, the outlier specs and the subset sizes, each refused with a line naming
    the setting (after :func:`load_run`, which completes ``threat`` from the checkpoint)."""
    detectors = build_detectors(cfg.get("detector"))
    extra_specs = {
        str(name): check_outlier_spec(spec, f"outliers.{name}")
        for name, spec in (cfg.get("outliers") or {}).items()
        if spec is not None
    }
    tune_spec = cfg.get("tune_outliers")
    tune_spec = check_outlier_spec(tune_spec, "tune_outliers") if tune_spec is not None else None
    return Settings(
        detectors=detectors,
        extra_specs=extra_specs,
        tune_spec=tune_spec,
        batch_size=int(_positive(cfg, "batch_size") or 1),
        fit_subset=_positive(cfg, "fit_subset", True),
        tune_subset=_positive(cfg, "tune_subset", True),
        outlier_subset=_positive(cfg, "outlier_subset", True),
        seed=int(cfg.seed),
    )


def load_run(cfg: DictConfig) -> tuple[dict[str, Any], DictConfig, DictConfig]:
    """``(checkpoint, run_cfg, data_cfg)`` (:func:`safespot.runs.load_run_settings`): the
    checkpoint, its training config and data config with the overrides; ``cfg.threat`` is
    completed from the checkpoint's threat model."""
    return load_run_settings(cfg, "ood.py")


def load_detector_checkpoints(
    settings: Settings, checkpoint: dict[str, Any], run_cfg: DictConfig
) -> dict[str | None, tuple[dict[str, Any], DictConfig]]:
    """``{detector checkpoint (None: ckpt_path): (checkpoint, its run config)}``."""
    checkpoints = {None: (checkpoint, run_cfg)}
    for detector, path in settings.detectors:
        if path is not None and path not in checkpoints:
            checkpoints[path] = load_run_checkpoint(path, f"detector.{detector.name}.ckpt_path")
    return checkpoints


def collect_inputs(cfg: DictConfig, settings: Settings, data_cfg: DictConfig) -> Inputs:
    """Build the data (seeded): fitting images, tuning sets, the in-distribution test images and
    every test outlier set. Runs before the processes are launched (:func:`make_plan`), so
    ``data.download=true`` downloads a missing copy once, in the launching process
    (``prepare_data``), before any process reads it."""
    seed = settings.seed
    datamodule = instantiate(data_cfg)
    datamodule.prepare_data()
    datamodule.setup("test")
    train_plain = datamodule.build_datasets()[1]
    fit_set = _subset(
        IndexedSubset(train_plain, datamodule.splits["train"]),
        settings.fit_subset,
        host_seed(seed, "ood_fit_subset"),
        "fit_subset",
    )
    val = datamodule.splits["val"]
    if not val:
        log.warning("the data has no validation split (val_size=0): tuning on training images")
    tune_base = IndexedSubset(train_plain, val) if val else fit_set
    tune_in = _subset(tune_base, settings.tune_subset, host_seed(seed, "ood_tune_subset", 0), "tune_subset")
    test_in = datamodule.dataset("test")
    channels, size = int(test_in[0][0].shape[0]), int(test_in[0][0].shape[-1])
    with_outliers = isinstance(datamodule, OutlierDataMixin)
    test_sets = dict(datamodule.test_outlier_sets()) if with_outliers else {}
    for name, spec in settings.extra_specs.items():
        ds = build_outlier_dataset(spec, f"outliers.{name}", size, channels, host_seed(seed, "ood_extra_outliers"))
        test_sets[name] = IndexedSubset(ds, range(len(ds)))
    if IN_DISTRIBUTION in test_sets:
        raise ConfigError(f"'{IN_DISTRIBUTION}' is reserved for the in-distribution test images; rename that set")
    if not test_sets:
        raise ConfigError(
            "no test outlier sets: the data defines none; add one, e.g. +outliers.noise={kind: uniform, n: 1000}"
        )
    test_sets = {
        name: _subset(ds, settings.outlier_subset, host_seed(seed, "ood_outlier_subset", i), f"outlier_subset ({name})")
        for i, (name, ds) in enumerate(test_sets.items())
    }
    if settings.tune_spec is not None:
        tune_out: Dataset | None = build_outlier_dataset(
            settings.tune_spec, "tune_outliers", size, channels, host_seed(seed, "ood_tune_outliers")
        )
    else:
        tune_out = datamodule.outlier_split("val") if with_outliers else None
    if tune_out is not None:
        tune_out = _subset(tune_out, settings.tune_subset, host_seed(seed, "ood_tune_subset", 1), "tune_subset")
    workers = int(data_cfg.get("num_workers", 0) or 0) if cfg.get("num_workers") is None else int(cfg.num_workers)
    return Inputs(
        fit=fit_set,
        tune_in=tune_in,
        tune_out=tune_out,
        test={IN_DISTRIBUTION: test_in, **test_sets},
        num_classes=int(datamodule.num_classes),
        workers=workers,
    )


def prepare_detectors(
    settings: Settings, inputs: Inputs, checkpoints: dict[str | None, tuple[dict[str, Any], DictConfig]]
) -> dict[str | None, nn.Module]:
    """Load each checkpoint's model (on the CPU) and prepare every detector on its model,
    refusing settings that cannot work (unknown layers, tuning without ``D_out^train``)."""
    nets = {path: load_model(ck, rc, inputs.num_classes) for path, (ck, rc) in checkpoints.items()}
    needs_tuning: list[str] = []
    for detector, path in settings.detectors:
        try:
            detector.prepare(nets[path])
        except DetectorError as err:
            raise ConfigError(f"detector {detector.name}: {err}") from None
        if detector.requires_tuning:
            needs_tuning.append(detector.name)
    if needs_tuning and (inputs.tune_out is None or len(inputs.tune_out) == 0):
        raise ConfigError(
            f"detectors {needs_tuning} are tuned on D_out^train, but the data has no held-out training "
            "outliers: set tune_outliers={kind: ..., ...} (or fix their settings, e.g. safe_spot.mu=0.5)"
        )
    return nets


def make_plan(cfg: DictConfig) -> tuple[Plan, Fabric]:
    """Check every setting, build the runtime, the data, the models and the detectors: all that
    can be refused is refused here, before images are scored."""
    fabric = build_runtime(cfg)
    checkpoint, run_cfg, data_cfg = load_run(cfg)
    settings = check_settings(cfg)
    checkpoints = load_detector_checkpoints(settings, checkpoint, run_cfg)
    L.seed_everything(settings.seed, workers=True)
    inputs = collect_inputs(cfg, settings, data_cfg)
    nets = prepare_detectors(settings, inputs, checkpoints)
    ckpt_path = run_source(cfg, checkpoint)
    meta = {
        "model": describe_model(run_cfg),
        "method": checkpoints[None][0].get("hyper_parameters", {}).get("method"),
        "data": str(data_cfg.get("_target_", "")).rsplit(".", 1)[-1],
        "train_run": training_preset(run_cfg),
        "ckpt_path": ckpt_path,
        "detector_checkpoints": {
            d.name: {
                "ckpt_path": str(Path(p).resolve()) if p else ckpt_path,
                "method": checkpoints[p][0].get("hyper_parameters", {}).get("method"),
            }
            for d, p in settings.detectors
        },
        "norm": str(cfg.threat.norm),
        "eps": parse_budget(cfg.threat.eps, "threat.eps"),
        "seed": settings.seed,
    }
    plan = Plan(
        settings=settings,
        inputs=inputs,
        nets=nets,
        out=Path(cfg.paths.output_dir),
        histograms=bool(cfg.get("histograms", True)),
        progress=bool(cfg.get("progress", True)),
        perf=to_plain(cfg.get("perf")),
        meta={**meta, "detector_config": to_plain(OmegaConf.to_container(cfg.detector, resolve=True))},
    )
    return plan, fabric


def _batches(plan: Plan, dataset: Dataset, salt: str, fabric: Fabric) -> ShardedBatches:
    """A :class:`~safespot.ood.detectors.ShardedBatches` source over ``dataset`` (in order) on
    the process's device, with per-image seeds from the dataset index and ``salt``; its local
    share is this process's :func:`~safespot.runs.shard` of the positions; its batch share (for
    the fitting statistics, :func:`~safespot.ood.detectors.per_batch`) is the batches ``rank,
    rank + N, ...`` of the set as one process batches it."""
    salt_value = zlib.crc32(salt.encode())
    seed, batch_size, workers = plan.settings.seed, plan.settings.batch_size, plan.inputs.workers
    device = fabric.device
    positions = list(shard(len(dataset), fabric))

    def over(data: Dataset) -> Batches:
        def generate() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
            for x, y, index in DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers):
                yield x.to(device), y.to(device), image_seeds(seed, index.to(device), salt_value)

        return generate

    n_batches = -(-len(dataset) // batch_size)
    in_my_batches = [
        i
        for b in range(fabric.global_rank, n_batches, fabric.world_size)
        for i in range(b * batch_size, min((b + 1) * batch_size, len(dataset)))
    ]
    return ShardedBatches(
        over(dataset),
        over(Subset(dataset, positions)),
        positions,
        gather_objects,
        batch_share=over(Subset(dataset, in_my_batches)),
        rounds=-(-n_batches // fabric.world_size),
    )


def fit_detectors(fabric: Fabric, plan: Plan, nets: dict[str | None, nn.Module]) -> dict[str, Any]:
    """Fit and tune every detector on the whole fitting and tuning sets, identically in every
    process (their state holds hooks into this process's models, so it is not broadcast);
    returns the tuned settings. Work that goes through
    :class:`~safespot.ood.detectors.ShardedBatches` is split over the processes and gathered: the
    per-image tuning work (the safe-spot score's search, Mahalanobis' preprocessed confidences,
    Gram's deviations) by image, the fitting statistics of Mahalanobis and Gram by batch, so
    each image is worked on once over all processes.
    Processes whose tuned settings differ from rank 0's (possible with non-deterministic GPU
    kernels) are reported."""
    inputs = plan.inputs
    tune_out = inputs.tune_out
    tune_out_batches = _batches(plan, tune_out, "tune_out", fabric) if tune_out is not None and len(tune_out) else None
    tuned: dict[str, Any] = {}
    for detector, path in plan.settings.detectors:
        if fabric.is_global_zero:
            log.info("fitting %s", detector.name)
        fit, tune_in = _batches(plan, inputs.fit, "fit", fabric), _batches(plan, inputs.tune_in, "tune_in", fabric)
        try:
            with fabric.autocast():
                tuned[detector.name] = detector.fit(nets[path], fit, tune_in, tune_out_batches)
        except DetectorError as err:
            raise ConfigError(f"detector {detector.name}: {err}") from None
    differ = [rank for rank, other in enumerate(gather_objects(repr(tuned))) if other != repr(tuned)]
    if differ and fabric.is_global_zero:
        log.warning("processes %s fitted their detectors differently from rank 0 (non-deterministic kernels?)", differ)
    return tuned


def score_shard(fabric: Fabric, plan: Plan, nets: dict[str | None, nn.Module]) -> list[tuple[str, pd.DataFrame]]:
    """Score this process's share (positions ``rank, rank + N, ...``) of every test set: one
    frame per set with the predictions, labels, dataset indices, every detector's columns and
    the positions (column ``_position``) the frames are put back together by."""
    frames = []
    for set_name, dataset in plan.inputs.test.items():
        positions = list(shard(len(dataset), fabric))
        if fabric.is_global_zero:
            log.info("scoring %s (%d images)", set_name, len(dataset))
        parts: dict[str, list[torch.Tensor]] = {"_position": [torch.tensor(positions, dtype=torch.long)]}
        salt = zlib.crc32(set_name.encode())
        loader = DataLoader(
            Subset(dataset, positions),
            batch_size=plan.settings.batch_size,
            shuffle=False,
            num_workers=plan.inputs.workers,
        )
        disable = not (plan.progress and fabric.is_global_zero)
        for x, y, index in tqdm(loader, desc=f"scoring {set_name}", unit="batch", disable=disable):
            x, seeds = x.to(fabric.device), image_seeds(plan.settings.seed, index.to(fabric.device), salt)
            with fabric.autocast():
                with torch.no_grad():
                    parts.setdefault("pred", []).append(nets[None](x).argmax(1).cpu())
                parts.setdefault("index", []).append(index)
                parts.setdefault("label", []).append(y.cpu())
                for detector, path in plan.settings.detectors:
                    for key, value in detector.parts(nets[path], x, seeds).items():
                        column = detector.name if key == "score" else f"{detector.name}/{key}"
                        parts.setdefault(column, []).append(value.detach().float().cpu())
        frames.append((set_name, pd.DataFrame({k: torch.cat(v).numpy() for k, v in parts.items() if v})))
    return frames


def gather_scores(fabric: Fabric, frames: list[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    """Every process's frames, per set in position order, as one table (``scores.csv``), in
    every process."""
    fabric.barrier("ood: every shard scored")
    shards = gather_objects(frames)
    tables = []
    for k, (set_name, _) in enumerate(frames):
        pieces = [part[k][1] for part in shards if len(part[k][1])] or [frames[k][1]]  # (an empty share has no columns)
        frame = pd.concat(pieces, ignore_index=True)
        frame = frame.sort_values("_position", kind="stable").drop(columns="_position").reset_index(drop=True)
        frame.insert(0, "outlier", set_name != IN_DISTRIBUTION)
        frame.insert(0, "set", set_name)
        tables.append(frame)
    return pd.concat(tables, ignore_index=True)


def write_outputs(plan: Plan, scores: pd.DataFrame, results: dict[str, Any], meta: dict[str, Any]) -> None:
    """``scores.csv``, the tables, ``results.json``, histograms and Figure 3 (rank 0)."""
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    scores.to_csv(out / "scores.csv", index=False)
    table = write_tables(out, results, meta)
    detectors = [d for d, _ in plan.settings.detectors]
    if plan.histograms:
        (out / "histograms").mkdir(exist_ok=True)
        safe_spot = [d.name for d in detectors if isinstance(d, SafeSpotScore)]
        for detector in detectors:
            plot_histograms(scores, detector.name, out / "histograms" / f"{detector.name}.png")
            if detector.name in safe_spot:
                figure = "figure3.png" if len(safe_spot) == 1 else f"figure3_{detector.name}.png"
                plot_figure3(scores, detector.name, out / figure)
    print(f"\n[safespot] OOD detection on {len(plan.inputs.test) - 1} outlier sets (percent):")
    print(table.to_string(index=False))
    print(f"[safespot] scores, table and histograms: {out}")


def ood_process(fabric: Fabric, plan: Plan) -> dict[str, Any]:
    """One process of the runtime: place the models, fit the detectors, score this process's
    shard of every test set, gather the scores in index order and (rank 0) write the files;
    returns the metrics and the run's description in every process."""
    L.seed_everything(plan.settings.seed, workers=True, verbose=False)
    nets = {path: place_model(fabric, net, plan.perf) for path, net in plan.nets.items()}
    tuned = fit_detectors(fabric, plan, nets)
    scores = gather_scores(fabric, score_shard(fabric, plan, nets))
    names = [d.name for d, _ in plan.settings.detectors]
    results = detector_metrics(scores, names)
    inputs = plan.inputs
    detector_config = plan.meta["detector_config"]
    meta = {
        **{k: v for k, v in plan.meta.items() if k != "detector_config"},
        "n_images": {str(k): int(v) for k, v in scores["set"].value_counts(sort=False).items()},
        "n_fit": len(inputs.fit),
        "n_tune": {"in": len(inputs.tune_in), "out": 0 if inputs.tune_out is None else len(inputs.tune_out)},
        "tuned": tuned,
        "detector_config": detector_config,
        "runtime": describe_runtime(fabric),
        "convention": "outliers positive; higher score = more anomalous; percentages",
    }
    if fabric.is_global_zero:
        write_outputs(plan, scores, results, meta)
    leave_together(fabric, "ood: outputs written")
    return {"metrics": results, **meta}


@task_wrapper
def evaluate_ood(cfg: DictConfig) -> dict[str, Any]:
    """OOD detection with a checkpoint (see the module docstring) on the ``runtime`` (a
    Lightning Fabric: one process, or the test images sharded over several); returns the
    metrics and the run's description in every process."""
    plan, fabric = make_plan(cfg)
    return fabric.launch(ood_process, plan)
