"""The embedded open-set benchmark: scikit-learn's bundled 8x8 handwritten digits.

ID = a subset of the digit classes (default 0-5); near-OOD = the held-out digits (6-9);
far-OOD = colour patches of the two photographs scikit-learn ships
(``sklearn.datasets.load_sample_images``). Everything is on disk once scikit-learn is
installed: no download. Images are upscaled to 32x32 and repeated to 3 channels.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset
from torchvision import transforms as T

from lightning_ood.checks import check_number
from lightning_ood.data.base import OODDataModule
from lightning_ood.data.sets import IndexedDataset, OODSet, check_val_size

#: The OOD sets only this datamodule provides (:meth:`DigitsDataModule.named_ood_set`).
DIGITS_OOD = ("digits_heldout", "photo_patches")


def load_digit_images(size: int = 32) -> tuple[Tensor, Tensor]:
    """All 1797 digits as (N, 3, size, size) floats in [0, 1] and (N,) labels."""
    check_number("size", size, 1, integer=True)
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1).repeat(1, 3, 1, 1), torch.as_tensor(digits.target, dtype=torch.long)


def photo_patches(n: int = 500, size: int = 32, seed: int = 0) -> Tensor:
    """``n`` random colour patches (32 to 128 px, resized to ``size``) of the two photographs
    scikit-learn ships, as (n, 3, size, size) floats in [0, 1]."""
    check_number("n", n, 1, integer=True)
    check_number("size", size, 1, integer=True)
    from sklearn.datasets import load_sample_images

    generator = torch.Generator().manual_seed(seed)
    photos = [torch.tensor(img, dtype=torch.float32).permute(2, 0, 1) / 255.0 for img in load_sample_images().images]
    patches = []
    for i in range(n):
        photo = photos[i % len(photos)]
        crop = int(torch.randint(size, 4 * size + 1, (1,), generator=generator))
        top = int(torch.randint(0, photo.shape[1] - crop + 1, (1,), generator=generator))
        left = int(torch.randint(0, photo.shape[2] - crop + 1, (1,), generator=generator))
        patch = photo[:, top : top + crop, left : left + crop][None]
        patches.append(F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False)[0])
    return torch.stack(patches).clamp(0, 1)


class DigitsDataModule(OODDataModule):
    """Open-set digits: ID classes ``id_classes``, the other digits as near-OOD.

    Args:
        id_classes: digit classes used as ID (the rest become the ``digits_heldout``
            near-OOD set).
        test_fraction: fraction of each ID class kept for the test set (seeded).
        val_size: ID training images held out for validation.
        ood_sets: defaults to ``digits_heldout`` (near) and ``photo_patches`` (far).
        Other arguments as in :class:`OODDataModule`.
    """

    name = "digits"
    image_size = 32

    def __init__(
        self,
        id_classes: Sequence[int] = (0, 1, 2, 3, 4, 5),
        test_fraction: float = 0.25,
        batch_size: int = 32,
        num_workers: int = 0,
        val_size: int = 100,
        ood_sets: Optional[list[OODSet]] = None,
        seed: int = 0,
        root: str = "data",
        download: bool = False,
        device_loader: bool = False,
    ) -> None:
        if ood_sets is None:
            ood_sets = [OODSet("digits_heldout", "near"), OODSet("photo_patches", "far")]
        super().__init__(root, download, batch_size, num_workers, val_size, ood_sets, seed, device_loader)
        id_classes = sorted(set(int(c) for c in id_classes))
        if len(id_classes) < 2 or not set(id_classes) <= set(range(10)):
            raise ValueError(f"id_classes must be at least two distinct digits in 0-9, got {id_classes}")
        check_number("test_fraction", test_fraction, 0, 1, low_open=True, high_open=True)
        self.id_classes = id_classes
        self.num_classes = len(id_classes)
        self.test_fraction = test_fraction
        images, labels = load_digit_images(self.image_size)
        sizes = {c: int((labels == c).sum()) for c in id_classes}
        smallest = min(sizes, key=sizes.get)
        m = sizes[smallest]
        if not 1 <= round(m * test_fraction) <= m - 1:
            raise ValueError(f"test_fraction={test_fraction} leaves digit {smallest} ({m} images) without a "
                             f"{'test' if round(m * test_fraction) < 1 else 'training'} image: use a "
                             f"test_fraction between 1/{m} and 1 - 1/{m}")
        check_val_size(val_size, sum(n - round(n * test_fraction) for n in sizes.values()))
        id_mask = torch.isin(labels, torch.tensor(id_classes))
        train_images = images[id_mask]
        self.mean = tuple(train_images.mean(dim=(0, 2, 3)).tolist())
        self.std = tuple(train_images.std(dim=(0, 2, 3)).tolist())
        self._images, self._labels = images, labels

    def test_transform(self) -> Callable:
        return T.Normalize(self.mean, self.std)

    def folder_transform(self) -> Callable:
        """Folder images (RGB PIL) as the digits' own: shorter side resized to ``image_size``,
        centre-cropped square, in [0, 1] (as ``model.preprocess`` of a saved digits model
        does), then normalised."""
        return T.Compose([T.Resize(self.image_size), T.CenterCrop(self.image_size), T.ToTensor(),
                          self.test_transform()])

    def build(self) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(self.seed)
        remap = torch.full((10,), -1, dtype=torch.long)
        remap[torch.tensor(self.id_classes)] = torch.arange(len(self.id_classes))
        train_idx, test_idx = [], []
        for c in self.id_classes:
            members = (self._labels == c).nonzero().squeeze(1)
            members = members[torch.randperm(len(members), generator=generator)]
            n_test = round(len(members) * self.test_fraction)
            test_idx.append(members[:n_test])
            train_idx.append(members[n_test:])
        train_idx = torch.cat(train_idx)
        train_idx = train_idx[torch.randperm(len(train_idx), generator=generator)]
        val_idx, train_idx = train_idx[: self.val_size], train_idx[self.val_size :]
        test_idx = torch.cat(test_idx).sort().values

        def subset(idx: Tensor) -> TensorDataset:
            return TensorDataset(self._images[idx], remap[self._labels[idx]])

        augment = T.Compose([T.RandomCrop(self.image_size, padding=4), T.Normalize(self.mean, self.std)])
        plain = self.test_transform()
        return {
            "train": IndexedDataset(subset(train_idx), augment),
            "fit": IndexedDataset(subset(train_idx), plain),
            "val": IndexedDataset(subset(val_idx), plain),
            "test": IndexedDataset(subset(test_idx), plain),
            "train_labels": remap[self._labels[train_idx]],
        }

    @classmethod
    def named_ood_sets(cls) -> tuple[str, ...]:
        return DIGITS_OOD

    def named_ood_set(self, name: str) -> Optional[Dataset]:
        """``digits_heldout``: the digits not in ``id_classes`` (near-OOD); ``photo_patches``:
        500 patches of scikit-learn's two photographs, seeded by ``seed`` (far-OOD)."""
        if name == "digits_heldout":
            return self.heldout_digits()
        if name == "photo_patches":
            patches = photo_patches(500, self.image_size, self.seed)
            return TensorDataset(patches, patches.new_zeros(len(patches)))
        return super().named_ood_set(name)

    def heldout_digits(self) -> TensorDataset:
        """All images of the digits not in ``id_classes`` (the near-OOD set)."""
        mask = ~torch.isin(self._labels, torch.tensor(self.id_classes))
        return TensorDataset(self._images[mask], self._labels[mask])
