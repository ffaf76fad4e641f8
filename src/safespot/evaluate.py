"""Evaluation entry point: load a checkpoint safely, rebuild its model and data from the
config stored inside it, measure clean and PGD robust accuracy on the test split, and write
``results.json`` into a fresh run directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from safespot.methods import NaturalTraining
from safespot.utils.checkpoint import CheckpointError, load_checkpoint, net_state_dict
from safespot.utils.checks import check_batch_size, check_threat
from safespot.utils.instantiate import instantiate, instantiate_loggers
from safespot.utils.plain import to_plain
from safespot.utils.task import task_wrapper

log = logging.getLogger("safespot.evaluate")


def _merge_set(base: DictConfig, overrides: DictConfig | None) -> DictConfig:
    """``base`` with every non-null entry of ``overrides`` written over it."""
    merged = OmegaConf.create(OmegaConf.to_container(base, resolve=True))
    for key, value in (overrides or {}).items():
        if value is not None:
            merged[key] = value
    return merged


def load_model(checkpoint: dict[str, Any], run_cfg: DictConfig, num_classes: int) -> Any:
    """Instantiate the checkpoint's classifier and load its weights, refusing a mismatch."""
    trained_classes = int(run_cfg.data.num_classes)
    if trained_classes != num_classes:
        raise CheckpointError(f"the checkpoint's model has {trained_classes} classes but the data has {num_classes}")
    net = instantiate(run_cfg.model)
    try:
        net.load_state_dict(net_state_dict(checkpoint))
    except RuntimeError as err:
        raise CheckpointError(f"the checkpoint's weights do not fit its model config: {err}") from None
    return net.eval()


@task_wrapper
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    checkpoint = load_checkpoint(cfg.ckpt_path)
    run_cfg = OmegaConf.create(checkpoint["safespot_config"])
    data_cfg = _merge_set(run_cfg.data, cfg.get("data"))
    threat = _merge_set(run_cfg.threat, cfg.get("threat"))
    check_threat(threat)
    check_batch_size(OmegaConf.create({"trainer": cfg.trainer, "data": data_cfg}))
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(data_cfg)
    net = load_model(checkpoint, run_cfg, datamodule.num_classes)
    module = NaturalTraining(
        net,
        optimizer=None,
        threat=to_plain(threat),
        val_attack=None,
        test_attack=to_plain(cfg.attack),
        num_classes=datamodule.num_classes,
    )
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=[])
    trainer.test(module, datamodule=datamodule)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    results = {
        "clean/acc": metrics.get("test/acc"),
        "pgd/acc": metrics.get("test/robust_acc"),
        "n_images": len(datamodule.splits["test"]),
        "ckpt_path": str(Path(cfg.ckpt_path).resolve()),
        "threat": to_plain(threat),
        "attack": to_plain(cfg.attack),
        "method": checkpoint.get("hyper_parameters", {}).get("method"),
    }
    if trainer.is_global_zero:
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "results.json"
        path.write_text(json.dumps(results, indent=2))
        print(
            f"\n[safespot] clean acc {results['clean/acc']:.4f}, PGD acc {results['pgd/acc']:.4f} "
            f"on {results['n_images']} images\n[safespot] results: {path}"
        )
    return results
