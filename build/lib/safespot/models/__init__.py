"""Classifiers mapping images in [0, 1] to logits; normalisation is their first layer."""

from __future__ import annotations

from collections.abc import Sequence

import torchvision
from torch import nn

from safespot.models.noise_injection import NoisyConv2d, noise_scales
from safespot.models.normalize import ImageClassifier, Normalize
from safespot.models.preact_resnet import PreActResNet18
from safespot.models.resnet20 import ResNet20
from safespot.models.small_cnn import SmallCNN
from safespot.models.stochastic import StochasticClassifier, build_stochastic_classifier
from safespot.models.wide_resnet import WideResNet


def resnet50(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-50 (random initialisation; no weights are downloaded)."""
    return torchvision.models.resnet50(weights=None, num_classes=num_classes)


def build_classifier(
    backbone: nn.Module, mean: Sequence[float], std: Sequence[float], num_classes: int
) -> ImageClassifier:
    """Hydra entry point: wrap an instantiated backbone with the dataset's normalisation."""
    return ImageClassifier(backbone, list(mean), list(std), num_classes)


__all__ = [
    "ImageClassifier",
    "NoisyConv2d",
    "Normalize",
    "PreActResNet18",
    "ResNet20",
    "SmallCNN",
    "StochasticClassifier",
    "WideResNet",
    "build_classifier",
    "build_stochastic_classifier",
    "noise_scales",
    "resnet50",
]
