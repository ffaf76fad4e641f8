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

Every setting (precision, checkpoint, outlier roots, detectors and their layers, threat) is
checked before images are scored, with one line naming the setting. The run is one
``trainer.test`` of :class:`~safespot.ood.module.OODModule` over the loaders of
:class:`~safespot.ood.data.OODDataModule` on the Trainer of ``cfg.trainer`` (``trainer=cpu|gpu|
ddp|ddp_spawn|ddp_sim``, ``trainer.devices``, ``trainer.precision``), as ``evaluate.py`` runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch import nn

from safespot.checks import world_size
from safespot.data.outliers import check_outlier_spec
from safespot.errors import ConfigError
from safespot.ood.data import FIT, OODDataModule
from safespot.ood.detectors.base import TUNE_IN, TUNE_OUT, Detector, DetectorError
from safespot.ood.module import OODModule
from safespot.ood.report import table4
from safespot.runs import (
    describe_model,
    load_model,
    load_run_checkpoint,
    load_run_settings,
    run_source,
    training_preset,
)
from safespot.threat import ThreatConfigError, parse_budget
from safespot.utils.callbacks import runtime_callbacks
from safespot.utils.instantiate import instantiate, instantiate_callbacks
from safespot.utils.logging import get_logger
from safespot.utils.performance import prepare_net, refuse_float16
from safespot.utils.plain import to_plain
from safespot.utils.task import task_wrapper

log = get_logger("safespot.ood")

Checkpoints = dict[str | None, tuple[dict[str, Any], DictConfig]]


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


def check_settings(cfg: DictConfig) -> Settings:
    """The detectors, the outlier specs and the subset sizes, each refused with a line naming
    the setting (after :func:`safespot.runs.load_run_settings`, which completes ``threat`` from
    the checkpoint)."""
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


def load_detector_checkpoints(settings: Settings, checkpoint: dict[str, Any], run_cfg: DictConfig) -> Checkpoints:
    """``{detector checkpoint (None: ckpt_path): (checkpoint, its run config)}``."""
    checkpoints = {None: (checkpoint, run_cfg)}
    for detector, path in settings.detectors:
        if path is not None and path not in checkpoints:
            checkpoints[path] = load_run_checkpoint(path, f"detector.{detector.name}.ckpt_path")
    return checkpoints


def build_datamodule(cfg: DictConfig, settings: Settings, data_cfg: DictConfig) -> OODDataModule:
    """The run's sets (seeded), built here, before the Trainer launches its processes, so
    ``data.download=true`` downloads a missing copy in this process (``prepare_data``) and a
    missing or clashing set is refused before any work."""
    workers = int(data_cfg.get("num_workers", 0) or 0) if cfg.get("num_workers") is None else int(cfg.num_workers)
    datamodule = OODDataModule(
        instantiate(data_cfg),
        outliers=settings.extra_specs,
        tune_outliers=settings.tune_spec,
        fit_subset=settings.fit_subset,
        tune_subset=settings.tune_subset,
        outlier_subset=settings.outlier_subset,
        batch_size=settings.batch_size,
        num_workers=workers,
        seed=settings.seed,
    )
    datamodule.prepare_data()
    datamodule.setup("test")
    return datamodule


def prepare_detectors(
    settings: Settings, datamodule: OODDataModule, checkpoints: Checkpoints
) -> dict[str | None, nn.Module]:
    """Load each checkpoint's model (on the CPU) and prepare every detector on its model with the
    first fitting image, refusing settings that cannot work (unknown layers, tuning without
    ``D_out^train``); then choose the run's loaders."""
    nets = {path: load_model(ck, rc, datamodule.num_classes) for path, (ck, rc) in checkpoints.items()}
    probe = datamodule.probe()
    for detector, path in settings.detectors:
        try:
            detector.prepare(nets[path], probe=probe)
        except DetectorError as err:
            raise ConfigError(f"detector {detector.name}: {err}") from None
    needs_tuning = [d.name for d, _ in settings.detectors if TUNE_OUT in d.tuning_sets]
    if needs_tuning and TUNE_OUT not in datamodule.tune:
        raise ConfigError(
            f"detectors {needs_tuning} are tuned on D_out^train, but the data has no held-out training "
            "outliers: set tune_outliers={kind: ..., ...} (or fix their settings, e.g. safe_spot.mu=0.5)"
        )
    datamodule.select(
        fit=any(d.fits_statistics for d, _ in settings.detectors),
        tuning={s for d, _ in settings.detectors for s in d.tuning_sets},
    )
    return nets


