"""The transfer attack (paper 003, Section 5; Papernot et al., 2017; Liu et al., 2017): adversarial
examples crafted with white-box access to a *source* model, here another trained run (e.g. a
second CNI-W instance), and evaluated on the target, the model under evaluation (its smoothed vote
when ``smoothing.sigma`` is set). The attacker never queries the target.

Records: ``<name>/...`` the target's prediction on the transferred examples, and
``<name>_source/...`` the source's own (whether the examples fooled the model they were made on).
With ``source_sigma`` the attack runs on the source's soft smoothed loss
(:class:`~safespot.smoothing.soft.SoftSmoothed`, ``source_m`` draws per pass): paper 003 reports
transfer "with and without smoothing" of the source.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from safespot.attacks.base import Attack
from safespot.errors import ConfigError
from safespot.evaluation.evaluations import AttackEvaluation
from safespot.runs import load_classifier, model_input
from safespot.smoothing.soft import SoftSmoothed


class TransferEvaluation(AttackEvaluation):
    """Args:
    name: the evaluation's name.
    attack: the attack run on the source (e.g. PGD-20, conf/attack/pgd20.yaml).
    source_ckpt_path: the source run's checkpoint (its own stored config builds its model).
    source_sigma: smooth the source for the attack (``None``: the plain source).
    source_m: noise draws per forward pass of the smoothed source.
    """

    def __init__(
        self,
        name: str,
        attack: Attack,
        source_ckpt_path: str | Path,
        source_sigma: float | None = None,
        source_m: int = 8,
    ) -> None:
        super().__init__(name, attack)
        if source_ckpt_path in (None, "", "???"):
            raise ConfigError(f"evaluation {name!r}: source_ckpt_path is required (the transfer attack's source run)")
        self.source_ckpt_path = str(Path(source_ckpt_path).resolve())
        # refuses a missing, unreadable or unsafe file, naming the setting
        net, self.source_cfg = load_classifier(source_ckpt_path, f"evaluation.{name}.source_ckpt_path")
        self.source: nn.Module = net if source_sigma is None else SoftSmoothed(net, source_sigma, source_m).eval()
        self.source_classes = int(self.source_cfg.data.num_classes)

    @property
    def outputs(self) -> list[str]:
        return [self.name, f"{self.name}_source"]

    def check_target(self, num_classes: int, input_shape: tuple[int, int]) -> None:
        source_shape = model_input(self.source_cfg)
        if self.source_classes != num_classes or source_shape != tuple(input_shape):
            raise ConfigError(
                f"evaluation {self.name!r}: the transfer source {self.source_ckpt_path} takes "
                f"{source_shape[0]}x{source_shape[1]}x{source_shape[1]} images with {self.source_classes} classes; "
                f"the evaluated model {input_shape[0]}x{input_shape[1]}x{input_shape[1]} with {num_classes}"
            )

    def _source_on(self, device: torch.device) -> nn.Module:
        if next(self.source.parameters()).device != device:
            self.source.to(device)
        return self.source

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        source = self._source_on(x.device)
        x_adv = self.points(source, x, y, seeds)  # white-box on the source only
        fields = self.score(model, x_adv, x, y, seeds=seeds)
        fields.update(self.score(source, x_adv, x, y, name=f"{self.name}_source", seeds=seeds))
        return fields, x_adv
