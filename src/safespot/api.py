"""The framework from Python (a notebook, a script): tensors in, tensors out.

    import safespot
    model = safespot.load_classifier("logs/train/runs/<run>/checkpoints/best-epoch007.ckpt")
    x_r = safespot.robustify(model, images)                       # the safe-spot search (S-Full)
    x_a = safespot.attack(model, x_r, labels, "pgd20")             # grey-box PGD-20 on x_r
    (model(x_a).argmax(1) == labels).float().mean()

Images are float tensors in [0, 1], shape ``(N, C, H, W)``; labels are class indices. The threat
model (norm, eps) is the checkpoint's unless given. Robustifiers and attacks are the configs of
``conf/robustifier/`` and ``conf/attack/`` by name, with any of their settings as keyword
arguments, so the API runs exactly what the commands run. Every image's random draws come from
its own seed (``seed`` and its position), so a result does not depend on the batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import OmegaConf
from torch import nn

from safespot.attacks.base import build_attack
from safespot.errors import ConfigError
from safespot.paths import CONFIG_DIR
from safespot.runs import load_model, load_run_checkpoint
from safespot.threat import parse_budget
from safespot.utils.rng import streams

__all__ = ["attack", "load_classifier", "robustify"]


def load_classifier(ckpt_path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The classifier of a training run's checkpoint (loaded safely: weights only), in eval mode on
    ``device``: ``model(images)`` gives logits. Its training threat model is kept as
    ``model.threat`` (``{"norm": ..., "eps": ...}``), the default of :func:`robustify` and
    :func:`attack`."""
    checkpoint, run_cfg = load_run_checkpoint(ckpt_path)
    model = load_model(checkpoint, run_cfg, int(run_cfg.data.num_classes)).to(device).eval()
    model.threat = {"norm": str(run_cfg.threat.norm), "eps": parse_budget(run_cfg.threat.eps, "threat.eps")}
    return model


def _threat(model: nn.Module, norm: str | None, eps: float | str | None) -> dict[str, Any]:
    stored = getattr(model, "threat", None) or {}
    threat = {"norm": norm or stored.get("norm"), "eps": eps if eps is not None else stored.get("eps")}
    if threat["norm"] is None or threat["eps"] is None:
        raise ConfigError("give norm and eps (this model carries no threat model: use safespot.load_classifier)")
    threat["eps"] = parse_budget(threat["eps"], "eps")
    return threat


def _build(group: str, name: str, threat: dict[str, Any], settings: dict[str, Any]) -> Any:
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        raise ConfigError(f"no {group} named {name!r}: choose one of {known}")
    cfg = OmegaConf.create({"threat": threat, "node": OmegaConf.merge(OmegaConf.load(path), settings)})
    return hydra.utils.instantiate(OmegaConf.to_container(cfg, resolve=True)["node"])


def _seeds(images: torch.Tensor, seed: int) -> torch.Tensor:
    return streams(seed, torch.arange(len(images), device=images.device), "evaluation", 0)


def robustify(
    model: nn.Module,
    images: torch.Tensor,
    method: str = "sfull",
    *,
    norm: str | None = None,
    eps: float | str | None = None,
    seed: int = 0,
    **settings: Any,
) -> torch.Tensor:
    """The robustified images x_r of ``images`` (each inside ``B_delta(x_o)``): ``method`` names a
    robustifier of ``conf/robustifier/`` (``sfull``: the safe-spot search of paper 002, Algorithm 1;
    ``sfull_fast``, ``sfgsm``, ``spgd``, ``none``), ``settings`` any of its fields (``delta``,
    ``max_iter``, ``quantize``, ...)."""
    robustifier = _build("robustifier", method, _threat(model, norm, eps), settings)
    return robustifier(model, images, seeds=_seeds(images, seed)).x_r


def attack(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    name: str = "pgd20",
    *,
    norm: str | None = None,
    eps: float | str | None = None,
    seed: int = 0,
    **settings: Any,
) -> torch.Tensor:
    """Adversarial examples of ``images`` inside ``B_eps(images)``: ``name`` names an attack of
    ``conf/attack/`` (``pgd20``, ``pgd10``, ``pgd100``, ``autoattack``, ``fgsm``, ...),
    ``settings`` any of its fields (``steps``, ``restarts``, ``loss``, ...)."""
    built = build_attack(_build("attack", name, _threat(model, norm, eps), settings), f"attack {name!r}")
    return built(model, images, labels, seeds=_seeds(images, seed))
