"""LightningDataModules: ID train/val/test splits plus named, grouped OOD test sets."""
from lightning_ood.data.base import OOD_LABEL, IndexedDataset, OODDataModule, OODSet, class_balanced_subset
from lightning_ood.data.digits import DigitsDataModule
from lightning_ood.data.imagefolder import ImageFolderDataModule
from lightning_ood.data.ood import known_ood_sets
from lightning_ood.data.torchvision_sets import CIFAR10DataModule, CIFAR100DataModule, SVHNDataModule

__all__ = [
    "OOD_LABEL", "IndexedDataset", "OODDataModule", "OODSet", "class_balanced_subset",
    "DigitsDataModule", "ImageFolderDataModule", "CIFAR10DataModule", "CIFAR100DataModule",
    "SVHNDataModule", "known_ood_sets",
]
