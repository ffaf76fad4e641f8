"""Adversarial training of a Feature Level Stochastic Smoothing classifier (FLSS; Addepalli et
al., 2021, "Boosting Adversarial Robustness using Feature Level Stochastic Smoothing", paper 004,
Section 4.2, Algorithm 1, Eqs. 1-2).

The network is a :class:`safespot.models.StochasticClassifier`, ``C(x, e) = M(mu(x) + Sigma(x) ⊙
e)``. Every batch takes two optimiser steps (Lightning manual optimisation):

1. **adversarial step** (Algorithm 1, lines 4-10; Eq. 1): draw ``e ~ N(0, I)`` once; craft
   ``x~`` by PGD (``threat.steps`` steps of ``threat.step_size`` inside ``B_eps(x) ∩ [0, 1]``
   from a uniform random start) ascending ``CE(C(x~, e), y)`` with that ``e`` held fixed at
   every step; then minimise

       CE(C(x~, e), y) + KL1 + KL2 + KL3,
       KL1 = KL(N(E(x)) || N(0, I)),
       KL2 = KL(N(E(x~)) || N(E(x))),
       KL3 = KL(softmax C(x~, e) || softmax C(x~, 0));

2. **clean step** (lines 11-15; Eq. 2), after the first update: draw a fresh ``e'`` and minimise

       CE(C(x, e'), y) + KL1 + KL4,   KL4 = KL(softmax C(x, e') || softmax C(x, 0)).

Reading of the paper. ``N(E(x))`` is the diagonal Gaussian ``N(mu(x), diag Sigma(x)^2)``; KL1 and
KL2 are the closed-form KL divergences between diagonal Gaussians (Section 4.2), summed over the
latent dimensions (the KL of the distributions themselves, as in the VAE objective of Kingma &
Welling) and averaged over the batch; KL3 and KL4 are KL divergences between the softmax outputs,
the sampled one first as written in Algorithm 1, averaged over the batch. Gradients flow through
both arguments of every KL term (the paper stops none). Training draws ``e`` from the standard
normal regardless of the model's test-time ``sd_scale``.

Weights. Eqs. 1-2 add the terms with weight 1, which ``kl_weights`` defaults to. With the exact
(summed) KL1 at weight 1 the encoder collapses onto the prior (``mu = 0``, ``Sigma = 1``) before the
classifier learns anything, and the cross-entropy stays at ``log K``; ``conf/method/flss.yaml``
therefore weights KL1 by 0.01 and KL2 by 0.01 during the first 5 epochs (``kl_warmup``), the
values of the authors' released training script (docs/flss.md lists the other differences). That
script's smaller softmax weights (KL3 0.01, KL4 0.1 in these units) are the config option
``method/kl_weights=authors``, a named departure from the text.

Adversarial weight perturbation (AWP; Wu et al., 2020, "Adversarial Weight Perturbation Helps
Robust Generalization"), the 11th iteration of the paper's attack, is optional (``awp``): the
gradient of the Eq. 1 loss at ``(x~, e)`` with respect to every weight tensor (parameters with
more than one dimension), rescaled per layer to ``gamma * ||w_l||``, is added to the weights for
the adversarial step's gradient and removed again after that update.

Validation and test metrics (``val/acc``, ``val/robust_acc``, checkpoint selection) use the
no-sampling classifier ``C(x, 0)`` (the paper's "NS" accuracies), attacked and scored
deterministically.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from safespot.attacks import Attack, attack_context
from safespot.attacks.context import AttackMode
from safespot.errors import ConfigError
from safespot.methods.adversarial import AdversarialTraining
from safespot.methods.base import cross_entropy
from safespot.models.stochastic import is_stochastic

KL_TERMS: tuple[str, ...] = ("kl1", "kl2", "kl3", "kl4")
_NORMS = nn.modules.batchnorm._NormBase


def gaussian_kl(
    mu_p: torch.Tensor,
    sigma_p: torch.Tensor,
    mu_q: torch.Tensor | None = None,
    sigma_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample ``KL(N(mu_p, diag sigma_p^2) || N(mu_q, diag sigma_q^2))`` in closed form,
    summed over the last dimension; ``q`` defaults to ``N(0, I)`` (paper 004, Algorithm 1,
    lines 6-7):

        sum_j [ log(sigma_q,j / sigma_p,j) + (sigma_p,j^2 + (mu_p,j - mu_q,j)^2) / (2 sigma_q,j^2) - 1/2 ].
    """
    mu_p, sigma_p = mu_p.float(), sigma_p.float()
    mu_q = torch.zeros_like(mu_p) if mu_q is None else mu_q.float()
    sigma_q = torch.ones_like(sigma_p) if sigma_q is None else sigma_q.float()
    terms = torch.log(sigma_q) - torch.log(sigma_p) + (sigma_p**2 + (mu_p - mu_q) ** 2) / (2 * sigma_q**2) - 0.5
    return terms.sum(-1)


