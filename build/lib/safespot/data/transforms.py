"""Standard augmentation pipelines. Every pipeline ends in ``ToTensor`` (images in [0, 1]);
normalisation belongs to the model."""

from __future__ import annotations

from torchvision import transforms as T


def cifar_transforms(image_size: int = 32, padding: int = 4) -> tuple[T.Compose, T.Compose]:
    """Train: random crop with zero padding + horizontal flip. Test: none."""
    train = T.Compose([T.RandomCrop(image_size, padding=padding), T.RandomHorizontalFlip(), T.ToTensor()])
    return train, T.Compose([T.ToTensor()])


def imagenet_transforms(image_size: int = 224, resize: int = 256) -> tuple[T.Compose, T.Compose]:
    """Train: random-resized crop + flip. Test: resize 256 and centre crop 224."""
    train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor()])
    test = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor()])
    return train, test


def build_transforms(policy: str, image_size: int) -> tuple[T.Compose, T.Compose]:
    if policy == "cifar":
        return cifar_transforms(image_size)
    if policy == "imagenet":
        return imagenet_transforms(image_size, resize=round(image_size * 256 / 224))
    raise ValueError(f"data.transforms must be 'cifar' or 'imagenet', got {policy!r}")
