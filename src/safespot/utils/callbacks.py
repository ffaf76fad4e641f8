"""Callbacks of the default training and evaluation runs (what users of Lightning + Hydra
templates expect): a learning-rate monitor and the last step of every spawned DDP worker. The
progress bar is :mod:`safespot.utils.progress`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor as _LearningRateMonitor
from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


class LearningRateMonitor(_LearningRateMonitor):
    """Lightning's learning-rate monitor, idle when the run has no logger (``logger=none``)
    instead of refusing to start."""

    def on_train_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._idle = not trainer.loggers
        if not self._idle:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if not getattr(self, "_idle", False):
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if not getattr(self, "_idle", False):
            super().on_train_epoch_start(trainer, *args, **kwargs)


class ModelCheckpoint(_ModelCheckpoint):
    """Lightning's checkpoint callback (same arguments) whose ``last.ckpt`` is the latest epoch's, as
    a run resumed from it expects, and whose best checkpoints survive a resume into a new directory.

    Lightning (2.6) writes ``last.ckpt`` only when a top-k checkpoint is written in the same step, so
    with ``save_top_k=1`` it stays at the best epoch and a run resumed from it repeats the epochs
    after the best one. And a run resumed into another directory (every resume here: run
    directories are never reused, :mod:`safespot.utils.run_dirs`) gets back only the path of the
    best checkpoint, not its score: the first epoch after the resume became the "best" however it
    scored, so the best robust checkpoint (Rice et al.'s early stopping) was the best of the epochs
    after the resume (and a run resumed into a directory of the same name, the interrupted one moved
    aside, named a best checkpoint that was not there). Here the best checkpoints of the run
    resumed from are copied into the run's directory with their scores (:meth:`on_train_start`):
    found where the checkpoint names them or, when that run directory was moved, beside the
    checkpoint resumed from."""

    _carried: dict[str, Any] | None = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        held = [state_dict.get("best_model_path"), *(state_dict.get("best_k_models") or {})]
        if state_dict.get("dirpath", self.dirpath) == self.dirpath and all(not p or Path(p).is_file() for p in held):
            super().load_state_dict(state_dict)  # the same directory, its files in place (a requeued job)
            return
        self.best_model_path = state_dict["best_model_path"]
        best = dict(state_dict.get("best_k_models") or {})
        if not best and self.best_model_path and state_dict.get("best_model_score") is not None:
            best = {self.best_model_path: state_dict["best_model_score"]}
        self._carried = {"best": self.best_model_path, "models": best}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._carry(trainer, together=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A run resumed from the last epoch's checkpoint trains no epoch (no ``on_train_start``):
        the best checkpoint is carried over here, for the test stage that follows."""
        super().on_fit_end(trainer, pl_module)
        self._carry(trainer, together=False)  # the processes may have left their group: rank 0 copies

    def _carry(self, trainer: L.Trainer, together: bool) -> None:
        carried, self._carried = self._carried, None
        if not carried or not carried["models"] or self.dirpath is None:
            return
        beside = Path(trainer.ckpt_path).parent if trainer.ckpt_path else None
        found: dict[str, Path] = {}
        for path in carried["models"]:
            for candidate in (Path(path), beside / Path(path).name if beside else None):
                if candidate is not None and candidate.is_file():
                    found[path] = candidate
                    break
        if carried["best"] not in found:
            rank_zero_warn(
                f"the best checkpoint of the run resumed from ({carried['best']}) is not there nor beside "
                f"{trainer.ckpt_path}: the best checkpoint of this run is the best of the epochs after the resume"
            )
            self.best_model_path = ""
            return
        target = Path(self.dirpath)
        if trainer.is_global_zero:
            target.mkdir(parents=True, exist_ok=True)
            for source in found.values():
                if not (target / source.name).exists():
                    shutil.copy2(source, target / source.name)
        if together:
            trainer.strategy.barrier("carry the best checkpoints")
        models = carried["models"].items()
        self.best_k_models = {str(target / found[p].name): score for p, score in models if p in found}
        self.best_model_path = str(target / found[carried["best"]].name)
        self.best_model_score = self.best_k_models[self.best_model_path]
        kth = max if self.mode == "min" else min
        self.kth_best_model_path = kth(self.best_k_models, key=self.best_k_models.get)
        self.kth_value = self.best_k_models[self.kth_best_model_path]
        if (target / "last.ckpt").is_file():  # written next to it from now on, not beside it as last-v1
            self.last_model_path = str(target / "last.ckpt")

    def _last_due(self, trainer: L.Trainer, at_train_epoch_end: bool) -> bool:
        return (
            bool(self.save_last)
            and not self._should_skip_saving_checkpoint(trainer)
            and self._should_save_on_train_epoch_end(trainer) == at_train_epoch_end
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        due = self._last_due(trainer, at_train_epoch_end=True)
        super().on_train_epoch_end(trainer, pl_module)
        if due and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        due = self._last_due(trainer, at_train_epoch_end=False)
        super().on_validation_end(trainer, pl_module)
        if due and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class LeaveTogether(L.Callback):
    """The last hook of a ``fit`` / ``test`` in a spawned DDP worker (``ddp_spawn``, ``ddp_fork``):
    wait until every worker arrives, then leave the process group. Without it a worker that
    finished early (rank 1, while rank 0 still saves the weights it hands to the parent) leaves
    the group from its exit handler while its peers still hold connections to it, and gloo may
    abort it ("terminate called without an active exception", an intermittent SIGABRT). It
    serves all four commands, which all run on the Trainer. Processes launched
    as scripts (plain ``ddp``) go on to the next stage in the same group and are left alone."""

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            return
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        trainer.strategy.barrier(f"leave together after {getattr(stage, 'value', stage)}")
        torch.distributed.destroy_process_group()


class SaveOnTerm(L.Callback):
    """Preemption: a training run stopped by SIGTERM (what SLURM sends when it preempts or cancels
    a job; Lightning stops the loop at the next batch) saves where it stopped, as Lightning saves on
    SLURM's requeue signal (SIGUSR1): an ``hpc_ckpt_<n>.ckpt`` in the run directory, from which the
    requeued job (same run directory, :mod:`safespot.utils.run_dirs`) resumes by itself."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)


def runtime_callbacks(trainer_cfg: Any = None) -> list[L.Callback]:
    """The callbacks every Trainer of the commands gets whatever ``callbacks`` says:
    :class:`LeaveTogether` and :class:`SaveOnTerm`. (Progress bar and model summary are entries of
    the ``callbacks`` group.)"""
    return [LeaveTogether(), SaveOnTerm()]
