"""Evaluation entry point: load a checkpoint safely, rebuild its model and data from the
config stored inside it, run the configured evaluations (clean, PGD, AutoAttack, ...) on
the test split with one record per image, and write ``records.csv``, ``results.json`` and
image panels into a fresh run directory.

With ``smoothing.sigma`` set, the loaded classifier is wrapped into a Gaussian-smoothed
classifier (:class:`safespot.smoothing.SmoothedClassifier`; Cohen et al., 2019): attacks
then run on its soft smoothed loss (Salman et al., 2019), every evaluated point is scored by
its vote, and certify evaluations add ``certified_accuracy.csv`` / ``.md`` / ``.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from safespot.checks import check_batch_size, check_eval_subsets
from safespot.errors import ConfigError
from safespot.evaluation import Evaluation, EvaluationModule
from safespot.models.noise_injection import weight_noise_per
from safespot.runs import (
    describe_model,
    load_model,
    load_run_settings,
    model_input,
    run_source,
    training_preset,
    with_noise_per,
)
from safespot.threat import parse_budget
from safespot.utils.callbacks import runtime_callbacks
from safespot.utils.instantiate import instantiate, instantiate_callbacks, instantiate_loggers
from safespot.utils.logging import get_logger
from safespot.utils.performance import prepare_net, refuse_float16
from safespot.utils.plain import to_plain
from safespot.utils.task import task_wrapper

log = get_logger("safespot.evaluate")


def build_evaluations(cfg: DictConfig | None) -> list[Evaluation]:
    """Instantiate the selected evaluations (validating their attacks) in config order."""
    if not cfg:
        raise ConfigError("evaluation: select at least one evaluation, e.g. evaluation=[clean,pgd]")
    return [instantiate(entry) for entry in cfg.values()]


def smoothing_config(cfg: DictConfig | None) -> DictConfig | None:
    """The ``smoothing`` block when smoothing is on (``sigma`` set), else ``None``; its
    settings are validated here, before any work."""
    if not cfg or cfg.get("sigma") is None:
        return None
    # sigma 0 is valid only around a noise-injected model: checked when the real model is wrapped
    probe = OmegaConf.merge(cfg, {"sigma": 1.0}) if cfg.get("sigma") == 0 else cfg
    instantiate(probe, base=nn.Identity())
    return cfg


def evaluation_tags(tags: Any, train_run: str | None) -> list[str]:
    """The evaluation's tags followed by the preset of the run it evaluates (once)."""
    tags = [str(t) for t in (tags or [])]
    return [*tags, str(train_run)] if train_run and str(train_run) not in tags else tags


def evaluated_run(cfg: DictConfig, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The training run an evaluation evaluates: the name and wandb id its checkpoint stores, or
    (checkpoints written before they stored it, zoo models) the run directory of the checkpoint
    (``<run>/checkpoints/<file>``) or the zoo entry."""
    stored = checkpoint.get("training_run")
    if stored:
        return {"name": stored.get("name"), "wandb_id": stored.get("wandb_id")}
    if "zoo" in checkpoint:
        return {"name": str(checkpoint["zoo"]), "wandb_id": None}
    return {"name": Path(str(cfg.ckpt_path)).resolve().parent.parent.name, "wandb_id": None}


@task_wrapper
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    refuse_float16(cfg.trainer.get("precision", "32-true"), "trainer.precision", "evaluation")  # before any work
    checkpoint, run_cfg, data_cfg = load_run_settings(cfg)
    run_cfg = with_noise_per(run_cfg, cfg.get("noise_per"))  # a noise-injected model's draws: as stored, or chosen here
    processes_and_data = OmegaConf.create({"trainer": cfg.trainer, "data": data_cfg})
    check_batch_size(processes_and_data)
    check_eval_subsets(processes_and_data, ("test",))
    evaluations = build_evaluations(cfg.get("evaluation"))
    smoothing = smoothing_config(cfg.get("smoothing"))
    unsmoothed = [e.name for e in evaluations if e.requires_smoothing] if smoothing is None else []
    if unsmoothed:
        raise ConfigError(f"evaluations {unsmoothed} need a smoothed classifier: set smoothing.sigma (e.g. 0.25)")
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(data_cfg)
    for evaluation in evaluations:  # e.g. a transfer source made for other images: refused before any work
        evaluation.check_target(datamodule.num_classes, model_input(OmegaConf.create({"data": data_cfg})))
    net = prepare_net(load_model(checkpoint, run_cfg, datamodule.num_classes), cfg.get("perf"))
    if smoothing is not None:
        net = instantiate(smoothing, base=net).eval()
    out = Path(cfg.paths.output_dir)
    sigma = f"sigma {smoothing.sigma}" if smoothing is not None else ""
    meta = {
        "title": f"{describe_model(run_cfg)} {sigma}".strip(),
        "model": describe_model(run_cfg),
        "method": checkpoint.get("hyper_parameters", {}).get("method"),
        "train_run": training_preset(run_cfg),
        "norm": str(cfg.threat.norm),
        "eps": parse_budget(cfg.threat.eps, "threat.eps"),
        "ckpt_path": run_source(cfg, checkpoint),
        "seed": int(cfg.seed),
        "split": str(data_cfg.get("eval_split") or "test"),
        "evaluation_config": to_plain(cfg.evaluation),
        "smoothing": to_plain(smoothing) if smoothing is not None else None,
        "precision": str(cfg.trainer.get("precision", "32-true")),
        "model_config": to_plain(run_cfg.model),
        "noise_per": weight_noise_per(net),  # how a noise-injected model drew its weight noise (None: no weight noise)
    }
    meta["training_run"] = evaluated_run(cfg, checkpoint)
    module = EvaluationModule(net, evaluations, seed=cfg.seed, output_dir=out, meta=meta,
                              artifacts=bool(cfg.get("wandb_artifacts")))  # fmt: skip
    with open_dict(cfg):  # the training preset joins the tags (wandb filters runs by it)
        cfg.tags = evaluation_tags(cfg.get("tags"), meta["train_run"])
        cfg.training_run = meta["training_run"]  # in the logged config: which run this evaluates
        if cfg.get("wandb_group") is None:  # outside a sweep, the evaluations of a run appear as one group
            cfg.wandb_group = meta["training_run"]["wandb_id"] or meta["training_run"]["name"]
    loggers = instantiate_loggers(cfg.get("logger"))
    for lg in loggers:
        lg.log_hyperparams({**to_plain(OmegaConf.to_container(cfg, resolve=True)), "meta": meta})
    callbacks = [*instantiate_callbacks(cfg.get("callbacks"), cfg.trainer), *runtime_callbacks(cfg.trainer)]
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    trainer.test(module, datamodule=datamodule, verbose=False)

    # written by the module on rank 0 before every rank returned from test (one barrier); under
    # ddp_spawn this process never held the records, and reads the file the workers wrote
    results = json.loads((out / "results.json").read_text())
    if trainer.is_global_zero:
        accs = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k.endswith("/acc"))
        print(f"\n[safespot] {accs} on {results['n_images']} images")
        print(f"[safespot] records and results: {out}")
    return results
