"""The torchvision datasets known by name (as ID splits and as OOD sets) and how to open them.

A leaf: it imports torchvision only, no other ``lightning_ood.data`` module.
"""
from __future__ import annotations

import os
from typing import Callable

from torch.utils.data import Dataset
from torchvision import datasets


def _split(train: bool) -> str:
    return "train" if train else "test"


#: Our name -> the torchvision dataset, opened from ``(root, train, download)``.
TORCHVISION_SETS: dict[str, Callable[[str, bool, bool], Dataset]] = {
    "cifar10": lambda root, train, download: datasets.CIFAR10(root, train=train, download=download),
    "cifar100": lambda root, train, download: datasets.CIFAR100(root, train=train, download=download),
    "svhn": lambda root, train, download: datasets.SVHN(root, split=_split(train), download=download),
    "mnist": lambda root, train, download: datasets.MNIST(root, train=train, download=download),
    "fashion_mnist": lambda root, train, download: datasets.FashionMNIST(root, train=train, download=download),
    "textures": lambda root, train, download: datasets.DTD(root, split=_split(train), download=download),
    "places365": lambda root, train, download: datasets.Places365(root, split="val", small=True, download=download),
}


def open_torchvision(name: str, root: str, train: bool, download: bool) -> Dataset:
    """A torchvision dataset by our name, with a clear error when it is not on disk."""
    if name not in TORCHVISION_SETS:
        raise ValueError(f"unknown torchvision dataset {name!r}")
    try:
        return TORCHVISION_SETS[name](root, train, download)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"dataset {name!r} not found under {os.path.abspath(root)} ({err}); "
            "pass --data.download true to fetch it, or --data.root to point at your copy"
        ) from err