def softmax_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``KL(softmax(p_logits) || softmax(q_logits))`` (paper 004, Algorithm 1, lines 8
    and 13, with ``p`` the sampled and ``q`` the no-sampling output)."""
    log_p = F.log_softmax(p_logits.float(), dim=-1)
    log_q = F.log_softmax(q_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class FixedDraw(nn.Module):
    """``x -> C(x, e)`` with the latent draw ``e`` (one row per image) held fixed, so that an
    attack's every step sees the same stochastic classifier (paper 004, Algorithm 1, line 5)."""

    def __init__(self, net: nn.Module, eps: torch.Tensor, scale: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.eps = eps
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, eps=self.eps, scale=self.scale)


def check_kl_weights(weights: Mapping[str, Any] | None) -> dict[str, float]:
    """``{kl1..kl4: weight >= 0}``, 1 for every term not given."""
    given = dict(weights or {})
    unknown = sorted(set(given) - set(KL_TERMS))
    if unknown:
        raise ValueError(f"kl_weights: unknown terms {unknown}; expected a subset of {list(KL_TERMS)}")
    out = {k: float(given.get(k, 1.0)) for k in KL_TERMS}
    bad = {k: v for k, v in out.items() if not v >= 0}
    if bad:
        raise ValueError(f"kl_weights must be >= 0, got {bad}")
    return out


def check_kl_warmup(warmup: Mapping[str, Any] | None) -> tuple[int, dict[str, float]]:
    """``(epochs, {term: weight})``: weights that replace ``kl_weights`` during the first epochs."""
    if not warmup:
        return 0, {}
    unknown = sorted(set(warmup) - {"epochs", "weights"})
    if unknown:
        raise ValueError(f"kl_warmup: unknown settings {unknown}; expected epochs and weights")
    epochs = int(warmup.get("epochs", 0))
    if epochs < 0:
        raise ValueError(f"kl_warmup.epochs must be >= 0, got {epochs}")
    weights = dict(warmup.get("weights") or {})
    full = check_kl_weights(weights)
    return epochs, {k: full[k] for k in weights}


def check_awp(awp: Mapping[str, Any] | None) -> dict[str, float] | None:
    """AWP settings ``{gamma > 0, warmup_epochs >= 0}`` or ``None`` (off)."""
    if not awp or not awp.get("enabled", True):
        return None
    unknown = sorted(set(awp) - {"enabled", "gamma", "warmup_epochs"})
    if unknown:
        raise ValueError(f"awp: unknown settings {unknown}; expected gamma, warmup_epochs (and enabled)")
    settings = {"gamma": float(awp.get("gamma", 5e-3)), "warmup_epochs": int(awp.get("warmup_epochs", 0))}
    if not settings["gamma"] > 0 or settings["warmup_epochs"] < 0:
        raise ValueError(f"awp needs gamma > 0 and warmup_epochs >= 0, got {dict(awp)}")
    return settings


