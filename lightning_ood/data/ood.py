"""Building OOD test sets by name or folder path."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from PIL import Image
from torch.utils.data import Dataset, TensorDataset
from torchvision import transforms as T

from lightning_ood.data.base import IndexedDataset, OODSet
from lightning_ood.data.torchvision_sets import TORCHVISION_SETS

if TYPE_CHECKING:
    from lightning_ood.data.base import OODDataModule

TORCHVISION_OOD = tuple(TORCHVISION_SETS)
DIGITS_OOD = ("digits_heldout", "photo_patches")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def known_ood_sets() -> tuple[str, ...]:
    """Names accepted without a ``path``."""
    return TORCHVISION_OOD + DIGITS_OOD


class ImageFiles(Dataset):
    """Every image file under a folder (recursively, sorted), as RGB PIL images."""

    def __init__(self, path: str) -> None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"OOD folder not found: {path}")
        self.files = sorted(
            os.path.join(d, f) for d, _, files in os.walk(path) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not self.files:
            raise FileNotFoundError(f"OOD folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        with Image.open(self.files[index]) as img:
            return img.convert("RGB"), -1


def build_ood_set(spec: OODSet, datamodule: "OODDataModule") -> IndexedDataset:
    """The OOD set ``spec`` with ``datamodule``'s test transform (a missing or empty folder
    or an unknown name fails here, before any compute)."""
    test_transform = datamodule.test_transform()
    if spec.path is not None:
        try:
            files = ImageFiles(spec.path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err} (OOD set {spec.name!r}): point its `path` at a folder of images "
                                    "or remove the set from the config") from None
        return IndexedDataset(files, test_transform, ood=True)
    if spec.name in DIGITS_OOD:
        from lightning_ood.data.digits import DigitsDataModule, photo_patches

        if not isinstance(datamodule, DigitsDataModule):
            raise ValueError(f"OOD set {spec.name!r} is only defined for the digits datamodule")
        if spec.name == "digits_heldout":
            return IndexedDataset(datamodule.heldout_digits(), test_transform, ood=True)
        patches = photo_patches(500, datamodule.image_size, datamodule.seed)
        return IndexedDataset(TensorDataset(patches, patches.new_zeros(len(patches))), test_transform, ood=True)
    if spec.name in TORCHVISION_OOD:
        from lightning_ood.data.torchvision_sets import open_torchvision

        dataset = open_torchvision(spec.name, datamodule.root, train=False, download=datamodule.download)
        return IndexedDataset(dataset, T.Compose([_to_rgb, test_transform]), ood=True)
    raise ValueError(
        f"unknown OOD set {spec.name!r}: give a folder with `path:` or one of {', '.join(known_ood_sets())}"
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB") if isinstance(image, Image.Image) else image
