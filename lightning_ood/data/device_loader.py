"""A training loader that keeps the whole (small-image) training set on the accelerator.

For CIFAR-size data the standard ``DataLoader`` is the bottleneck of a fast GPU: every image
goes through PIL, ``RandomCrop``, ``RandomHorizontalFlip``, ``ToTensor`` and ``Normalize`` in
Python worker processes and is then copied to the device. :class:`DeviceLoader` instead
holds the training images once on the device (uint8: CIFAR-10 is 150 MB) and produces every
batch with a handful of batched tensor operations: one gather that does the random crop
(zero padding of ``padding`` pixels, as ``T.RandomCrop(size, padding)``) and the horizontal
flip together, then the normalisation. No per-image Python.

Sharding under DDP follows ``DistributedSampler``: every epoch one permutation of the
training set is drawn from ``seed + epoch`` (identically on every rank), padded by
wrapping around to a multiple of the world size, and rank ``r`` takes its contiguous slice
``r * n / W ... (r + 1) * n / W``. All ranks thus get the same number of samples, and the
shards are disjoint and cover the set (up to the padded repeats). The crop offsets and
flips are drawn per sample from the same epoch seed, so a given (seed, epoch) gives the
same images whatever the world size. Lightning calls :meth:`set_epoch` at every epoch
(through the ``sampler`` attribute); outside Lightning call it yourself.

Enable it with ``device_loader: true`` on a datamodule (:class:`~lightning_ood.data.base.
OODDataModule`); the datamodule falls back to its ``DataLoader`` (with a warning) when it
cannot provide its training images as tensors or its augmentation is not crop + flip.
It works on CPU as well (the tests run it there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor
from torchvision import transforms as T

from lightning_ood.checks import check_number
from lightning_ood.data.sets import check_mean_std
from lightning_ood.distributed import rank_and_world

Batch = tuple[Tensor, Tensor, Tensor]  # images, labels, sample indices


@dataclass(frozen=True)
class Augmentation:
    """What :class:`DeviceLoader` does to a batch (read off a torchvision train transform)."""

    padding: int = 4
    flip: bool = True
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)


def augmentation_of(transform: Optional[Callable]) -> Optional[Augmentation]:
    """The :class:`Augmentation` equivalent to ``transform``, or ``None`` when it holds anything
    but ``RandomCrop`` (zero fill, constant padding), ``RandomHorizontalFlip(p=0.5)``,
    ``ToTensor``/``ConvertImageDtype`` and one ``Normalize``."""
    if transform is None:
        return None
    steps = list(transform.transforms) if isinstance(transform, T.Compose) else [transform]
    padding, flip, mean, std = 0, False, None, None
    for step in steps:
        if isinstance(step, T.RandomCrop):
            pad = step.padding
            pads = {pad} if isinstance(pad, int) else set(pad) if pad is not None else {0}
            if len(pads) != 1 or step.padding_mode != "constant" or step.fill not in (0, 0.0) or step.pad_if_needed:
                return None
            padding = pads.pop()
        elif isinstance(step, T.RandomHorizontalFlip):
            if step.p != 0.5:
                return None
            flip = True
        elif isinstance(step, T.Normalize):
            if mean is not None:
                return None
            mean, std = tuple(float(m) for m in step.mean), tuple(float(s) for s in step.std)
        elif not isinstance(step, (T.ToTensor, T.ConvertImageDtype)):
            return None
    if mean is None:
        return None
    return Augmentation(int(padding), flip, mean, std)


class _EpochSetter:
    """Exposed as ``DeviceLoader.sampler`` so Lightning's per-epoch ``set_epoch`` call reaches it."""

    def __init__(self, loader: "DeviceLoader") -> None:
        self._loader = loader

    def set_epoch(self, epoch: int) -> None:
        self._loader.set_epoch(epoch)


