"""DeviceLoader: on-device crop + flip + normalise, rank shards, seeding, Trainer integration (CPU)."""
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from lightning_ood.data import DigitsDataModule
from lightning_ood.data import torchvision_sets
from lightning_ood.data.base import small_image_transforms
from lightning_ood.data.device_loader import Augmentation, DeviceLoader, augmentation_of
from lightning_ood.lightning.module import OODClassifier

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _images(n: int = 40, size: int = 8, dtype=torch.uint8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=generator, dtype=torch.uint8)
    return images if dtype == torch.uint8 else images.float() / 255


def _loader(images, batch_size=8, **kwargs) -> DeviceLoader:
    labels = torch.arange(len(images)) % 10
    kwargs.setdefault("rank", 0)
    kwargs.setdefault("world_size", 1)
    return DeviceLoader(images, labels, batch_size, MEAN, STD, **kwargs)


def _reference(image: torch.Tensor, top: int, left: int, flip: bool, padding: int) -> torch.Tensor:
    """One image through torchvision's functional ops: pad, crop, flip, normalise."""
    x = image.float() / 255 if image.dtype == torch.uint8 else image
    size = x.shape[-1]
    x = TF.crop(TF.pad(x, [padding]), top, left, size, size)
    if flip:
        x = TF.hflip(x)
    return TF.normalize(x, MEAN, STD)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_shapes_dtypes_and_lengths(dtype):
    loader = _loader(_images(42, dtype=dtype), batch_size=8)
    batches = list(loader)
    assert len(loader) == len(batches) == 5  # 42 // 8, last partial batch dropped
    for images, labels, indices in batches:
        assert images.shape == (8, 3, 8, 8) and images.dtype == torch.float32
        assert labels.dtype == torch.long and indices.dtype == torch.long
        torch.testing.assert_close(labels, indices % 10)
    keep_last = _loader(_images(42, dtype=dtype), batch_size=8, drop_last=False)
    assert len(keep_last) == 6 and len(list(keep_last)[-1][0]) == 2


def test_without_augmentation_it_is_the_normalised_images():
    images = _images(16)
    loader = _loader(images, padding=0, flip=False, shuffle=False)
    out, _, indices = next(iter(loader))
    torch.testing.assert_close(indices, torch.arange(8))
    expected = T.Normalize(MEAN, STD)(images[:8].float() / 255)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_and_flip_match_torchvision_per_image(dtype):
    images = _images(24, dtype=dtype)
    loader = _loader(images, batch_size=24, padding=4, flip=True, seed=3)
    out, _, indices = next(iter(loader))
    order, top, left, flip = loader.epoch_plan()
    torch.testing.assert_close(indices, order)
    for k in range(len(indices)):
        ref = _reference(images[indices[k]], int(top[k]), int(left[k]), bool(flip[k]), 4)
        torch.testing.assert_close(out[k], ref, atol=1e-6, rtol=1e-6)
    # the augmentation really happened: flips and off-centre crops are drawn, so many
    # images differ from their un-augmented version
    plain = T.Normalize(MEAN, STD)(images[indices].float() / 255 if dtype == torch.uint8 else images[indices])
    changed = (out - plain).abs().flatten(1).amax(1) > 1e-4
    assert 0 < int(flip.sum()) < len(flip)
    assert ((top != 4) | (left != 4)).any()
    assert changed.float().mean() > 0.5
    # zero padding (black, before normalisation) shows up where the crop leaves the image
    shifted = int(((top == 0) & ~flip).nonzero()[0]) if ((top == 0) & ~flip).any() else None
    if shifted is not None:
        torch.testing.assert_close(out[shifted, :, 0, 0], TF.normalize(torch.zeros(3, 1, 1), MEAN, STD)[:, 0, 0])


def test_flip_only_mirrors():
    images = _images(8)
    loader = _loader(images, batch_size=8, padding=0, flip=True, shuffle=False, seed=1)
    out, _, _ = next(iter(loader))
    _, _, _, flip = loader.epoch_plan()
    plain = T.Normalize(MEAN, STD)(images.float() / 255)
    for k in range(8):
        torch.testing.assert_close(out[k], plain[k].flip(-1) if flip[k] else plain[k])


