"""CIFAR-10, CIFAR-100 and SVHN as ID datamodules (torchvision datasets)."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from lightning_ood.data.base import OODDataModule
from lightning_ood.data.sets import OODSet, check_mean_std, small_image_transforms
# re-exported: importable (and patchable, as the tests do) here; the datamodules below read
# ``open_torchvision`` from this module's namespace
from lightning_ood.data.torchvision_files import TORCHVISION_SETS, open_torchvision

__all__ = ["CIFAR100DataModule", "CIFAR10DataModule", "SVHNDataModule", "TORCHVISION_SETS", "open_torchvision"]


def _labels_of(dataset: Dataset) -> Tensor:
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = getattr(dataset, "labels")
    return torch.as_tensor(labels, dtype=torch.long)


class _TorchvisionDataModule(OODDataModule):
    """A 32x32 torchvision dataset as ID: random crop + flip, per-dataset normalisation."""

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 4,
        val_size: int = 1000,
        ood_sets: Optional[list[OODSet]] = None,
        seed: int = 0,
        mean: Optional[tuple[float, float, float]] = None,
        std: Optional[tuple[float, float, float]] = None,
        device_loader: bool = False,
    ) -> None:
        super().__init__(root, download, batch_size, num_workers, val_size, ood_sets, seed, device_loader)
        self.mean = tuple(mean) if mean is not None else type(self).mean
        self.std = tuple(std) if std is not None else type(self).std
        check_mean_std(self.mean, self.std)

    def prepare_data(self) -> None:
        """Download the ID splits and the torchvision OOD sets (Lightning calls this on one
        process per node, so ranks never download the same files concurrently in setup)."""
        if self.download:
            open_torchvision(self.name, self.root, True, True)
            open_torchvision(self.name, self.root, False, True)
            for spec in self.ood_sets:
                if spec.path is None and spec.name in TORCHVISION_SETS:
                    open_torchvision(spec.name, self.root, False, True)

    def test_transform(self) -> Callable:
        return small_image_transforms(self.mean, self.std, self.image_size)[1]

    def build(self) -> dict[str, Any]:
        train_aug, test_tf = small_image_transforms(self.mean, self.std, self.image_size)
        full_train = open_torchvision(self.name, self.root, True, False)
        test = open_torchvision(self.name, self.root, False, False)
        return self.split_build(full_train, _labels_of(full_train), test, train_aug, test_tf)

    def train_tensors(self) -> Optional[tuple[Tensor, Tensor]]:
        """The training split as uint8 (N, 3, H, W) images and labels (for ``device_loader``)."""
        subset = self.train_set.dataset if self.train_set is not None else None
        data = getattr(getattr(subset, "dataset", None), "data", None)
        if not isinstance(subset, Subset) or data is None:
            return None
        images = torch.as_tensor(data)
        if images.dim() == 4 and images.shape[-1] == 3:  # CIFAR stores (N, H, W, C)
            images = images.permute(0, 3, 1, 2)
        index = torch.as_tensor(subset.indices, dtype=torch.long)
        return images[index].contiguous(), _labels_of(subset.dataset)[index]


class CIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10 as ID (Krizhevsky, 2009)."""

    name, num_classes = "cifar10", 10
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(_TorchvisionDataModule):
    """CIFAR-100 as ID (Krizhevsky, 2009)."""

    name, num_classes = "cifar100", 100
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


class SVHNDataModule(_TorchvisionDataModule):
    """SVHN as ID (Netzer et al., 2011)."""

    name, num_classes = "svhn", 10
    mean, std = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