class FLSSTraining(AdversarialTraining):
    """FLSS adversarial training (paper 004, Algorithm 1) with two optimiser steps per batch.

    Args (besides those of :class:`~safespot.methods.base.ClassifierModule`):
        kl_weights: weights of ``kl1`` .. ``kl4`` (1 each as written in the paper's Eqs. 1-2; see
            docs/flss.md for the configured values).
        kl_warmup: ``{epochs, weights}``: weights replacing those of ``kl_weights`` during the first
            ``epochs`` epochs (e.g. a small KL2 weight while the latent forms).
        awp: ``None`` (off) or ``{gamma, warmup_epochs}``: AWP's relative perturbation size and the
            epochs before AWP starts.
        attack_mode, attack_updates_bn: the network's mode during the attack and whether the
            attack's forward passes may update batch-norm statistics (as in
            :class:`~safespot.methods.adversarial.AdversarialTraining`).
    """

    def __init__(
        self,
        *args: Any,
        kl_weights: Mapping[str, Any] | None = None,
        kl_warmup: Mapping[str, Any] | None = None,
        awp: Mapping[str, Any] | None = None,
        attack_mode: AttackMode = "eval",
        attack_updates_bn: bool = False,
        **kwargs: Any,
    ) -> None:
        self.kl_weights = check_kl_weights(kl_weights)
        self.kl_warmup_epochs, self.kl_warmup_weights = check_kl_warmup(kl_warmup)
        self.awp = check_awp(awp)
        super().__init__(*args, attack_mode=attack_mode, attack_updates_bn=attack_updates_bn, **kwargs)
        self.check_net()  # before any data is read
        self.automatic_optimization = False
        self._epoch_scheduled = -1

    def extra_hparams(self) -> dict[str, Any]:
        warmup = {"epochs": self.kl_warmup_epochs, "weights": self.kl_warmup_weights}
        return {**super().extra_hparams(), "kl_weights": self.kl_weights, "kl_warmup": warmup, "awp": self.awp}

    @property
    def current_kl_weights(self) -> dict[str, float]:
        """The KL weights of the current epoch (warm-up weights first, if any)."""
        if self.kl_warmup_epochs and self.current_epoch < self.kl_warmup_epochs:
            return {**self.kl_weights, **self.kl_warmup_weights}
        return self.kl_weights

    def check_net(self) -> None:
        if not is_stochastic(self.net):
            raise ConfigError(
                f"method=flss trains a stochastic classifier, got {type(self.net).__name__}; "
                "choose model=flss_preact_resnet18 or model=flss_small_cnn"
            )

    def setup(self, stage: str) -> None:
        self.check_net()

    # --- the two losses ------------------------------------------------------------------
    def draw(self, x: torch.Tensor) -> torch.Tensor:
        """One ``e ~ N(0, I)`` per image, shaped like the latent."""
        return torch.randn(x.shape[0], self.net.latent_dim, device=x.device)

    def adversarial_examples(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """``x~`` by PGD on ``CE(C(x~, e), y)`` with ``e`` held fixed (Algorithm 1, line 5)."""
        eps = self.draw(x) if eps is None else eps
        with attack_context(self.net, update_bn=self.attack_updates_bn):
            return self.train_attack(FixedDraw(self.net, eps), x, y)

    def adversarial_loss(
        self, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Eq. 1: ``(loss, terms, logits of C(x~, e))``."""
        net, w = self.net, self.current_kl_weights
        mu_c, sigma_c = net.encode(x)
        mu_a, sigma_a = net.encode(x_adv)
        logits = net.head(net.reparameterize(mu_a, sigma_a, eps, 1.0))
        logits_ns = net.head(mu_a)
        terms = {
            "ce_adv": cross_entropy(logits, y),
            "kl1": gaussian_kl(mu_c, sigma_c).mean(),
            "kl2": gaussian_kl(mu_a, sigma_a, mu_c, sigma_c).mean(),
            "kl3": softmax_kl(logits, logits_ns).mean(),
        }
        loss = terms["ce_adv"] + w["kl1"] * terms["kl1"] + w["kl2"] * terms["kl2"] + w["kl3"] * terms["kl3"]
        return loss, terms, logits

    def clean_loss(
        self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Eq. 2: ``(loss, terms, logits of C(x, e'))``."""
        w = self.current_kl_weights
        mu, sigma = self.net.encode(x)
        logits = self.net.head(self.net.reparameterize(mu, sigma, eps, 1.0))
        logits_ns = self.net.head(mu)
        terms = {
            "ce_clean": cross_entropy(logits, y),
            "kl1_clean": gaussian_kl(mu, sigma).mean(),
            "kl4": softmax_kl(logits, logits_ns).mean(),
        }
        loss = terms["ce_clean"] + w["kl1"] * terms["kl1_clean"] + w["kl4"] * terms["kl4"]
        return loss, terms, logits

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The adversarial step's loss (Eq. 1) and its logits; training itself runs both steps
        in :meth:`training_step`."""
        eps = self.draw(x)
        loss, _, logits = self.adversarial_loss(x, self.adversarial_examples(x, y, eps), y, eps)
        return loss, logits

    # --- adversarial weight perturbation ---------------------------------------------------
    def awp_active(self) -> bool:
        return self.awp is not None and self.current_epoch >= self.awp["warmup_epochs"]

    def weight_perturbation(
        self, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, eps: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """AWP (Wu et al., 2020): the weight perturbation ``v_l = gamma * ||w_l|| * g_l / ||g_l||``
        for every parameter ``w_l`` with more than one dimension, ``g_l`` the gradient of the Eq. 1
        loss at ``(x~, e)``: one ascent step of a proxy network, rescaled per layer, is this
        direction whatever its step size. Returns ``{parameter name: v_l}``; parameter gradients
        and batch-norm statistics are left untouched."""
        assert self.awp is not None
        params = {n: p for n, p in self.net.named_parameters() if p.dim() > 1 and p.requires_grad}
        saved = [(b, b.detach().clone()) for m in self.net.modules() if isinstance(m, _NORMS) for b in m.buffers()]
        try:
            loss, _, _ = self.adversarial_loss(x, x_adv, y, eps)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        finally:
            with torch.no_grad():
                for buf, copy_ in saved:
                    buf.copy_(copy_)
        perturbation: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for (name, w), grad in zip(params.items(), grads, strict=True):
                if grad is not None:
                    perturbation[name] = self.awp["gamma"] * w.norm() / (grad.norm() + 1e-20) * grad
        return perturbation

    def _shift_weights(self, perturbation: dict[str, torch.Tensor], sign: float) -> None:
        weights = dict(self.net.named_parameters())
        with torch.no_grad():
            for name, v in perturbation.items():
                weights[name].add_(v, alpha=sign)

    # --- one batch: two optimiser steps -----------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        optimizer = self.optimizers()
        # step 1: adversarial samples (Algorithm 1, lines 4-10)
        eps = self.draw(x)
        x_adv = self.adversarial_examples(x, y, eps)
        perturbation = self.weight_perturbation(x, x_adv, y, eps) if self.awp_active() else {}
        self._shift_weights(perturbation, 1.0)
        loss_adv, terms_adv, logits_adv = self.adversarial_loss(x, x_adv, y, eps)
        optimizer.zero_grad()
        self.manual_backward(loss_adv)
        optimizer.step()
        self._shift_weights(perturbation, -1.0)
        # step 2: clean samples with a fresh draw (lines 11-15)
        loss_clean, terms_clean, _ = self.clean_loss(x, y, self.draw(x))
        optimizer.zero_grad()
        self.manual_backward(loss_clean)
        optimizer.step()
        self.step_schedulers(batch_idx)

        loss = loss_adv.detach() + loss_clean.detach()
        self.train_acc(logits_adv.detach().argmax(1), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        parts = {"loss_adv": loss_adv, "loss_clean": loss_clean, **terms_adv, **terms_clean}
        for key, value in parts.items():
            self.log(f"train/{key}", value.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss

    # --- learning-rate schedules under manual optimisation ---------------------------------
    def step_schedulers(self, batch_idx: int) -> None:
        """Step the schedulers as Lightning's automatic optimisation would: ``step``-interval
        ones after every batch (every ``frequency`` batches), ``epoch``-interval ones after the
        epoch's last training batch, before validation and checkpointing."""
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == "step" and (batch_idx + 1) % config.frequency == 0:
                config.scheduler.step()
        if batch_idx + 1 >= self.trainer.num_training_batches:
            self._step_epoch_schedulers()

    def _step_epoch_schedulers(self) -> None:
        if self._epoch_scheduled == self.current_epoch:
            return
        self._epoch_scheduled = self.current_epoch
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == "epoch" and (self.current_epoch + 1) % config.frequency == 0:
                config.scheduler.step()

    def on_train_epoch_end(self) -> None:
        self._step_epoch_schedulers()  # epochs whose length is unknown in advance

    def configure_optimizers(self) -> Any:
        config = super().configure_optimizers()
        scheduler = config.get("lr_scheduler") if isinstance(config, dict) else None
        if isinstance(scheduler, dict) and isinstance(
            scheduler.get("scheduler"), torch.optim.lr_scheduler.ReduceLROnPlateau
        ):
            raise ValueError("method=flss steps its schedulers itself and does not support ReduceLROnPlateau")
        return config

    # --- evaluation: the no-sampling classifier -------------------------------------------
    def _evaluate(self, batch: tuple[torch.Tensor, ...], stage: str, attack: Attack | None) -> None:
        self.check_net()
        with self.net.no_sampling():
            super()._evaluate(batch, stage, attack)
