"""Adversarial weight perturbation (AWP; Wu, Xia & Wang, 2020, "Adversarial Weight Perturbation
Helps Robust Generalization", NeurIPS; Algorithm 1, AT-AWP) on top of PGD adversarial training:
the strongest baseline of paper 004's Table 1.

AWP minimises the robust loss at the worst weights of a neighbourhood relative to each layer's
size, as well as at the worst inputs (Wu et al., Eq. 6):

    min_w  max_{v in V(w)}  (1/n) sum_i  max_{x'_i in B_eps(x_i)}  CE(f_{w+v}(x'_i), y_i),
    V(w) = {v : ||v_l|| <= gamma ||w_l|| for every layer l}.

Every batch (Algorithm 1):

1. ``x'`` by PGD on the network with its weights ``w`` (the method's training attack, as in
   :class:`~safespot.methods.adversarial.AdversarialTraining`);
2. ``v`` from 0 by ``weight_steps`` steps of layer-wise normalised, projected ascent on the loss
   at ``x'``::

       v_l <- Proj_{||v_l|| <= gamma ||w_l||} ( v_l + eta_2 ||w_l|| g_l / ||g_l|| ),
       g_l = grad_{v_l} CE(f_{w+v}(x'), y),

   for every layer ``l``: every weight tensor with more than one dimension (convolution and linear
   weights; biases and batch-norm parameters are not perturbed);
3. one optimiser step on ``CE(f_{w+v}(x'), y)`` taken at ``w + v``, then ``v`` removed:
   ``w <- (w + v) - eta grad_{w+v} CE(f_{w+v}(x'), y) - v`` (weight decay and momentum see the
   perturbed weights, as the paper's update does).

Defaults: ``gamma = 5e-3`` (Wu et al.'s CIFAR-10 setting for AT-AWP), one ascent step
(``weight_steps = 1``) of size ``eta_2 = gamma`` (``weight_step_size``), so that the step reaches
the bound: ``v_l = gamma ||w_l|| g_l / ||g_l||``, the perturbation of the paper's one-step AWP; no
warm-up (``warmup_epochs``: epochs of plain adversarial training before AWP starts).

The ascent's forward passes run in the network's current (training) mode and leave batch-norm
running statistics and parameter gradients as they were (the ascent probes the loss, as Wu et al.'s
proxy network, a copy, does). With several processes the ascent's gradient is averaged over them, so
that every replica is perturbed by the same ``v`` and the replicas stay equal. The step happens in
Lightning's automatic optimisation: :meth:`AWPTraining.optimizer_step` removes ``v`` right after
it; gradient accumulation (several batches per step) is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from safespot.errors import ConfigError
from safespot.methods.adversarial import AdversarialTraining
from safespot.methods.base import cross_entropy

_NORMS = nn.modules.batchnorm._NormBase
_TINY = 1e-20

Perturbation = dict[str, torch.Tensor]


def check_awp_settings(gamma: float, weight_steps: int, weight_step_size: float | None, warmup_epochs: int) -> None:
    """``gamma > 0``, ``weight_steps >= 1``, ``weight_step_size > 0`` (or ``None``) and
    ``warmup_epochs >= 0``, else one :class:`ConfigError` naming the setting."""
    if not float(gamma) > 0:
        raise ConfigError(f"method.gamma must be > 0 (AWP's relative perturbation size), got {gamma!r}")
    if isinstance(weight_steps, bool) or not isinstance(weight_steps, int) or weight_steps < 1:
        raise ConfigError(f"method.weight_steps must be an integer >= 1, got {weight_steps!r}")
    if weight_step_size is not None and not float(weight_step_size) > 0:
        raise ConfigError(f"method.weight_step_size must be > 0 or null (gamma), got {weight_step_size!r}")
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
        raise ConfigError(f"method.warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")


def project_layer(v: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """``v`` scaled onto the ball ``||v|| <= bound`` (unchanged inside it)."""
    return v * torch.clamp(bound / (v.norm() + _TINY), max=1.0)


class AWPTraining(AdversarialTraining):
    """PGD adversarial training with adversarial weight perturbation (see the module docstring).

    Args (besides those of :class:`~safespot.methods.adversarial.AdversarialTraining`):
        gamma: the relative size of each layer's perturbation, ``||v_l|| <= gamma ||w_l||``.
        weight_steps: ascent steps on ``v`` per batch (``K_2``).
        weight_step_size: the ascent's step size ``eta_2`` in units of ``||w_l||`` (``None``: gamma).
        warmup_epochs: epochs of plain adversarial training before AWP starts.
    """

    def __init__(
        self,
        *args: Any,
        gamma: float = 5e-3,
        weight_steps: int = 1,
        weight_step_size: float | None = None,
        warmup_epochs: int = 0,
        **kwargs: Any,
    ) -> None:
        check_awp_settings(gamma, weight_steps, weight_step_size, warmup_epochs)
        self.gamma = float(gamma)
        self.weight_steps = int(weight_steps)
        self.weight_step_size = self.gamma if weight_step_size is None else float(weight_step_size)
        self.warmup_epochs = int(warmup_epochs)
        super().__init__(*args, **kwargs)
        if self.adv_weight != 1.0:
            raise ConfigError("method=awp trains on the adversarial loss alone: adv_weight must be 1")
        self._perturbation: Perturbation = {}

    def extra_hparams(self) -> dict[str, Any]:
        return {
            **super().extra_hparams(),
            "gamma": self.gamma,
            "weight_steps": self.weight_steps,
            "weight_step_size": self.weight_step_size,
            "warmup_epochs": self.warmup_epochs,
        }

    def setup(self, stage: str) -> None:
        accumulate = getattr(self._trainer, "accumulate_grad_batches", 1) if self._trainer is not None else 1
        if accumulate != 1:
            raise ConfigError(accumulation_error(accumulate))

    # --- the weight perturbation -------------------------------------------------------------
    def perturbed_layers(self) -> dict[str, nn.Parameter]:
        """The weights AWP perturbs: every trainable parameter with more than one dimension."""
        return {n: p for n, p in self.net.named_parameters() if p.dim() > 1 and p.requires_grad}

    def awp_active(self) -> bool:
        """Whether this epoch perturbs the weights (after ``warmup_epochs`` epochs)."""
        return self.current_epoch >= self.warmup_epochs

    def weight_perturbation(self, x_adv: torch.Tensor, y: torch.Tensor) -> Perturbation:
        """``{layer name: v_l}`` maximising ``CE(f_{w+v}(x_adv), y)`` within ``||v_l|| <= gamma
        ||w_l||`` (step 2 of the module docstring); the weights, batch-norm statistics and
        parameter gradients are as before on return."""
        layers = self.perturbed_layers()
        bounds = {n: self.gamma * p.detach().norm() for n, p in layers.items()}
        sizes = {n: self.weight_step_size * p.detach().norm() for n, p in layers.items()}
        v = {n: torch.zeros_like(p) for n, p in layers.items()}
        with kept_norm_statistics(self.net):
            for _ in range(self.weight_steps):
                grads = self._perturbed_gradient(layers, v, x_adv, y)
                with torch.no_grad():
                    for name, grad in grads.items():
                        step = sizes[name] * grad / (grad.norm() + _TINY)
                        v[name] = project_layer(v[name] + step, bounds[name])
        return v

    def _perturbed_gradient(
        self, layers: dict[str, nn.Parameter], v: Perturbation, x_adv: torch.Tensor, y: torch.Tensor
    ) -> Perturbation:
        """The gradient of ``CE(f_{w+v}(x_adv), y)`` with respect to each layer's weights at
        ``w + v`` (averaged over processes), the weights restored to ``w`` exactly."""
        saved = {n: p.detach().clone() for n, p in layers.items()}
        shift_weights(layers, v, 1.0)
        try:
            loss = cross_entropy(self.net(x_adv), y)
            grads = torch.autograd.grad(loss, list(layers.values()), allow_unused=True)
        finally:
            with torch.no_grad():
                for name, p in layers.items():
                    p.copy_(saved[name])
        found = {n: g for n, g in zip(layers, grads, strict=True) if g is not None}
        return self._averaged(found)

    def _averaged(self, grads: Perturbation) -> Perturbation:
        """``grads`` averaged over the processes of the run (as they are with one)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1 or not grads:
            return grads
        flat = torch.cat([g.reshape(-1) for g in grads.values()])
        flat = trainer.strategy.reduce(flat, reduce_op="mean")
        out, offset = {}, 0
        for name, g in grads.items():
            out[name] = flat[offset : offset + g.numel()].view_as(g)
            offset += g.numel()
        return out

    def apply_perturbation(self, v: Perturbation) -> None:
        """Add ``v`` to the weights until :meth:`remove_perturbation`."""
        if self._perturbation:
            raise RuntimeError("AWP: a weight perturbation is still applied")
        shift_weights(self.perturbed_layers(), v, 1.0)
        self._perturbation = v

    def remove_perturbation(self) -> None:
        """Subtract the applied perturbation (none: nothing to do)."""
        if self._perturbation:
            shift_weights(self.perturbed_layers(), self._perturbation, -1.0)
            self._perturbation = {}

    # --- training ----------------------------------------------------------------------------
    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``CE(f_{w+v}(x'), y)`` and its logits, the weights left at ``w + v`` for the optimiser
        step (steps 1-3 of the module docstring)."""
        x_adv = self.adversarial_examples(x, y)
        if self.awp_active():
            self.apply_perturbation(self.weight_perturbation(x_adv, y))
        logits = self.net(x_adv)
        return cross_entropy(logits, y), logits

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """The optimiser step (its closure runs :meth:`training_step` and the backward pass) at the
        perturbed weights, then the perturbation removed."""
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            self.remove_perturbation()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.remove_perturbation()  # a batch whose step was skipped leaves none behind


def accumulation_error(accumulate: int) -> str:
    return (
        f"method=awp perturbs the weights for the one optimiser step of each batch: "
        f"trainer.accumulate_grad_batches must be 1, got {accumulate}"
    )


def shift_weights(layers: dict[str, nn.Parameter], v: Perturbation, sign: float) -> None:
    """``w_l += sign * v_l`` in place for the layers ``v`` names."""
    with torch.no_grad():
        for name, delta in v.items():
            layers[name].add_(delta, alpha=sign)


@contextmanager
def kept_norm_statistics(net: nn.Module) -> Iterator[None]:
    """Within the block batch-norm running statistics may change; on exit they are restored."""
    saved = [(b, b.detach().clone()) for m in net.modules() if isinstance(m, _NORMS) for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
