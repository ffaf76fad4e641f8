"""Training under Gaussian input noise: the base classifiers of randomised smoothing.

Three variants, chosen per run (``xi_1, ..., xi_m ~ N(0, sigma^2 I)`` i.i.d., added to images
in [0, 1] and never clamped, as Cohen et al. do):

* **Gaussian augmentation** (Cohen, Rosenfeld and Kolter, 2019, "Certified Adversarial
  Robustness via Randomized Smoothing", training with Gaussian data augmentation): minimise
  ``(1/m) sum_i CE(c(x + xi_i), y)``; ``m = 1`` is their setting.
* **SmoothAdv** (``smooth_adv``; Salman et al., 2019, "Provably Robust Deep Learning via
  Adversarially Trained Smoothed Classifiers", SmoothAdv with their "multi-noise"
  objective): draw ``xi_1..m`` once per minibatch and keep them fixed for the whole inner
  attack; PGD (``threat.steps`` steps of ``threat.step_size`` inside ``B_eps(x) ∩ [0, 1]``)
  ascends the soft smoothed loss ``-log (1/m) sum_i softmax(c(x' + xi_i))_y`` (paper 002,
  Eq. 3; :class:`~safespot.smoothing.SoftSmoothed` under ``fixed_noise()``); the network then
  minimises ``(1/m) sum_i CE(c(x' + xi_i), y)`` on the *same* draws.
* **Adversarial training under noise injection** (``noisy_pgd``; paper 003, "Smoothed
  Inference for Improving Adversarial Robustness", Section 4.1, Eq. 23, input noise only):
  PGD in ``B_eps(x) ∩ [0, 1]`` on the noisy classifier ``c(. + xi)``
  (:class:`~safespot.smoothing.NoisyClassifier`), a fresh draw at every forward pass so the
  attacker observes one realisation per gradient (paper 003, Appendix A); with ``m > 1`` each
  step averages the gradient over ``m`` fresh draws, the EPGD attack of paper 003 (Section
  4.2, Eqs. 24-25: the mean of gradients rather than the gradient of the mean).
  The network then minimises ``(1/m) sum_i CE(c(x' + xi_i), y)`` with fresh draws
  independent of the attack's.

With either attack, ``adv_weight = w`` weights the adversarial term against the noisy clean
term as in paper 003, Eq. 23: ``(1 - w) (1/m) sum_i CE(c(x + xi_i), y) + w (1/m) sum_i
CE(c(x' + xi_i), y)`` with the same draws in both terms (``w = 1``, the default, is
Salman et al.'s objective). Both terms take separate forward passes, so batch-norm batch
statistics never mix clean and adversarial inputs.

Whether the attack sees the network in train or eval mode (``attack_mode``) and whether its
forward passes may update batch-norm statistics (``attack_updates_bn``) are explicit; the
defaults follow Salman et al., who craft the attack in eval mode.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from safespot.attacks import PGD, Attack, AttackSpec, attack_context
from safespot.attacks.context import AttackMode, check_attack_mode
from safespot.methods.base import ClassifierModule, accuracy_metric, build_train_attack
from safespot.smoothing.soft import NoisyClassifier, SoftSmoothed
from safespot.threat import check_positive_int, parse_budget

DEFAULT_M = {"plain": 1, "smooth_adv": 4, "noisy_pgd": 1}


def gaussian_noise(x: torch.Tensor, sigma: float, m: int) -> torch.Tensor:
    """``m`` draws of ``N(0, sigma^2 I)`` shaped like ``x``: a tensor ``(m, *x.shape)``."""
    return sigma * torch.randn((m, *x.shape), device=x.device, dtype=x.dtype)


def noisy_copies(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x + xi_i`` for every draw, flattened to a ``(m * B, ...)`` batch in draw-major
    order (all images with ``xi_1``, then all with ``xi_2``, ...); no clamping."""
    return (x.unsqueeze(0) + noise).flatten(0, 1)