def check_processes(trainer_cfg: DictConfig, datamodule: OODDataModule) -> None:
    """Every process takes at least one image of each tuning and test set
    (:class:`~safespot.data.samplers.ShardSampler`): refuse a set smaller than the processes the
    trainer config starts, before they start."""
    processes = world_size(trainer_cfg)
    if processes is None or processes < 2:
        return
    for loader in datamodule.loaders:
        if loader.stage != FIT and loader.size < processes:
            raise ConfigError(
                f"the {loader.name} set has {loader.size} images, fewer than the {processes} processes of the "
                "trainer, and every process takes at least one: use a larger subset or fewer devices"
            )


def describe_run(
    cfg: DictConfig, settings: Settings, checkpoints: Checkpoints, run_cfg: DictConfig, datamodule: OODDataModule
) -> dict[str, Any]:
    """The run's description in ``results.json`` (models, checkpoints, threat, seed)."""
    checkpoint = checkpoints[None][0]
    ckpt_path = run_source(cfg, checkpoint)
    return {
        "model": describe_model(run_cfg),
        "method": checkpoint.get("hyper_parameters", {}).get("method"),
        "data": type(datamodule.data).__name__,
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


@task_wrapper
def evaluate_ood(cfg: DictConfig) -> dict[str, Any]:
    """OOD detection with a checkpoint (see the module docstring) on the Trainer of
    ``cfg.trainer``; returns the contents of ``results.json`` (the metrics and the run's
    description) in every process."""
    refuse_float16(cfg.trainer.get("precision", "32-true"), "trainer.precision", "OOD scoring")  # before any work
    checkpoint, run_cfg, data_cfg = load_run_settings(cfg, "ood.py")
    settings = check_settings(cfg)
    checkpoints = load_detector_checkpoints(settings, checkpoint, run_cfg)
    L.seed_everything(settings.seed, workers=True)
    datamodule = build_datamodule(cfg, settings, data_cfg)
    nets = prepare_detectors(settings, datamodule, checkpoints)
    check_processes(cfg.trainer, datamodule)
    nets = {path: prepare_net(net, cfg.get("perf")) for path, net in nets.items()}
    out = Path(cfg.paths.output_dir)
    n_out = len(datamodule.tune.get(TUNE_OUT, ()))
    module = OODModule(
        nets,
        settings.detectors,
        datamodule.loaders,
        seed=settings.seed,
        fit_batch_size=settings.batch_size,
        output_dir=out,
        meta=describe_run(cfg, settings, checkpoints, run_cfg, datamodule),
        sizes={"n_fit": len(datamodule.fit), "n_tune": {"in": len(datamodule.tune[TUNE_IN]), "out": n_out}},
        detector_config=to_plain(OmegaConf.to_container(cfg.detector, resolve=True)),
        histograms=bool(cfg.get("histograms", True)),
    )
    callbacks = [*instantiate_callbacks(cfg.get("callbacks"), cfg.trainer), *runtime_callbacks(cfg.trainer)]
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=callbacks)
    trainer.test(module, datamodule=datamodule, verbose=False)

    # written by rank 0 before every rank returned from test; under ddp_spawn this process
    # never held the scores, and reads the file the workers wrote
    results = json.loads((out / "results.json").read_text())
    if trainer.is_global_zero:
        print(f"\n[safespot] OOD detection on {len(datamodule.test) - 1} outlier sets (percent):")
        print(table4(results["metrics"]).to_string(index=False))
        print(f"[safespot] scores, table and histograms: {out}")
    return results
