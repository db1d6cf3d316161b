"""Shared machinery of the datamodules: the OODDataModule base class and its loaders.

The small pieces it shares with the other modules (``OODSet``, ``IndexedDataset``, the
checks and transforms) live in :mod:`lightning_ood.data.sets` and are re-exported here.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from lightning_ood.checks import check_number
from lightning_ood.data.device_loader import device_train_loader
from lightning_ood.data.ood import build_ood_set, register_named_ood_sets
from lightning_ood.data.sets import (
    MAX_SEED, OOD_LABEL, IndexedDataset, OODSet, check_mean_std, check_val_size, class_balanced_subset,
    imagenet_transforms, small_image_transforms,
)
from lightning_ood.distributed import is_distributed, rank_and_world

__all__ = [
    "MAX_SEED", "OOD_LABEL", "IndexedDataset", "OODDataModule", "OODSet", "UnpaddedDistributedSampler",
    "check_mean_std", "check_val_size", "class_balanced_subset", "imagenet_transforms", "small_image_transforms",
]


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
        return build_ood_set(spec, self)

    @classmethod
    def named_ood_sets(cls) -> tuple[str, ...]:
        """Names of the OOD sets that only this datamodule (and its subclasses) provides,
        through :meth:`named_ood_set`; none by default. A subclass that overrides this
        adds its names to :func:`~lightning_ood.data.ood.known_ood_sets`, and asking
        another datamodule for one of them is an error naming this datamodule."""
        return ()

    def named_ood_set(self, name: str) -> Optional[Dataset]:
        """The ``(image, label)`` dataset of this datamodule's own OOD set ``name`` (one of
        :meth:`named_ood_sets`), images as its test transform takes them; ``None`` for any
        other name (then the torchvision sets are tried)."""
        return None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "named_ood_sets" in cls.__dict__:
            register_named_ood_sets(cls.name or cls.__name__, cls.named_ood_sets())

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