def multi_noise_loss(logits: torch.Tensor, y: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1/m) sum_i CE(logits_i, y)`` for draw-major logits ``(m * B, K)``, and the soft
    smoothed log-probabilities ``log (1/m) sum_i softmax(logits_i)``, shape ``(B, K)``."""
    logits = logits.float()
    loss = F.cross_entropy(logits, y.repeat(m))
    log_probs = torch.logsumexp(F.log_softmax(logits, dim=1).view(m, y.shape[0], -1), dim=0) - math.log(m)
    return loss, log_probs


class GaussianTraining(ClassifierModule):
    """Gaussian-noise training: Cohen et al.'s augmentation, SmoothAdv or paper 003's
    adversarial training under noise injection (see the module docstring for the exact
    objectives).

    Args:
        sigma: noise standard deviation (> 0; a number or a fraction string).
        m: noise draws per image; ``None`` picks 1 for plain augmentation and ``noisy_pgd``,
            4 for ``smooth_adv`` (one of Salman et al.'s settings).
        smooth_adv: SmoothAdv training (Salman et al.).
        noisy_pgd: PGD on the noisy classifier, EPGD when ``m > 1`` (paper 003).
        adv_weight: ``w`` of paper 003, Eq. 23, in (0, 1]; only with an attack.
        random_start: start the attack uniformly in ``B_eps(x)``.
        train_attack: the inner PGD of ``smooth_adv`` / ``noisy_pgd``: a factory
            (``conf/attack/pgd_train.yaml``), an attack config or an attack; ``None``: PGD with
            ``threat.steps`` steps of ``threat.step_size``. The method binds ``random_start``,
            ``attack_mode`` (as ``mode``) and, for ``noisy_pgd``, ``eot = m``. Unused by plain
            augmentation.
        attack_mode / attack_updates_bn: network mode and batch-norm updates during the attack.
        All other arguments as :class:`ClassifierModule`.

    Besides the base metrics (clean ``acc`` and PGD ``robust_acc`` of the base network),
    validation and test log ``{stage}/noisy_acc``, the accuracy of ``c(x + xi)`` with one
    draw per image: clean accuracy understates a network trained on noisy inputs, and this is
    the default checkpoint monitor.
    """

    def __init__(
        self,
        *args: Any,
        sigma: float | str = 0.25,
        m: int | None = None,
        smooth_adv: bool = False,
        noisy_pgd: bool = False,
        adv_weight: float = 1.0,
        random_start: bool = True,
        train_attack: AttackSpec = None,
        attack_mode: AttackMode = "eval",
        attack_updates_bn: bool = False,
        monitor: str = "val/noisy_acc",
        **kwargs: Any,
    ) -> None:
        self.sigma = parse_budget(sigma, "sigma")
        if smooth_adv and noisy_pgd:
            raise ValueError("smooth_adv and noisy_pgd are alternative training attacks: enable at most one")
        self.smooth_adv, self.noisy_pgd = bool(smooth_adv), bool(noisy_pgd)
        self.variant = "smooth_adv" if self.smooth_adv else "noisy_pgd" if self.noisy_pgd else "plain"
        self.m = DEFAULT_M[self.variant] if m is None else check_positive_int(m, "m")
        weight = float(adv_weight)
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"adv_weight must be in (0, 1], got {adv_weight!r}")
        if weight != 1.0 and self.variant == "plain":
            raise ValueError("adv_weight applies only with smooth_adv or noisy_pgd")
        self.adv_weight = weight
        self.random_start = bool(random_start)
        self.attack_mode = check_attack_mode(attack_mode)
        self.attack_updates_bn = bool(attack_updates_bn)
        self._train_attack_spec = train_attack
        self._train_attack: tuple[Attack | None, dict[str, Any] | None] | None = None
        super().__init__(*args, monitor=monitor, **kwargs)
        self.train_attack = self.build_train_attack()
        self.val_noisy_acc = accuracy_metric(self.num_classes)
        self.test_noisy_acc = accuracy_metric(self.num_classes)

    def extra_hparams(self) -> dict[str, Any]:
        return {
            "sigma": self.sigma,
            "m": self.m,
            "smooth_adv": self.smooth_adv,
            "noisy_pgd": self.noisy_pgd,
            "adv_weight": self.adv_weight,
            "random_start": self.random_start,
            "attack_mode": self.attack_mode,
            "attack_updates_bn": self.attack_updates_bn,
            "train_attack": self._resolved_train_attack()[1],
        }

    def _resolved_train_attack(self) -> tuple[Attack | None, dict[str, Any] | None]:
        if self._train_attack is None:
            if self.variant == "plain":
                self._train_attack = (None, None)
            else:
                fixed = {
                    "mode": self.attack_mode,
                    "random_start": self.random_start,
                    "eot": self.m if self.noisy_pgd else 1,
                }
                self._train_attack = build_train_attack(self._train_attack_spec, self.default_train_attack, fixed)
        return self._train_attack

    def build_train_attack(self) -> Attack | None:
        """The inner PGD (``None`` for plain augmentation). SmoothAdv averages over the
        ``m`` draws inside the soft smoothed model; ``noisy_pgd`` averages ``m`` gradients of
        the noisy model per step (EPGD)."""
        return self._resolved_train_attack()[0]

    def default_train_attack(self) -> PGD:
        t = self.threat
        return PGD(
            t["norm"],
            t["eps"],
            steps=int(t["steps"]),
            step_size=t["step_size"],
            random_start=self.random_start,
            eot=self.m if self.noisy_pgd else 1,
            mode=self.attack_mode,
        )

    # --- the attacks ----------------------------------------------------------------------
    def smooth_adv_examples(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SmoothAdv: ``(x', xi)`` where ``xi`` (``(m, *x.shape)``) is drawn once and used
        by every step of the attack on the soft smoothed loss."""
        assert self.train_attack is not None
        smoothed = SoftSmoothed(self.net, self.sigma, self.m)  # a view, not a registered submodule
        with attack_context(self.net, update_bn=self.attack_updates_bn), smoothed.fixed_noise():
            x_adv = self.train_attack(smoothed, x, y)
            noise = smoothed.noise(x_adv)  # the fixed draws of this block
        return x_adv, noise.detach()

    def noisy_pgd_examples(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Paper 003: PGD on ``c(. + xi)`` with fresh noise at every forward pass."""
        assert self.train_attack is not None
        noisy = NoisyClassifier(self.net, self.sigma)
        with attack_context(self.net, update_bn=self.attack_updates_bn):
            return self.train_attack(noisy, x, y)

    # --- training -------------------------------------------------------------------------
    def noisy_loss(self, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1/m) sum_i CE(c(x + xi_i), y)`` and the soft smoothed log-probabilities."""
        return multi_noise_loss(self.net(noisy_copies(x, noise)), y, noise.shape[0])

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.variant == "plain":
            return self.noisy_loss(x, y, gaussian_noise(x, self.sigma, self.m))
        if self.smooth_adv:
            x_adv, noise = self.smooth_adv_examples(x, y)
        else:
            x_adv = self.noisy_pgd_examples(x, y)
            noise = gaussian_noise(x, self.sigma, self.m)
        loss, log_probs = self.noisy_loss(x_adv, y, noise)
        if self.adv_weight < 1.0:
            clean_loss, _ = self.noisy_loss(x, y, noise)
            loss = (1.0 - self.adv_weight) * clean_loss + self.adv_weight * loss
        return loss, log_probs

    # --- evaluation -----------------------------------------------------------------------
    def _evaluate(self, batch: tuple[torch.Tensor, ...], stage: str, attack: Attack | None) -> None:
        super()._evaluate(batch, stage, attack)
        x, y = batch[0], batch[1]
        metric = getattr(self, f"{stage}_noisy_acc")
        with torch.no_grad():
            metric(self.net(x + self.sigma * torch.randn_like(x)).argmax(1), y)
        self.log(f"{stage}/noisy_acc", metric, on_step=False, on_epoch=True, prog_bar=True)
