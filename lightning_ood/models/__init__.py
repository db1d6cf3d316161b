"""Backbones selectable by name (``--model.backbone``)."""
from __future__ import annotations

from lightning_ood.models.resnet import ResNetBackbone, split_torchvision_state_dict

BACKBONES = ("resnet18", "resnet50")


def build_backbone(name: str, cifar_stem: bool | None = None, width: int = 64) -> ResNetBackbone:
    """Build a backbone by name. ``resnet18`` defaults to the CIFAR stem, ``resnet50`` to
    the ImageNet stem; ``cifar_stem`` overrides the default. ``width`` scales every stage
    (64 = standard)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid choices: {', '.join(BACKBONES)}")
    if cifar_stem is None:
        cifar_stem = name == "resnet18"
    return ResNetBackbone(name, cifar_stem=cifar_stem, width=width)


__all__ = ["BACKBONES", "ResNetBackbone", "build_backbone", "split_torchvision_state_dict"]