@pytest.mark.parametrize("n, world", [(99, 3), (100, 3), (64, 2), (7, 4)])
def test_rank_shards_are_equal_disjoint_and_cover(n, world):
    images = _images(n)
    shards = []
    for rank in range(world):
        loader = _loader(images, batch_size=4, drop_last=False, rank=rank, world_size=world, seed=5)
        loader.set_epoch(2)
        shards.append(torch.cat([idx for _, _, idx in loader]))
    lengths = {len(s) for s in shards}
    assert lengths == {-(-n // world)}  # equal length per rank
    together = torch.cat(shards)
    assert set(together.tolist()) == set(range(n))  # covering
    padded = len(together) - n
    assert len(together) - len(set(together.tolist())) == padded  # disjoint up to the padding
    if n % world == 0:
        assert padded == 0


def test_same_seed_and_epoch_same_batches_new_epoch_reshuffles():
    images = _images(40)
    a, b = _loader(images, seed=7), _loader(images, seed=7)
    first = [torch.cat([x.flatten(), i.float()]) for x, _, i in a]
    again = [torch.cat([x.flatten(), i.float()]) for x, _, i in b]
    for u, v in zip(first, again):
        torch.testing.assert_close(u, v)
    # iterating twice without set_epoch repeats the epoch (DistributedSampler semantics)
    torch.testing.assert_close(torch.cat([i for _, _, i in a]), torch.cat([i for _, _, i in b]))
    a.sampler.set_epoch(1)  # what Lightning calls every epoch
    assert a.epoch == 1
    assert not torch.equal(torch.cat([i for _, _, i in a]), torch.cat([i for _, _, i in b]))
    other_seed = _loader(images, seed=8)
    assert not torch.equal(torch.cat([i for _, _, i in other_seed]), torch.cat([i for _, _, i in b]))


def test_augmentation_does_not_depend_on_world_size():
    images = _images(32)
    single = _loader(images, batch_size=4, seed=11)
    by_index = {int(i): x for xs, _, idx in single for x, i in zip(xs, idx)}
    for rank in range(2):
        loader = _loader(images, batch_size=4, seed=11, rank=rank, world_size=2)
        for xs, _, idx in loader:
            for x, i in zip(xs, idx):
                torch.testing.assert_close(x, by_index[int(i)])


def test_channels_last_and_validation():
    loader = _loader(_images(16), channels_last=True)
    images, _, _ = next(iter(loader))
    assert images.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="N, C, H, W"):
        DeviceLoader(torch.zeros(4, 8, 8), torch.zeros(4), 2, MEAN, STD)
    with pytest.raises(ValueError, match="labels"):
        DeviceLoader(torch.zeros(4, 3, 8, 8), torch.zeros(5), 2, MEAN, STD)
    with pytest.raises(TypeError, match="uint8"):
        DeviceLoader(torch.zeros(4, 3, 8, 8, dtype=torch.int32), torch.zeros(4), 2, MEAN, STD)
    with pytest.raises(ValueError, match="one per channel"):
        DeviceLoader(torch.zeros(4, 3, 8, 8), torch.zeros(4), 2, (0.5,), (0.5,))


def test_augmentation_is_read_off_the_train_transform():
    train, test = small_image_transforms(MEAN, STD)
    assert augmentation_of(train) == Augmentation(4, True, MEAN, STD)
    assert augmentation_of(test) is None  # Resize/CenterCrop: not what the loader does
    assert augmentation_of(T.Compose([T.RandomCrop(32, padding=2), T.Normalize((0.1,), (0.2,))])) == \
        Augmentation(2, False, (0.1,), (0.2,))
    assert augmentation_of(T.Compose([T.RandomResizedCrop(32), T.ToTensor(), T.Normalize(MEAN, STD)])) is None
    assert augmentation_of(T.Compose([T.RandomCrop(32, padding=4, padding_mode="reflect"),
                                      T.ToTensor(), T.Normalize(MEAN, STD)])) is None
    assert augmentation_of(None) is None


def test_digits_datamodule_uses_it_with_its_own_augmentation():
    dm = DigitsDataModule(batch_size=16, device_loader=True)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceLoader)
    assert loader.padding == 4 and not loader.flip  # digits are cropped, never mirrored
    assert len(loader) == len(dm.train_set) // 16
    images, labels, indices = next(iter(loader))
    assert images.shape == (16, 3, 32, 32)
    # the same image through the datamodule's own (test-transform) path, crop centred
    plain = torch.stack([dm.fit_set[int(i)][0] for i in indices])
    centred = loader.augment(loader.images[indices], torch.full((16,), 4), torch.full((16,), 4),
                             torch.zeros(16, dtype=torch.bool))
    torch.testing.assert_close(centred, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(labels, torch.tensor([dm.fit_set[int(i)][1] for i in indices]))


def test_falls_back_to_the_dataloader_when_no_tensors(monkeypatch):
    dm = DigitsDataModule(batch_size=16, device_loader=True)
    dm.setup("fit")
    monkeypatch.setattr(dm, "train_tensors", lambda: None)
    with pytest.warns(UserWarning, match="device_loader ignored"):
        loader = dm.train_dataloader()
    assert isinstance(loader, DataLoader)
    plain = DigitsDataModule(batch_size=16)
    plain.setup("fit")
    assert isinstance(plain.train_dataloader(), DataLoader)


class _FakeCIFAR:
    """What the device loader reads of torchvision's CIFAR: ``data`` (N, H, W, C) uint8 and
    ``targets``; items are PIL images as torchvision gives them."""

    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = list(rng.integers(0, 10, n))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return Image.fromarray(self.data[i]), int(self.targets[i])


def test_cifar_train_tensors_match_the_pil_pipeline(monkeypatch):
    fakes = {True: _FakeCIFAR(60, 0), False: _FakeCIFAR(20, 1)}
    monkeypatch.setattr(torchvision_sets, "open_torchvision", lambda name, root, train, download: fakes[train])
    dm = torchvision_sets.CIFAR10DataModule(batch_size=8, val_size=10, num_workers=0, device_loader=True)
    dm.setup("fit")
    images, labels = dm.train_tensors()
    assert images.dtype == torch.uint8 and images.shape == (50, 3, 32, 32) and labels.shape == (50,)
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceLoader) and loader.flip and loader.padding == 4
    _, batch_labels, indices = next(iter(loader))
    centred = loader.augment(loader.images[indices], torch.full((8,), 4), torch.full((8,), 4),
                             torch.zeros(8, dtype=torch.bool))
    expected = torch.stack([dm.fit_set[int(i)][0] for i in indices])  # PIL -> ToTensor -> Normalize
    torch.testing.assert_close(centred, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch_labels, torch.tensor([dm.fit_set[int(i)][1] for i in indices]))


