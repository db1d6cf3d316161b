"""Any class-per-folder image tree as ID data (ImageNet, custom sets)."""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
from torchvision import datasets

from lightning_ood.checks import check_number
from lightning_ood.data.base import OODDataModule
from lightning_ood.data.sets import OODSet, check_mean_std, imagenet_transforms, small_image_transforms


def _image_folder(path: str) -> datasets.ImageFolder:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder not found: {path} (expected one sub-folder of images per class)")
    try:
        return datasets.ImageFolder(path)
    except (FileNotFoundError, RuntimeError) as err:
        raise FileNotFoundError(f"no usable images under {path}: {err}") from err


class ImageFolderDataModule(OODDataModule):
    """ID data from ``train_dir`` and ``test_dir``, one sub-folder per class.

    Args:
        train_dir: training images (``<class>/<image>``); ``val_size`` of them are held
            out for validation.
        test_dir: test images with the same class folders (ImageNet: the ``val`` split).
        image_size: 224 gives the ImageNet pipeline (RandomResizedCrop + flip; resize 256,
            centre-crop 224 at test); 64 or less the CIFAR one (random crop + flip).
        mean, std: normalisation (ImageNet statistics by default).
        Other arguments as in :class:`OODDataModule`.
    """

    name = "imagefolder"

    def __init__(
        self,
        train_dir: str,
        test_dir: str,
        image_size: int = 224,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        batch_size: int = 64,
        num_workers: int = 8,
        val_size: int = 1000,
        ood_sets: Optional[list[OODSet]] = None,
        seed: int = 0,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(os.path.dirname(train_dir), False, batch_size, num_workers, val_size, ood_sets, seed)
        check_number("image_size", image_size, 1, integer=True)
        check_mean_std(mean, std)
        self.train_dir, self.test_dir = train_dir, test_dir
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        if name:
            self.name = name
        for path in (train_dir, test_dir):
            if not os.path.isdir(path):
                raise FileNotFoundError(f"image folder not found: {path} (expected one sub-folder of images per class)")
        self.classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
        if len(self.classes) < 2:
            raise ValueError(f"{train_dir} must hold one sub-folder per class (found {len(self.classes)})")
        self.num_classes = len(self.classes)

    def transforms(self) -> tuple[Callable, Callable]:
        if self.image_size > 64:
            return imagenet_transforms(self.mean, self.std, self.image_size)
        return small_image_transforms(self.mean, self.std, self.image_size)

    def test_transform(self) -> Callable:
        return self.transforms()[1]

    def build(self) -> dict[str, Any]:
        train_aug, test_tf = self.transforms()
        full_train, test = _image_folder(self.train_dir), _image_folder(self.test_dir)
        if test.classes != full_train.classes:
            raise ValueError(
                f"{self.test_dir} has classes {test.classes[:5]}... but {self.train_dir} has "
                f"{full_train.classes[:5]}...: both must hold the same class folders"
            )
        labels = torch.as_tensor(full_train.targets, dtype=torch.long)
        return self.split_build(full_train, labels, test, train_aug, test_tf)
