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

Every setting (checkpoint, outlier roots, detectors and their layers, threat) is checked
before images are scored, with one line naming the setting.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from safespot.data.base import IndexedSubset, _seeded_choice
from safespot.data.outliers import build_outlier_dataset, check_outlier_spec
from safespot.ood.detectors import Batches, Detector, DetectorError, SafeSpotScore
from safespot.ood.report import IN_DISTRIBUTION, detector_metrics, plot_figure3, plot_histograms, write_tables
from safespot.runs import describe_model, load_model, load_run_settings, resolve_device
from safespot.threat import parse_budget
from safespot.utils.checkpoint import load_checkpoint
from safespot.utils.instantiate import instantiate
from safespot.utils.performance import prepare_net, refuse_float16
from safespot.utils.plain import to_plain
from safespot.utils.rng import image_seeds
from safespot.utils.task import ConfigError, task_wrapper

log = logging.getLogger("safespot.ood")


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
        except DetectorError as err:
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
        base_indices = _seeded_choice(base_indices, n, seed, name)
    return IndexedSubset(base, base_indices)


@task_wrapper
def evaluate_ood(cfg: DictConfig) -> dict[str, Any]:
    # --- settings, all checked before any image is read ---------------------------------
    for setting in ("precision", "trainer.precision"):  # OOD scoring runs in float32; refuse float16 if asked
        value = OmegaConf.select(cfg, setting, default=None)
        if value is not None:
            refuse_float16(value, setting, "OOD scoring")
    checkpoint, run_cfg, data_cfg = load_run_settings(cfg)
    detectors = build_detectors(cfg.get("detector"))
    extra_specs = {
        str(name): check_outlier_spec(spec, f"outliers.{name}")
        for name, spec in (cfg.get("outliers") or {}).items()
        if spec is not None
    }
    tune_spec = cfg.get("tune_outliers")
    tune_spec = check_outlier_spec(tune_spec, "tune_outliers") if tune_spec is not None else None
    batch_size = _positive(cfg, "batch_size")
    fit_subset, tune_subset = _positive(cfg, "fit_subset", True), _positive(cfg, "tune_subset", True)
    outlier_subset = _positive(cfg, "outlier_subset", True)
    device = resolve_device(cfg.get("device"))
    checkpoints = {None: (checkpoint, run_cfg)}
    for _, path in detectors:
        if path is not None and path not in checkpoints:
            other = load_checkpoint(path)
            checkpoints[path] = (other, OmegaConf.create(other["safespot_config"]))
    L.seed_everything(cfg.seed, workers=True)

    # --- data ---------------------------------------------------------------------------
    datamodule = instantiate(data_cfg)
    datamodule.setup("test")
    train_plain = datamodule.build_datasets()[1]
    fit_set = _subset(IndexedSubset(train_plain, datamodule.splits["train"]), fit_subset, cfg.seed + 1, "fit_subset")
    val = datamodule.splits["val"]
    if not val:
        log.warning("the data has no validation split (val_size=0): tuning on training images")
    tune_in = _subset(IndexedSubset(train_plain, val) if val else fit_set, tune_subset, cfg.seed + 2, "tune_subset")
    test_in = datamodule._datasets["test"]
    channels, size = int(test_in[0][0].shape[0]), int(test_in[0][0].shape[-1])
    test_sets = dict(datamodule.test_outlier_sets()) if hasattr(datamodule, "test_outlier_sets") else {}
    for name, spec in extra_specs.items():
        ds = build_outlier_dataset(spec, f"outliers.{name}", size, channels, int(cfg.seed) + 2_000)
        test_sets[name] = IndexedSubset(ds, range(len(ds)))
    if IN_DISTRIBUTION in test_sets:
        raise ConfigError(f"'{IN_DISTRIBUTION}' is reserved for the in-distribution test images; rename that set")
    if not test_sets:
        raise ConfigError(
            "no test outlier sets: the data defines none; add one, e.g. +outliers.noise={kind: uniform, n: 1000}"
        )
    test_sets = {
        name: _subset(ds, outlier_subset, cfg.seed + 3 + i, f"outlier_subset ({name})")
        for i, (name, ds) in enumerate(test_sets.items())
    }
    if tune_spec is not None:
        tune_out: Dataset | None = build_outlier_dataset(tune_spec, "tune_outliers", size, channels, int(cfg.seed))
    else:
        tune_out = datamodule.outlier_split("val") if hasattr(datamodule, "outlier_split") else None
    if tune_out is not None:
        tune_out = _subset(tune_out, tune_subset, cfg.seed + 4, "tune_subset")
    needs_tuning_names: list[str] = []

    # --- models and detectors -----------------------------------------------------------
    nets = {
        path: prepare_net(load_model(ck, rc, datamodule.num_classes).to(device), cfg.get("perf"))
        for path, (ck, rc) in checkpoints.items()
    }
    for detector, path in detectors:
        try:
            detector.prepare(nets[path])
        except DetectorError as err:
            raise ConfigError(f"detector {detector.name}: {err}") from None
        if detector.requires_tuning:
            needs_tuning_names.append(detector.name)
    if needs_tuning_names and (tune_out is None or len(tune_out) == 0):
        raise ConfigError(
            f"detectors {needs_tuning_names} are tuned on D_out^train, but the data has no held-out training "
            "outliers: set tune_outliers={kind: ..., ...} (or fix their settings, e.g. safe_spot.mu=0.5)"
        )

    workers = int(data_cfg.get("num_workers", 0) or 0) if cfg.get("num_workers") is None else int(cfg.num_workers)

    def batches(dataset: Dataset, salt: str) -> Batches:
        salt_value = zlib.crc32(salt.encode())

        def generate():
            for x, y, index in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers):
                yield x.to(device), y.to(device), image_seeds(cfg.seed, index.to(device), salt_value)

        return generate

    tuned: dict[str, Any] = {}
    tune_out_batches = batches(tune_out, "tune_out") if tune_out is not None and len(tune_out) else None
    for detector, path in detectors:
        log.info("fitting %s", detector.name)
        try:
            tuned[detector.name] = detector.fit(
                nets[path], batches(fit_set, "fit"), batches(tune_in, "tune_in"), tune_out_batches
            )
        except DetectorError as err:
            raise ConfigError(f"detector {detector.name}: {err}") from None

    # --- scores -------------------------------------------------------------------------
    frames = []
    for set_name, dataset in [(IN_DISTRIBUTION, test_in), *test_sets.items()]:
        log.info("scoring %s (%d images)", set_name, len(dataset))
        parts: dict[str, list[torch.Tensor]] = {}
        for x, y, seeds, index in _with_index(dataset, batch_size, workers, device, cfg.seed, set_name):
            with torch.no_grad():
                parts.setdefault("pred", []).append(nets[None](x).argmax(1).cpu())
            parts.setdefault("index", []).append(index)
            parts.setdefault("label", []).append(y.cpu())
            for detector, path in detectors:
                for key, value in detector.parts(nets[path], x, seeds).items():
                    column = detector.name if key == "score" else f"{detector.name}/{key}"
                    parts.setdefault(column, []).append(value.detach().float().cpu())
        frame = pd.DataFrame({k: torch.cat(v).numpy() for k, v in parts.items()})
        frame.insert(0, "outlier", set_name != IN_DISTRIBUTION)
        frame.insert(0, "set", set_name)
        frames.append(frame)
    scores = pd.concat(frames, ignore_index=True)
    names = [d.name for d, _ in detectors]

    # --- outputs ------------------------------------------------------------------------
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    scores.to_csv(out / "scores.csv", index=False)
    results = detector_metrics(scores, names)
    meta = {
        "model": describe_model(run_cfg),
        "method": checkpoint.get("hyper_parameters", {}).get("method"),
        "data": str(data_cfg.get("_target_", "")).rsplit(".", 1)[-1],
        "train_run": run_cfg.get("task_name"),
        "ckpt_path": str(Path(cfg.ckpt_path).resolve()),
        "detector_checkpoints": {
            d.name: {
                "ckpt_path": str(Path(p).resolve()) if p else str(Path(cfg.ckpt_path).resolve()),
                "method": checkpoints[p][0].get("hyper_parameters", {}).get("method"),
            }
            for d, p in detectors
        },
        "norm": str(cfg.threat.norm),
        "eps": parse_budget(cfg.threat.eps, "threat.eps"),
        "seed": int(cfg.seed),
        "n_images": {str(k): int(v) for k, v in scores["set"].value_counts(sort=False).items()},
        "n_fit": len(fit_set),
        "n_tune": {"in": len(tune_in), "out": 0 if tune_out is None else len(tune_out)},
        "tuned": tuned,
        "detector_config": to_plain(OmegaConf.to_container(cfg.detector, resolve=True)),
        "convention": "outliers positive; higher score = more anomalous; percentages",
    }
    table = write_tables(out, results, meta)
    if cfg.get("histograms", True):
        (out / "histograms").mkdir(exist_ok=True)
        safe_spot = [d.name for d, _ in detectors if isinstance(d, SafeSpotScore)]
        for detector, _ in detectors:
            plot_histograms(scores, detector.name, out / "histograms" / f"{detector.name}.png")
            if detector.name in safe_spot:
                figure = "figure3.png" if len(safe_spot) == 1 else f"figure3_{detector.name}.png"
                plot_figure3(scores, detector.name, out / figure)
    print(f"\n[safespot] OOD detection on {len(test_sets)} outlier sets (percent):")
    print(table.to_string(index=False))
    print(f"[safespot] scores, table and histograms: {out}")
    return {"metrics": results, **meta}


def _with_index(dataset: Dataset, batch_size: int, workers: int, device: torch.device, seed: int, salt: str):
    salt_value = zlib.crc32(salt.encode())
    for x, y, index in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers):
        yield x.to(device), y, image_seeds(seed, index.to(device), salt_value), index
