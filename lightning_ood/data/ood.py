"""Building OOD test sets by name or folder path.

Imports only the leaves :mod:`lightning_ood.data.sets` and
:mod:`lightning_ood.data.torchvision_files`: the datamodules (which build their OOD sets
here) import this module, never the other way round. Sets that only one datamodule
provides (the digits' ``digits_heldout``, ``photo_patches``) come from that datamodule's
``named_ood_set``; their names are registered here when its class is defined.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Optional, Protocol

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T

from lightning_ood.data.sets import IndexedDataset, OODSet
from lightning_ood.data.torchvision_files import TORCHVISION_SETS, open_torchvision

TORCHVISION_OOD = tuple(TORCHVISION_SETS)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: OOD set name -> the datamodule (its ``name``) that provides it through ``named_ood_set``,
#: in registration (class definition) order.
_NAMED_OOD_SETS: dict[str, str] = {}


class OODSource(Protocol):
    """What :func:`build_ood_set` reads of a datamodule (an
    :class:`~lightning_ood.data.base.OODDataModule`)."""

    root: str
    download: bool
    image_size: int

    def test_transform(self) -> Callable: ...

    def folder_transform(self) -> Callable: ...

    def named_ood_set(self, name: str) -> Optional[Dataset]: ...


def register_named_ood_sets(datamodule: str, names: Iterable[str]) -> None:
    """Record that the datamodule called ``datamodule`` provides the OOD sets ``names``
    (``OODDataModule`` subclasses overriding ``named_ood_sets`` do so when defined). A name
    already registered keeps its first datamodule."""
    for name in names:
        _NAMED_OOD_SETS.setdefault(name, datamodule)


def __getattr__(name: str) -> tuple[str, ...]:
    # ``DIGITS_OOD`` used to be defined here; it now lives in lightning_ood.data.digits (which
    # registers it). Still importable from here, read off the registry.
    if name == "DIGITS_OOD":
        return tuple(n for n, datamodule in _NAMED_OOD_SETS.items() if datamodule == "digits")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def known_ood_sets() -> tuple[str, ...]:
    """Names accepted without a ``path``."""
    return TORCHVISION_OOD + tuple(n for n in _NAMED_OOD_SETS if n not in TORCHVISION_OOD)


class ImageFiles(Dataset):
    """Every image file under a folder (recursively, sorted), as RGB PIL images.

    Every file is read and fully decoded once when the set is built (at set-up, before any
    training): a file that does not decode (not an image, truncated) fails there with its
    name, not in the test loop after training. Opening a file is not enough; only decoding
    every pixel finds a truncated one (unless the user set
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``, which then pads such files grey both here and
    in the test loop). Cost, measured on one core of this project's 2-core CPU
    machine (2026-12-02, files in the page cache, 200 files each, shared machine so +-20 %):
    0.05 ms per 32x32 PNG, 0.07 ms per 40x40 PNG, 0.4 ms per 256x256 JPEG, 1 ms per 500x375
    JPEG or 224x224 PNG, i.e. about 10 s per 10,000 ImageNet-size photos (on every process
    under DDP; reading from a cold disk adds the I/O).
    """

    def __init__(self, path: str) -> None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"OOD folder not found: {path}")
        self.path = path
        self.files = sorted(
            os.path.join(d, f) for d, _, files in os.walk(path) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not self.files:
            raise FileNotFoundError(f"OOD folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        bad = [(f, reason) for f in self.files if (reason := undecodable(f)) is not None]
        if bad:
            shown = 5
            listed = "; ".join(f"{f} ({reason})" for f, reason in bad[:shown])
            more = f"; and {len(bad) - shown} more" if len(bad) > shown else ""
            raise ValueError(f"{len(bad)} of {len(self.files)} files under {path} do not decode as images: "
                             f"{listed}{more}. Delete or replace them")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        file = self.files[index]
        try:
            return read_image(file), -1
        except Exception as err:  # e.g. the file changed on disk after the start-up check
            raise ValueError(f"OOD image {file} does not decode ({type(err).__name__}: {err}): "
                             "delete or replace it, or point the OOD set's `path` elsewhere") from err


def read_image(file: str) -> Image.Image:
    """The image in ``file``, fully decoded, as RGB."""
    with Image.open(file) as img:
        return img.convert("RGB")  # decodes every pixel: a truncated file fails here, not at open


def undecodable(file: str) -> Optional[str]:
    """Why ``file`` does not fully decode as an image (what :class:`ImageFiles` returns for
    it), or ``None`` when it does."""
    try:
        read_image(file)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, EOFError, struct.error ...
        return f"{type(err).__name__}: {err}"
    return None


def build_ood_set(spec: OODSet, datamodule: OODSource) -> IndexedDataset:
    """The OOD set ``spec`` with ``datamodule``'s test transform (its ``folder_transform``
    for a folder). A missing or empty folder, a file that does not decode, or an unknown
    name fails here, before any compute."""
    test_transform = datamodule.test_transform()
    if spec.path is not None:
        try:
            files = ImageFiles(spec.path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err} (OOD set {spec.name!r}): point its `path` at a folder of images "
                                    "or remove the set from the config") from None
        except ValueError as err:
            raise ValueError(f"OOD set {spec.name!r}: {err}, or point `path` elsewhere") from None
        return IndexedDataset(files, _checked_folder_transform(spec, datamodule, files), ood=True)
    dataset = datamodule.named_ood_set(spec.name)
    if dataset is not None:
        return IndexedDataset(dataset, test_transform, ood=True)
    if spec.name in TORCHVISION_OOD:
        dataset = open_torchvision(spec.name, datamodule.root, train=False, download=datamodule.download)
        return IndexedDataset(dataset, T.Compose([_to_rgb, test_transform]), ood=True)
    if spec.name in _NAMED_OOD_SETS:
        raise ValueError(f"OOD set {spec.name!r} is only defined for the {_NAMED_OOD_SETS[spec.name]} datamodule")
    raise ValueError(
        f"unknown OOD set {spec.name!r}: give a folder with `path:` or one of {', '.join(known_ood_sets())}"
    )


def _checked_folder_transform(spec: OODSet, datamodule: OODSource, files: ImageFiles) -> Callable:
    """``datamodule.folder_transform()``, once tried on the folder's first image: it must give
    a (C, image_size, image_size) float tensor, so a datamodule whose transform does not take
    PIL images fails at set-up, not after training."""
    transform = datamodule.folder_transform()
    name = type(datamodule).__name__
    try:
        image = transform(files[0][0])
    except Exception as err:
        raise TypeError(f"OOD set {spec.name!r}: {name}.folder_transform() fails on {files.files[0]} "
                        f"({type(err).__name__}: {err}); it must turn an RGB PIL image into a tensor: "
                        f"override folder_transform() in {name}") from err
    size = (datamodule.image_size, datamodule.image_size)
    if not isinstance(image, Tensor) or image.dim() != 3 or not image.is_floating_point() \
            or tuple(image.shape[1:]) != size:
        got = (f"a {image.dtype} tensor of shape {tuple(image.shape)}" if isinstance(image, Tensor)
               else type(image).__name__)
        raise TypeError(f"OOD set {spec.name!r}: {name}.folder_transform() turns {files.files[0]} into {got}, "
                        f"not a (C, {size[0]}, {size[1]}) float tensor like its own images: override "
                        f"folder_transform() in {name}")
    return transform


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB") if isinstance(image, Image.Image) else image