class DeviceLoader:
    """Batches of augmented, normalised training images produced on the device.

    Args:
        images: (N, C, H, W) training images, ``uint8`` in 0..255 or floating point in [0, 1]
            (channels-last (N, H, W, C) uint8 arrays must be permuted first).
        labels: (N,) integer class labels.
        batch_size: per-process batch size.
        mean, std: per-channel normalisation (applied after crop and flip, as
            ``T.Normalize`` after ``T.ToTensor``).
        padding: zero padding of the random crop (0 = no crop).
        flip: random horizontal flip with probability 0.5.
        device: where the data lives and batches are made (default: the images' device).
        shuffle: draw a new permutation every epoch (else the identity order).
        drop_last: drop each rank's last incomplete batch.
        seed: base seed; epoch ``e`` uses ``seed + e``.
        rank, world_size: this process's shard (default: the current process group, read at
            every ``iter``).
        channels_last: yield batches in channels-last memory format.
        dtype: dtype of the yielded images.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        padding: int = 4,
        flip: bool = True,
        device: Union[str, torch.device, None] = None,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W); got shape {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be ({images.shape[0]},); got shape {tuple(labels.shape)}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"images must be uint8 (0..255) or floating point ([0, 1]); got {images.dtype}")
        check_number("batch_size", batch_size, 1, integer=True)
        check_number("padding", padding, 0, integer=True)
        check_number("seed", seed, 0, integer=True)
        if (rank is None) != (world_size is None):
            raise ValueError(f"give rank and world_size together (or neither, for the current process group), "
                             f"got rank={rank!r}, world_size={world_size!r}")
        if world_size is not None:
            check_number("world_size", world_size, 1, integer=True)
            check_number("rank", rank, 0, world_size - 1, integer=True)
        check_mean_std(mean, std, images.shape[1])
        device = torch.device(device) if device is not None else images.device
        self.images = images.to(device)
        self.labels = labels.to(device=device, dtype=torch.long)
        self.device = device
        self.batch_size = batch_size
        self.padding = padding
        self.flip = flip
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        self._rank, self._world_size = rank, world_size
        self.channels_last = channels_last
        self.dtype = dtype
        scale = 255.0 if images.dtype == torch.uint8 else 1.0
        # (x / scale - mean) / std  ==  x * a + b, one fused multiply-add per batch
        std_t = torch.tensor(std, dtype=torch.float32, device=device)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
        self._scale = (1.0 / (scale * std_t)).view(1, -1, 1, 1)
        self._shift = (-mean_t / std_t).view(1, -1, 1, 1)
        self.sampler = _EpochSetter(self)

    @classmethod
    def from_transform(cls, images: Tensor, labels: Tensor, batch_size: int, transform: Callable,
                       **kwargs: Any) -> Optional["DeviceLoader"]:
        """A loader doing what ``transform`` (a torchvision train transform) does, or
        ``None`` when the transform is not (crop +) (flip +) normalise."""
        augmentation = augmentation_of(transform)
        if augmentation is None:
            return None
        return cls(images, labels, batch_size, augmentation.mean, augmentation.std,
                   padding=augmentation.padding, flip=augmentation.flip, **kwargs)

    # ------------------------------------------------------------------ epochs
    def set_epoch(self, epoch: int) -> None:
        """Use the permutation and augmentation of ``epoch`` at the next ``iter``."""
        self.epoch = int(epoch)

    def _shard(self) -> tuple[int, int]:
        if self._rank is not None and self._world_size is not None:
            return self._rank, self._world_size
        return rank_and_world()

    def _per_rank(self, world: int) -> int:
        return math.ceil(len(self.labels) / world)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        per_rank = self._per_rank(self._shard()[1])
        if self.drop_last and per_rank >= self.batch_size:
            return per_rank // self.batch_size
        return math.ceil(per_rank / self.batch_size)

    def epoch_plan(self, epoch: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(indices, top, left, flip) of this rank's samples in ``epoch``, in order, on CPU:
        the sample indices and each one's crop offsets and flip flag."""
        epoch = self.epoch if epoch is None else epoch
        rank, world = self._shard()
        n = len(self.labels)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        span = 2 * self.padding + 1
        # drawn for all n positions, so the augmentation does not depend on the world size
        top = torch.randint(0, span, (n,), generator=generator)
        left = torch.randint(0, span, (n,), generator=generator)
        flip = torch.randint(0, 2, (n,), generator=generator, dtype=torch.bool) if self.flip \
            else torch.zeros(n, dtype=torch.bool)
        per_rank = self._per_rank(world)
        if per_rank * world > n:  # pad by wrapping around, as DistributedSampler does
            extra = torch.arange(per_rank * world - n) % n
            order, top, left, flip = (torch.cat([t, t[extra]]) for t in (order, top, left, flip))
        shard = slice(rank * per_rank, (rank + 1) * per_rank)
        return order[shard], top[shard], left[shard], flip[shard]

    def __iter__(self) -> Iterator[Batch]:
        plan = [t.to(self.device, non_blocking=True) for t in self.epoch_plan()]
        indices, top, left, flip = plan
        count = len(indices)
        stop = count - count % self.batch_size if self.drop_last and count >= self.batch_size else count
        for start in range(0, stop, self.batch_size):
            end = min(start + self.batch_size, stop)
            idx = indices[start:end]
            images = self.augment(self.images[idx], top[start:end], left[start:end], flip[start:end])
            yield images, self.labels[idx], idx

    # ------------------------------------------------------------ augmentation
    def augment(self, images: Tensor, top: Tensor, left: Tensor, flip: Tensor) -> Tensor:
        """Crop (after zero padding), flip and normalise a batch: one gather, one FMA.

        Args:
            images: (B, C, H, W) raw images (uint8 or float in [0, 1]).
            top, left: (B,) crop offsets in ``0 .. 2 * padding``.
            flip: (B,) bool, mirror horizontally.
        """
        b, _, h, w = images.shape
        x = images.to(torch.float32)
        p = self.padding
        if p > 0:
            x = torch.nn.functional.pad(x, (p, p, p, p))  # zeros, before normalising
        if p > 0 or self.flip:
            rows = top.view(b, 1) + torch.arange(h, device=x.device)  # (B, H)
            cols = torch.arange(w, device=x.device).expand(b, w)
            cols = torch.where(flip.view(b, 1), w - 1 - cols, cols) + left.view(b, 1)  # (B, W)
            batch = torch.arange(b, device=x.device).view(b, 1, 1)
            # advanced indices on dims 0, 2, 3 around a slice -> (B, H, W, C)
            x = x[batch, :, rows.view(b, h, 1), cols.view(b, 1, w)].permute(0, 3, 1, 2)
        x = x * self._scale + self._shift
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.to(dtype=self.dtype, memory_format=memory_format)


