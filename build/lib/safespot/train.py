"""Training entry point: compose data, model, method, trainer, callbacks and loggers from a
Hydra config, fit, test the best checkpoint, and return the monitored metric."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from safespot.checks import check_train_config
from safespot.models.noise_injection import noise_parameter_names
from safespot.utils.callbacks import runtime_callbacks
from safespot.utils.checkpoint import (
    CheckpointError,
    SafeCheckpointIO,
    check_resumable,
    check_weights_fit,
    load_checkpoint,
    net_state_dict,
)
from safespot.utils.instantiate import instantiate, instantiate_callbacks, instantiate_loggers
from safespot.utils.logging import get_logger
from safespot.utils.performance import prepare_net
from safespot.utils.plain import to_plain
from safespot.utils.task import task_wrapper

log = get_logger("safespot.train")


def build_method(cfg: DictConfig, net: Any) -> L.LightningModule:
    optimizer = instantiate(cfg.optimizer)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    return instantiate(cfg.method, net=net, optimizer=optimizer, scheduler=scheduler, _convert_="all")


def initialise_from(net: Any, path: str, checkpoint: dict[str, Any] | None = None) -> None:
    """Load the network weights of the checkpoint at ``path`` (``checkpoint``: the one already
    loaded from it) into ``net`` (fine-tuning), refusing weights that do not fit the model
    config. The one exception: the noise parameters of noise-injected layers
    (:data:`~safespot.models.noise_injection.NOISE_PARAMETERS`) that the checkpoint lacks keep
    their initial values, so a noise-injected model can start from a noise-free adversarially
    trained one (paper 003, Section 4: "we start from an adversarially pre-trained base model
    and fine-tune it")."""
    checkpoint = load_checkpoint(path, "init_from") if checkpoint is None else checkpoint
    try:
        result = net.load_state_dict(net_state_dict(checkpoint), strict=False)
    except RuntimeError as err:
        raise CheckpointError(f"init_from={path}: its weights do not fit the model config: {err}") from None
    fresh_noise = noise_parameter_names(net)
    missing = [k for k in result.missing_keys if k not in fresh_noise]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"init_from={path}: its weights do not fit the model config: missing {missing}, "
            f"unexpected {list(result.unexpected_keys)}"
        )
    if result.missing_keys:
        log.info("noise parameters not in %s keep their initial values: %s", path, result.missing_keys)
    log.info("initialised the network from %s", path)


def load_start(cfg: DictConfig) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``(resume, init)``: the checkpoints of ``ckpt_path`` (a resume: checked to hold the
    training state) and ``init_from``, each read by the one safe loader before any work."""
    resume = init = None
    if cfg.get("ckpt_path"):
        resume = load_checkpoint(cfg.ckpt_path, "ckpt_path")
        check_resumable(resume, cfg.ckpt_path)
    if cfg.get("init_from"):
        init = load_checkpoint(cfg.init_from, "init_from")
    return resume, init


def continue_wandb_run(cfg: DictConfig, resume: dict[str, Any] | None) -> None:
    """A resumed run logs into the wandb run it continues: the id stored in the checkpoint it resumes
    from (``ckpt_path``, or the checkpoint a requeued SLURM job saved in its run directory), unless
    ``logger.wandb.id`` is set."""
    wandb_cfg = OmegaConf.select(cfg, "logger.wandb")
    if wandb_cfg is None or wandb_cfg.get("id"):
        return
    if resume is None:
        saved = sorted(Path(cfg.paths.output_dir).glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.split("_")[-1]))
        resume = load_checkpoint(saved[-1], "the requeued run's checkpoint") if saved else None
    run_id = ((resume or {}).get("training_run") or {}).get("wandb_id")
    if run_id:
        with open_dict(wandb_cfg):
            wandb_cfg.id, wandb_cfg.resume = run_id, "allow"


def best_monitored(checkpoint: Any) -> float | None:
    """The best monitored value of the checkpoint callback. Under ``ddp_spawn`` the callback in
    this (parent) process only learns ``best_model_path`` from the workers, so the score is read
    from that checkpoint's stored callback state."""
    if checkpoint is None:
        return None
    if checkpoint.best_model_score is not None:
        return float(checkpoint.best_model_score)
    if not checkpoint.best_model_path or not Path(checkpoint.best_model_path).is_file():
        return None
    state = load_checkpoint(checkpoint.best_model_path, "best_model_path").get("callbacks", {})
    for key, value in state.items():
        if key.startswith("ModelCheckpoint") and value.get("best_model_score") is not None:
            return float(value["best_model_score"])
    return None


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Train and test; returns ``(metrics, objects)``."""
    check_train_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    resume, init = load_start(cfg)
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model)
    if resume is not None:  # refused here, not at Lightning's restore after the splits are written
        check_weights_fit(net, resume, cfg.ckpt_path, "ckpt_path")
    if init is not None:
        initialise_from(net, cfg.init_from, init)
    continue_wandb_run(cfg, resume)
    del resume, init  # Lightning restores the resumed run from the file itself, through SafeCheckpointIO
    net = prepare_net(net, cfg.get("perf"))
    method = build_method(cfg, net)
    method.run_config = to_plain(OmegaConf.to_container(cfg, resolve=True))
    callbacks = [*instantiate_callbacks(cfg.get("callbacks"), cfg.trainer), *runtime_callbacks(cfg.trainer)]
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[SafeCheckpointIO()]
    )
    for lg in loggers:
        lg.log_hyperparams(method.run_config)

    if trainer.is_global_zero:  # e.g. data.download; the Trainer calls it again inside fit (a no-op then)
        datamodule.prepare_data()
    datamodule.setup("fit")
    if trainer.is_global_zero:
        datamodule.save_splits(output_dir / "splits.json")
    log.info(
        "training %s on %d images (%d validation)",
        type(method).__name__,
        len(datamodule.splits["train"]),
        len(datamodule.splits["val"]),
    )
    trainer.fit(method, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    checkpoint = trainer.checkpoint_callback
    best_path = getattr(checkpoint, "best_model_path", "") if checkpoint else ""
    best_score = best_monitored(checkpoint)
    if best_score is not None:
        metrics[f"{cfg.method.monitor}/best"] = best_score
    if cfg.get("test"):
        trainer.test(method, datamodule=datamodule, ckpt_path=best_path or None, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})

    if trainer.is_global_zero:
        summary = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("test/acc", "test/robust_acc") if k in metrics)
        print(f"\n[safespot] {summary or 'no test metrics'}")
        print(f"[safespot] best checkpoint: {best_path or '(none)'}")
        print(f"[safespot] run directory:   {output_dir}")
    return metrics, {"trainer": trainer, "method": method, "datamodule": datamodule, "best_path": best_path}


def run(cfg: DictConfig) -> float | None:
    """Hydra main body: train, and return the optimised metric for sweepers."""
    metrics, _ = train(cfg)
    key = f"{cfg.method.monitor}/best"
    return metrics.get(key, metrics.get(cfg.method.monitor))