class _Seen(pl.Callback):
    def __init__(self) -> None:
        self.indices: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.indices.append(batch[2].clone())


def test_trainer_fit_two_steps_with_the_device_loader():
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=16, device_loader=True, val_size=20)
    model = OODClassifier(num_classes=dm.num_classes, width=4, scheduler="none")
    seen = _Seen()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=1, limit_val_batches=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[seen])
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    loader = trainer.train_dataloader
    assert isinstance(loader, DeviceLoader)
    assert loader.epoch == 1  # Lightning's per-epoch set_epoch reached the loader
    assert len(seen.indices) == 2 and not torch.equal(seen.indices[0], seen.indices[1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), r"batch_size must be >= 1, got 0"),
    (dict(batch_size=4.0), r"batch_size must be an integer, got 4\.0"),
    (dict(padding=-1), r"padding must be >= 0, got -1"),
    (dict(padding=2.5), r"padding must be an integer, got 2\.5"),
    (dict(seed=-3), r"seed must be >= 0, got -3"),
    (dict(rank=1, world_size=None), r"give rank and world_size together .*got rank=1, world_size=None"),
    (dict(rank=2, world_size=2), r"rank must be >= 0 and <= 1, got 2"),
    (dict(rank=0, world_size=0), r"world_size must be >= 1, got 0"),
    (dict(std=(0.2, 0.0, 0.2)), r"std\[1\] must be > 0, got 0\.0"),
])
def test_numeric_options_are_checked_at_construction(kwargs, message):
    args = dict(batch_size=2, mean=MEAN, std=STD, rank=0, world_size=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        DeviceLoader(_images(4), torch.zeros(4), **args)
