"""The classifier LightningModule every training method derives from.

It owns the network, the optimiser and scheduler factories, and the validation/test
metrics: clean accuracy and PGD robust accuracy on the held-out split every validation
epoch (``val/acc``, ``val/robust_acc``, ``val/robust_acc_best``), which drives the
best-robust-checkpoint selection of Rice et al. (2020, "Overfitting in adversarially robust
deep learning"). Subclasses implement :meth:`training_loss`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy

from safespot.attacks import PGD
from safespot.attacks.base import Attack, AttackSpec, attack_config, build_attack, check_attack
from safespot.threat import LpBall, ThreatConfigError, parse_budget
from safespot.utils.plain import to_plain
from safespot.utils.rng import rng_state, set_rng_state

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., dict[str, Any]]


def accuracy_metric(num_classes: int) -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes=num_classes, average="micro")


def build_eval_attack(threat: Mapping[str, Any], settings: AttackSpec, name: str = "val_attack") -> Attack | None:
    """The attack that measures robust accuracy, from a method's ``val_attack`` / ``test_attack``:
    an attack factory (a ``_partial_: true`` attack config, ``conf/attack/``) is called, an
    attack used as it is, ``None`` disables. A plain mapping holds PGD settings (configs before
    ``conf/attack/``): ``None`` when ``steps`` is 0, else PGD on ``threat`` with defaults
    10 steps, step eps/4, random start, one restart, eval mode."""
    if settings is None:
        return None
    if not isinstance(settings, Mapping):
        return build_attack(settings, name)
    settings = to_plain(settings)
    if "_target_" in settings:  # an attack config that was not instantiated
        return build_attack(hydra.utils.instantiate(settings), name)
    if settings.get("steps", 10) == 0:
        return None
    return PGD(
        threat["norm"],
        threat["eps"],
        steps=settings.get("steps", 10),
        step_size=settings.get("step_size"),
        random_start=settings.get("random_start", True),
        restarts=settings.get("restarts", 1),
        mode="eval",
    )


def build_train_attack(
    spec: AttackSpec, default: Callable[[], Attack], fixed: Mapping[str, Any] | None = None
) -> tuple[Attack, dict[str, Any] | None]:
    """The attack a method trains against, and the config to record with the checkpoint.

    ``spec`` is the method's ``train_attack``: an attack factory (a ``_partial_: true`` config
    from ``conf/attack/``: ``pgd_train``, ``fgsm_rs``, ``trades_kl``), an unresolved attack
    config (a mapping with ``_target_``, as stored in checkpoints), or an attack used as it is;
    ``None`` builds ``default()`` (the threat model's ``threat.steps`` steps of
    ``threat.step_size``). The settings the *method* owns (``fixed``: e.g. its ``attack_mode``
    as the attack's ``mode``, FGSM-RS's ``step_factor``, the EOT passes of noisy PGD) are bound
    into a factory, so the recorded config is the one that ran."""
    if spec is None:
        attack = default()
        return attack, attack_config(attack)
    if isinstance(spec, Mapping):
        settings = to_plain(spec)
        if "_target_" not in settings:
            raise ThreatConfigError(
                f"train_attack must be an attack config with _target_ (conf/attack/), got {settings}"
            )
        spec = hydra.utils.instantiate({**settings, "_partial_": True})
    if isinstance(spec, functools.partial):
        bound = dict(fixed or {})
        return check_attack(spec(**bound), "train_attack"), {**(attack_config(spec) or {}), **to_plain(bound)}
    attack = build_attack(spec, "train_attack")
    assert attack is not None
    return attack, attack_config(attack)


class ClassifierModule(L.LightningModule):
    """Base module.

    Args:
        net: an instantiated classifier (images in [0, 1] -> logits).
        optimizer: partial optimiser constructor taking ``params``.
        scheduler: optional partial taking ``optimizer``, ``max_epochs`` and ``total_steps``
            and returning a Lightning scheduler dict (see :mod:`safespot.optim`).
        threat: ``{norm, eps, step_size, steps}`` of the threat model (training budgets).
        val_attack / test_attack: the attacks that measure robust accuracy: attack factories
            (``_partial_: true`` configs from ``conf/attack/``, e.g. PGD-10 and PGD-20 on the
            threat model), attacks, or mappings of PGD settings (see :func:`build_eval_attack`);
            ``None`` disables. Their configs are recorded with the hyperparameters.
        monitor: the metric that selects the best checkpoint and that ``train.py`` returns.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        threat: Mapping[str, Any] | None = None,
        val_attack: AttackSpec = None,
        test_attack: AttackSpec = None,
        monitor: str = "val/robust_acc",
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.threat = to_plain(dict(threat or {"norm": "linf", "eps": "8/255", "step_size": "2/255", "steps": 10}))
        self.ball = LpBall(self.threat["norm"], self.threat["eps"])
        self.threat["eps"] = self.ball.eps
        self.threat["step_size"] = parse_budget(self.threat.get("step_size") or self.ball.eps / 4, "threat.step_size")
        self.val_attack = build_eval_attack(self.threat, val_attack, "val_attack")
        self.test_attack = build_eval_attack(self.threat, test_attack, "test_attack")
        self.monitor = monitor
        classes = int(num_classes or getattr(net, "num_classes", 0) or 0)
        if classes < 2:
            raise ValueError("num_classes must be given (or the net must define num_classes >= 2)")
        self.num_classes = classes
        self.train_acc = accuracy_metric(classes)
        self.val_acc, self.val_robust_acc = accuracy_metric(classes), accuracy_metric(classes)
        self.test_acc, self.test_robust_acc = accuracy_metric(classes), accuracy_metric(classes)
        self.val_robust_acc_best = MaxMetric()
        self.run_config: dict[str, Any] | None = None
        self.save_hyperparameters(
            {
                "method": type(self).__name__,
                "threat": self.threat,
                "val_attack": attack_config(val_attack),
                "test_attack": attack_config(test_attack),
                "monitor": monitor,
                "num_classes": classes,
                **self.extra_hparams(),
            }
        )

    def extra_hparams(self) -> dict[str, Any]:
        """Method-specific settings recorded with the checkpoint (plain types only)."""
        return {}

    # --- training -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(loss, logits used for the training accuracy)``."""
        raise NotImplementedError

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        loss, logits = self.training_loss(x, y)
        self.train_acc(logits.detach().argmax(1), y)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    # --- evaluation ---------------------------------------------------------------------
    def _evaluate(self, batch: tuple[torch.Tensor, ...], stage: str, attack: Attack | None) -> None:
        x, y = batch[0], batch[1]
        clean_acc, robust_acc = getattr(self, f"{stage}_acc"), getattr(self, f"{stage}_robust_acc")
        clean_acc(self.net(x).argmax(1), y)
        self.log(f"{stage}/acc", clean_acc, on_step=False, on_epoch=True, prog_bar=True)
        if attack is not None:
            x_adv = attack(self.net, x, y)
            with torch.no_grad():
                robust_acc(self.net(x_adv).argmax(1), y)
            self.log(f"{stage}/robust_acc", robust_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_train_start(self) -> None:
        self.val_robust_acc_best.reset()  # forget the sanity check

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_attack)

    def on_validation_epoch_end(self) -> None:
        if self.val_attack is not None and not self.trainer.sanity_checking:
            self.val_robust_acc_best(self.val_robust_acc.compute())
            self.log("val/robust_acc_best", self.val_robust_acc_best.compute(), sync_dist=True, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_attack)

    # --- optimisation -------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(
            optimizer=optimizer,
            max_epochs=self.trainer.max_epochs,
            total_steps=int(self.trainer.estimated_stepping_batches),
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # --- checkpoints --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["safespot_config"] = self.run_config
        checkpoint["rng_states"] = rng_state()
        checkpoint["training_run"] = training_run(self.run_config, self.loggers if self._trainer else [])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            set_rng_state(checkpoint["rng_states"])


def training_run(run_config: dict[str, Any] | None, loggers: Any) -> dict[str, Any]:
    """What names a training run wherever its checkpoint goes: its run directory's name and, when it
    logs to wandb, the wandb run's id (a resumed run continues it; evaluations are grouped under it)."""
    output_dir = ((run_config or {}).get("paths") or {}).get("output_dir")
    identity: dict[str, Any] = {"name": Path(str(output_dir)).name if output_dir else None, "wandb_id": None}
    for logger in loggers:
        if isinstance(logger, WandbLogger) and isinstance(logger.version, str):
            identity["wandb_id"] = logger.version
    return identity


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y)
