"""Shared machinery of the datamodules: indexed samples, OOD set declarations, loaders."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset
from torchvision import transforms as T

from lightning_ood.checks import check_number
from lightning_ood.distributed import is_distributed, rank_and_world

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


class UnpaddedDistributedSampler(DistributedSampler):
    """Evaluation sampler for multiple processes: rank r takes samples r, r + w, r + 2w ...

    Unlike Lightning's default ``DistributedSampler`` it never repeats samples to give
    every rank the same length, so metrics logged per step (e.g. ``test/acc``) count every
    sample exactly once. Shards may differ in length by one.
    """

    def __init__(self, dataset: Dataset) -> None:
        super().__init__(dataset, shuffle=False, drop_last=False)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))  # type: ignore[arg-type]
        self.total_size = len(dataset)  # type: ignore[arg-type]

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))


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


class OODDataModule(pl.LightningDataModule):
    """Base datamodule: ID train/val/test splits plus named OOD test sets.

    Subclasses implement :meth:`build` and set ``name``, ``num_classes``, ``image_size``,
    ``mean`` and ``std``. Test dataloaders are ``[ID test, *OOD sets]`` in that order.

    Args:
        root: folder where datasets are stored or downloaded.
        download: download torchvision datasets that are missing.
        batch_size: per-process batch size.
        num_workers: dataloader workers.
        val_size: ID training images held out (seeded) for validation and detector tuning.
        ood_sets: OOD test sets, each with a near/far group.
        seed: seed of the splits.
        device_loader: train from a :class:`~lightning_ood.data.device_loader.DeviceLoader`
            (training set held on the accelerator, crop/flip done there in batches) instead
            of a ``DataLoader``; falls back to the ``DataLoader`` with a warning when
            :meth:`train_tensors` gives nothing or the augmentation is not crop + flip.
    """

    name: str = ""
    num_classes: int = 0
    image_size: int = 32
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 4,
        val_size: int = 1000,
        ood_sets: Optional[list[OODSet]] = None,
        seed: int = 0,
        device_loader: bool = False,
    ) -> None:
        super().__init__()
        check_number("batch_size", batch_size, 1, integer=True)
        check_number("num_workers", num_workers, 0, integer=True)
        check_number("val_size", val_size, 0, integer=True)
        check_number("seed", seed, integer=True)
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be in 0 .. {MAX_SEED} (the range of seed_everything), got {seed}")
        self.root = root
        self.download = download
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.ood_sets = [s if isinstance(s, OODSet) else OODSet(**s) for s in (ood_sets or [])]
        self.seed = seed
        self.device_loader = device_loader
        self.train_set: Optional[IndexedDataset] = None
        self.fit_set: Optional[IndexedDataset] = None
        self.val_set: Optional[IndexedDataset] = None
        self.test_set: Optional[IndexedDataset] = None
        self.ood_test_sets: dict[str, IndexedDataset] = {}

    # -------------------------------------------------------------- to implement
    def build(self) -> dict[str, Any]:
        """Return ``train`` (augmented), ``fit`` (same images, test transform), ``val``,
        ``test`` IndexedDatasets and ``train_labels`` (tensor)."""
        raise NotImplementedError

    def split_build(self, full_train: Dataset, labels: Tensor, test: Dataset, train_transform: Callable,
                    test_transform: Callable) -> dict[str, Any]:
        """:meth:`build`'s result for a training set of which ``val_size`` images (seeded)
        are held out for validation."""
        check_val_size(self.val_size, len(full_train))
        order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[: self.val_size].sort().values, order[self.val_size :].sort().values
        train = Subset(full_train, train_idx.tolist())
        return {
            "train": IndexedDataset(train, train_transform),
            "fit": IndexedDataset(train, test_transform),
            "val": IndexedDataset(Subset(full_train, val_idx.tolist()), test_transform),
            "test": IndexedDataset(test, test_transform),
            "train_labels": labels[train_idx],
        }

    def build_ood(self, spec: OODSet) -> IndexedDataset:
        """The IndexedDataset of one OOD set, with this datamodule's test transform."""
        from lightning_ood.data.ood import build_ood_set

        return build_ood_set(spec, self)

    def test_transform(self) -> Callable:
        raise NotImplementedError

    def folder_transform(self) -> Callable:
        """Transform of the RGB PIL images of a folder OOD set (``OODSet(path=...)``) into
        (C, ``image_size``, ``image_size``) float tensors like the ID test images (tried on
        the folder's first image at set-up). The test transform by default; datamodules
        whose test transform takes tensors (the digits) override it."""
        return self.test_transform()

    # ------------------------------------------------------------------ setup
    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None:
            built = self.build()
            self.train_set, self.fit_set = built["train"], built["fit"]
            self.val_set, self.test_set = built["val"], built["test"]
            self.train_labels: Tensor = built["train_labels"]
        if stage in (None, "test") and not self.ood_test_sets and self.ood_sets:
            names = [s.name for s in self.ood_sets]
            duplicated = {n for n in names if names.count(n) > 1}
            if duplicated:
                raise ValueError(f"OOD set names must be unique; repeated: {sorted(duplicated)}")
            self.ood_test_sets = {spec.name: self.build_ood(spec) for spec in self.ood_sets}

    def ood_groups(self) -> dict[str, str]:
        """OOD set name -> ``near``/``far``."""
        return {spec.name: spec.group for spec in self.ood_sets}

    # ------------------------------------------------------------ dataloaders
    def _loader(self, dataset: Dataset, shuffle: bool = False, drop_last: bool = False,
                sampler: Optional[DistributedSampler] = None) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, drop_last=drop_last, sampler=sampler,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        """Evaluation loader; under multiple processes each rank reads its own unpadded
        shard (Lightning keeps a sampler that is already a DistributedSampler)."""
        return self._loader(dataset, sampler=UnpaddedDistributedSampler(dataset) if is_distributed() else None)

    def train_tensors(self) -> Optional[tuple[Tensor, Tensor]]:
        """The training split as ``(images, labels)`` tensors in ``train_set`` order, images
        (N, C, H, W) uint8 (0..255) or float ([0, 1]), before augmentation and normalisation;
        ``None`` when not available (then ``device_loader`` falls back to a DataLoader).
        This default reads a ``TensorDataset``; subclasses override it for other storage."""
        dataset = self.train_set.dataset if self.train_set is not None else None
        if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
            return dataset.tensors[0], dataset.tensors[1]
        return None

    def train_dataloader(self) -> Union[DataLoader, Iterable]:
        assert self.train_set is not None
        if self.device_loader:
            from lightning_ood.data.device_loader import device_train_loader

            loader = device_train_loader(self)
            if loader is not None:
                return loader
        return self._loader(self.train_set, shuffle=True, drop_last=len(self.train_set) > self.batch_size)

    def val_dataloader(self) -> list[DataLoader]:
        if self.val_set is None or len(self.val_set) == 0:
            return []
        return [self._eval_loader(self.val_set)]

    def test_dataloader(self) -> list[DataLoader]:
        assert self.test_set is not None
        return [self._eval_loader(self.test_set)] + [self._eval_loader(d) for d in self.ood_test_sets.values()]

    def fit_dataloader(self, max_samples: Optional[int] = None) -> DataLoader:
        """ID training images with the *test* transform, for fitting detectors.

        A class-balanced subset of at most ``max_samples`` images, split across ranks
        without padding (rank r takes every world_size-th image), so statistics reduced
        over ranks equal those of one process.
        """
        assert self.fit_set is not None
        rank, world = rank_and_world()
        indices = class_balanced_subset(self.train_labels, max_samples, self.seed)
        return self._loader(Subset(self.fit_set, indices[rank::world].tolist()))
