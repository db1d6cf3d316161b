"""Small shared pieces of the datamodules: indexed samples, OOD set declarations, checks,
transforms, class-balanced subsets. A leaf: it imports no other ``lightning_ood.data`` module."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T

from lightning_ood.checks import check_number

OOD_LABEL = -1
#: Largest seed (``seed_everything``'s range is 0 .. 2**32 - 1).
MAX_SEED = 2**32 - 1


@dataclass
class OODSet:
    """An OOD test set: a known dataset ``name`` or a folder ``path`` of images.

    Args:
        name: dataset name (see :func:`lightning_ood.data.ood.known_ood_sets`) or, with
            ``path``, the label used in reports.
        group: ``near`` or ``far`` (OpenOOD v1.5 grouping).
        path: folder of images (searched recursively), e.g. Textures or Places365 copies.
    """

    name: str
    group: Literal["near", "far"] = "far"
    path: Optional[str] = None

    def __post_init__(self) -> None:
        if self.group not in ("near", "far"):
            raise ValueError(f"OOD set {self.name!r}: group must be 'near' or 'far', got {self.group!r}")


class IndexedDataset(Dataset):
    """Wraps a dataset so every sample is ``(image, label, index)``.

    ``index`` is the position in this dataset; it lets the evaluation drop the duplicates
    that distributed samplers pad in. ``label`` is ``OOD_LABEL`` (-1) when ``ood``.
    """

    def __init__(self, dataset: Dataset, transform: Optional[Callable] = None, ood: bool = False) -> None:
        self.dataset = dataset
        self.transform = transform
        self.ood = ood

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        image, label = self.dataset[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, (OOD_LABEL if self.ood else int(label)), index


def check_mean_std(mean: Sequence[float], std: Sequence[float], channels: int = 3) -> None:
    """Raise a ValueError unless ``mean`` and ``std`` hold ``channels`` finite numbers each,
    every ``std`` > 0 (a zero std divides by zero in ``Normalize``)."""
    for name, values in (("mean", mean), ("std", std)):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != channels:
            raise ValueError(f"{name} must be {channels} numbers (one per channel), got {values!r}")
    for c in range(channels):
        check_number(f"mean[{c}]", mean[c])
        check_number(f"std[{c}]", std[c], 0, low_open=True)


def check_val_size(val_size: int, n_train: int) -> None:
    """Raise a ValueError unless holding out ``val_size`` of ``n_train`` images leaves some to train on."""
    if val_size >= n_train:
        raise ValueError(f"val_size must be < {n_train} (the number of ID training images), got {val_size}: "
                         "it would leave no image to train on; lower val_size")


def small_image_transforms(mean: Sequence[float], std: Sequence[float], size: int = 32) -> tuple[Callable, Callable]:
    """(train, test) transforms for CIFAR-size images: random crop (pad 4) + flip."""
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    train = T.Compose([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), *normalize])
    test = T.Compose([T.Resize(size), T.CenterCrop(size), *normalize])
    return train, test


def imagenet_transforms(mean: Sequence[float], std: Sequence[float], size: int = 224) -> tuple[Callable, Callable]:
    """(train, test) transforms for ImageNet-size images: RandomResizedCrop + flip."""
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *normalize])
    test = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), *normalize])
    return train, test


def class_balanced_subset(labels: Tensor, max_samples: Optional[int], seed: int = 0) -> Tensor:
    """Indices of at most ``max_samples`` samples, as equal per class as possible.

    ``None`` or a size >= len(labels) keeps everything. Deterministic for ``seed``.
    """
    check_number("max_samples", max_samples, 1, integer=True, optional=True)
    n = len(labels)
    if max_samples is None or max_samples >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    shuffled = labels[order]
    # rank of each sample within its class in the shuffled order; take round-robin by rank
    rank_in_class = torch.zeros(n, dtype=torch.long)
    for c in shuffled.unique():
        members = (shuffled == c).nonzero().squeeze(1)
        rank_in_class[members] = torch.arange(len(members))
    picked = order[torch.argsort(rank_in_class * n + torch.arange(n), stable=True)[:max_samples]]
    return picked.sort().values