def device_train_loader(datamodule: Any) -> Optional[DeviceLoader]:
    """The :class:`DeviceLoader` of an :class:`~lightning_ood.data.base.OODDataModule`'s
    training split, on the trainer's device, or ``None`` (with a warning) when the
    datamodule cannot provide its training tensors or its augmentation is not crop + flip.

    The epoch permutations are seeded by the datamodule's ``seed`` and the seed of
    ``seed_everything`` (``PL_GLOBAL_SEED``), identical on every rank.
    """
    import os

    from pytorch_lightning.utilities import rank_zero_warn

    name = type(datamodule).__name__
    tensors = datamodule.train_tensors()
    if tensors is None:
        rank_zero_warn(f"{name} cannot provide its training images as tensors: device_loader ignored, "
                       "training from the DataLoader")
        return None
    transform = getattr(datamodule.train_set, "transform", None)
    if augmentation_of(transform) is None:
        rank_zero_warn(f"{name}'s training transform ({transform}) is not crop + flip + normalise: "
                       "device_loader ignored, training from the DataLoader")
        return None
    trainer = getattr(datamodule, "trainer", None)
    device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    hparams = getattr(module, "hparams", {}) or {}
    images, labels = tensors
    n = len(labels)
    seed = int(datamodule.seed) * 1_000_003 + int(os.environ.get("PL_GLOBAL_SEED", 0))
    return DeviceLoader.from_transform(
        images, labels, datamodule.batch_size, transform, device=device, seed=seed,
        drop_last=n > datamodule.batch_size, channels_last=bool(hparams.get("channels_last", False)),
    )
