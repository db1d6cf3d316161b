"""One file that answers "which class, and is this input familiar?".

Train once, evaluate once (``OODEvaluation`` writes ``model_with_detectors.ckpt`` next to
its report), deploy one file::

    import lightning_ood
    model = lightning_ood.load("model_with_detectors.ckpt")
    out = model(model.preprocess(images))   # {"logits", "scores", "is_ood"}

* :func:`save_with_detectors` writes a model with its fitted detectors, its preprocessing
  and its per-detector thresholds as a dict of tensors and plain Python values only: it
  loads with ``torch.load(path, weights_only=True)`` and never unpickles code.
* :func:`load` rebuilds it as an :class:`OODModel` (backbone + head + detectors, eval mode)
  and raises :class:`CheckpointError` (a ``ValueError``) naming the problem and the fix for
  files that are truncated, corrupted, not ours, too new or that do not fit their config.
* :func:`export_program` writes a ``torch.export`` program (``.pt2``, dynamic batch
  dimension) computing logits, every exportable detector's score and ``is_ood``; also
  ``python -m lightning_ood.export CKPT --out model.pt2``.

File layout (``format_version`` 2)::

    {"format": "lightning_ood", "format_version": 2, "lightning_ood_version": str,
     "torch_version": str,
     "model": {"class": "OODClassifier", "hparams": {backbone, loss, num_classes, ...}},
     "detectors": [{"name": str, "class": str, "init_args": {...},
                    "regenerated": {buffer name: sha256 hex}}, ...],   # may be empty
     "state_dict": {name: Tensor},        # backbone.*, head.*, detectors.<name>.*
     "preprocessing": {image_size, resize_size, crop_size, interpolation, mean, std} | None,
     "thresholds": {detector name: float}}   # score < threshold -> OOD

Version 2 leaves out WeiPer's perturbed head ``W~, b~`` (819 MB for an ImageNet ResNet50)
when it is exactly what the saved head, ``delta``, ``n_repeats`` and ``seed`` re-draw:
:func:`load` re-draws it and checks it against the recorded SHA-256 (a torch whose random
generator changed gives a clear error instead of different scores). Version 1 files, which
store ``W~``, still load.

Writes are atomic: a temporary file in the destination folder, ``fsync``, then
``os.replace``, so an interrupted save never leaves a partial file under the final name and
an existing file stays intact until the new one is complete.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import io
import json
import math
import numbers
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from lightning_ood import __version__
from lightning_ood.io import atomic_write
from lightning_ood.detectors import Detector, ForwardOutputs, detector_classes
from lightning_ood.module import OODClassifier

if TYPE_CHECKING:
    from lightning_ood.posthoc import PostHocClassifier

PathLike = Union[str, "os.PathLike[str]"]

FORMAT = "lightning_ood"
#: Bumped whenever a reader of the previous version could misread a new file.
FORMAT_VERSION = 2
#: File name written by ``OODEvaluation`` into its output folder.
CHECKPOINT_NAME = "model_with_detectors.ckpt"
#: What ``OODEvaluation`` writes instead for a user's own network (``PostHocClassifier``):
#: its class cannot be rebuilt from a weights-only checkpoint, a ``torch.export`` program can.
PROGRAM_NAME = "model_with_detectors.pt2"
#: Name of the JSON metadata stored inside ``.pt2`` files (``extra_files``).
PROGRAM_METADATA = "lightning_ood.json"

__all__ = [
    "CHECKPOINT_NAME", "PROGRAM_NAME", "FORMAT", "FORMAT_VERSION", "CheckpointError", "OODModel",
    "detector_classes", "export_program", "load", "load_program", "main",
    "preprocessing_from_datamodule", "save_with_detectors",
]


class CheckpointError(ValueError):
    """A model file that cannot be written or read; the message names the problem and the fix."""


# --------------------------------------------------------------------------- the model
class OODModel(nn.Module):
    """A trained classifier with its fitted OOD detectors, ready for inference.

    ``forward(x)`` runs the network **once** (per-block FeatureNorms are computed only
    when a detector reads them) and returns::

        {"logits": (B, C),
         "scores": {detector name: (B,)},       # higher = more in-distribution
         "is_ood": {detector name: bool (B,)}}  # only when thresholds were saved

    ``is_ood`` is always returned when the file holds thresholds (``OODEvaluation`` stores,
    per detector, the score that keeps 95 % of the ID test set); it holds the detectors that
    have one, and ``score < threshold`` means OOD. ``x`` is a normalised float batch
    (B, 3, H, W); :meth:`preprocess` makes one from raw images. ``forward`` checks its
    dtype, channels and (when stored) crop size, not its values, and says to call
    :meth:`preprocess` when they do not fit.

    Attributes:
        classifier: the :class:`~lightning_ood.module.OODClassifier` (backbone, head and
            ``detectors``; or a :class:`~lightning_ood.posthoc.PostHocClassifier`, which
            can be exported but not saved); its ``forward_outputs`` is the one forward pass
            used here.
        thresholds: detector name -> score threshold.
        preprocessing: ``image_size``, ``resize_size``, ``crop_size``, ``interpolation``,
            ``mean``, ``std`` of the ID test transform, or ``None``.
    """

    def __init__(
        self,
        classifier: Union[OODClassifier, "PostHocClassifier"],
        thresholds: Optional[Mapping[str, float]] = None,
        preprocessing: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.classifier = classifier
        self.thresholds = _check_thresholds(thresholds, list(classifier.detectors))
        self.preprocessing = _check_preprocessing(preprocessing)
        self.training = classifier.training

    @property
    def detectors(self) -> nn.ModuleDict:
        """The fitted detectors, by name (``classifier.detectors``)."""
        return self.classifier.detectors

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    @property
    def needs_block_norms(self) -> bool:
        """Whether some detector reads the per-block FeatureNorms."""
        return any(getattr(d, "requires_block_norms", False) for d in self.detectors.values())

    def forward_outputs(self, x: Tensor) -> ForwardOutputs:
        """Logits, pooled features and (when needed) block norms of one forward pass."""
        return self.classifier.forward_outputs(x, with_block_norms=self.needs_block_norms)

    def forward(self, x: Tensor) -> dict[str, Any]:
        self._check_input(x)
        outputs = self.forward_outputs(x)
        scores = {name: detector(outputs) for name, detector in self.detectors.items()}
        result: dict[str, Any] = {"logits": outputs.logits, "scores": scores}
        if self.thresholds:
            result["is_ood"] = {name: scores[name] < threshold for name, threshold in self.thresholds.items()}
        return result

    def _check_input(self, x: Any) -> None:
        """Shape and dtype of a normalised batch, against the stored preprocessing (no host sync)."""
        hint = "call model(model.preprocess(images)) with raw images (PIL, uint8 or [0, 1] tensors)"
        if not isinstance(x, Tensor):
            raise TypeError(f"model(x) takes a normalised float tensor (B, C, H, W), got {type(x).__name__}; {hint}")
        first = next(iter(self.parameters()), None)
        expected_dtype = first.dtype if first is not None else torch.float32
        if x.dtype != expected_dtype:
            raise TypeError(f"model(x) takes a normalised {expected_dtype} batch, got {x.dtype}; {hint}")
        if x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(f"model(x) takes a non-empty batch (B, C, H, W), got shape {tuple(x.shape)}; {hint}")
        spec = self.preprocessing or {}
        channels = len(spec.get("mean") or []) or None
        if channels is not None and x.shape[1] != channels:
            raise ValueError(f"model(x) takes {channels}-channel images, got {x.shape[1]} (shape {tuple(x.shape)}); {hint}")
        crop = spec.get("crop_size")
        if crop is not None:
            height, width = (crop, crop) if isinstance(crop, int) else tuple(crop)
            if tuple(x.shape[2:]) != (height, width):
                raise ValueError(f"model(x) takes {height}x{width} images (the stored crop size), got "
                                 f"{x.shape[2]}x{x.shape[3]}; {hint}")

    def preprocess(self, images: Any) -> Tensor:
        """Raw images -> the normalised batch :meth:`forward` expects, on the model's device.

        Applies the stored ID test transform: resize (shorter side to ``resize_size``,
        bilinear, antialiased), centre crop to ``crop_size``, scale to [0, 1], normalise
        with ``mean``/``std``. Grey images are repeated to 3 channels, RGBA/palette PIL
        images converted to RGB.

        Args:
            images: a PIL image, a (C, H, W) or (B, C, H, W) tensor, or a list of them.
                ``uint8`` tensors hold 0-255 values, ``uint16`` tensors 0-65535, float
                tensors values in [0, 1] (an already-normalised tensor goes to ``model(x)``
                directly); other integer dtypes are refused. 16-bit PIL images (``I;16``)
                and ``I`` images (how Pillow may open 16-bit PNGs) are divided by 65535
                (``I`` values outside 0-65535 are refused); ``F`` images must hold [0, 1].

        Returns:
            float32 tensor (B, 3, crop, crop).
        """
        if self.preprocessing is None:
            raise CheckpointError(
                "this model file holds no preprocessing (it was saved without a datamodule); "
                "normalise the images yourself and call model(x), or re-save with "
                "save_with_detectors(..., preprocessing=preprocessing_from_datamodule(dm))"
            )
        if isinstance(images, Tensor) and images.dim() == 4:
            items: list[Any] = list(images)
        elif isinstance(images, (list, tuple)):
            items = list(images)
        else:
            items = [images]
        if not items:
            raise ValueError("preprocess got no images")
        batch = torch.stack([_preprocess_one(item, self.preprocessing) for item in items])
        first = next(iter(self.parameters()), None)
        return batch.to(first.device) if first is not None else batch

    def extra_repr(self) -> str:
        return f"detectors={list(self.detectors)}, thresholds={self.thresholds}"


def _preprocess_one(image: Any, spec: Mapping[str, Any]) -> Tensor:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    interpolation = InterpolationMode(spec.get("interpolation", "bilinear"))
    if isinstance(image, Tensor):
        if image.dim() == 2:
            image = image.unsqueeze(0)
        if image.dim() != 3:
            raise ValueError(f"preprocess expects (C, H, W) or (B, C, H, W) tensors; got shape {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            image = image.float().div(255.0)
        elif image.dtype == torch.uint16:
            image = image.float().div(65535.0)
        elif image.is_floating_point():
            image = image.float()
            low, high = float(image.min()), float(image.max())
            if low < -1e-3 or high > 1.0 + 1e-3:
                raise ValueError(
                    f"preprocess expects raw float images in [0, 1] (or uint8 0-255); got values in "
                    f"[{low:.3g}, {high:.3g}]. An already-normalised batch goes to model(x) directly."
                )
        else:
            raise TypeError(f"preprocess expects uint8, uint16 or float tensors; got {image.dtype}")
        image = TF.resize(image, spec["resize_size"], interpolation=interpolation, antialias=True)
    else:
        try:
            from PIL import Image
        except ImportError as err:  # pragma: no cover - torchvision depends on Pillow
            raise TypeError(f"preprocess expects tensors or PIL images; got {type(image)}") from err
        if not isinstance(image, Image.Image):
            raise TypeError(f"preprocess expects PIL images or tensors; got {type(image).__name__}")
        if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            image = _wide_pil_to_unit(image)
            image = TF.resize(image, spec["resize_size"], interpolation=interpolation, antialias=True)
        else:
            if image.mode not in ("RGB", "L"):
                image = image.convert("RGB")
            image = TF.to_tensor(TF.resize(image, spec["resize_size"], interpolation=interpolation))
    image = TF.center_crop(image, spec["crop_size"])
    if image.shape[0] == 1:
        image = image.repeat(3, 1, 1)
    if image.shape[0] != len(spec["mean"]):
        raise ValueError(f"preprocess expects 1 or {len(spec['mean'])} channels; got {image.shape[0]}")
    return TF.normalize(image, spec["mean"], spec["std"])


def _wide_pil_to_unit(image: Any) -> Tensor:
    """A 16-bit, 32-bit integer or float PIL image as a (1, H, W) tensor in [0, 1]: 16-bit
    and ``I`` images (how Pillow opens 16-bit PNGs) are divided by 65535; ``I`` values
    outside 0-65535 and ``F`` values outside [0, 1] are refused (their range is unknown)."""
    import numpy as np

    values = torch.from_numpy(np.asarray(image).astype(np.float64))
    low, high = float(values.min()), float(values.max())
    if image.mode == "F":
        if low < 0 or high > 1:
            raise ValueError(f"preprocess: a float ('F') PIL image must hold values in [0, 1]; got [{low:.3g}, "
                             f"{high:.3g}]. Scale it to [0, 1] (or to uint8) first")
        return values.float()[None]
    if low < 0 or high > 65535:
        raise ValueError(f"preprocess: a {image.mode!r} PIL image holds values in [{low:.0f}, {high:.0f}], outside "
                         "the 16-bit range 0-65535; scale it to [0, 1] (or to uint8) first")
    return (values / 65535.0).float()[None]


# --------------------------------------------------------------------------- saving
def preprocessing_from_datamodule(datamodule: Any) -> dict[str, Any]:
    """The inference preprocessing of a datamodule's ID test transform.

    Reads ``image_size``, ``mean`` and ``std`` and, from ``test_transform()``, the sizes of
    its ``Resize`` and ``CenterCrop`` (both default to ``image_size``: datamodules whose
    images come pre-sized, such as the digits, get a resize to ``image_size``).
    """
    from torchvision import transforms as T

    size = int(datamodule.image_size)
    spec: dict[str, Any] = {
        "image_size": size, "resize_size": size, "crop_size": size, "interpolation": "bilinear",
        "mean": [float(m) for m in datamodule.mean], "std": [float(s) for s in datamodule.std],
    }
    try:
        transform = datamodule.test_transform()
    except NotImplementedError:
        return spec
    stack = [transform]
    while stack:
        t = stack.pop(0)
        if isinstance(t, T.Compose):
            stack = list(t.transforms) + stack
        elif isinstance(t, T.Resize):
            spec["resize_size"] = _plain_size(t.size)
            spec["interpolation"] = t.interpolation.value
        elif isinstance(t, T.CenterCrop):
            spec["crop_size"] = _plain_size(t.size)
        elif isinstance(t, T.Normalize):
            spec["mean"], spec["std"] = [float(m) for m in t.mean], [float(s) for s in t.std]
    return spec


def _plain_size(size: Any) -> Union[int, list[int]]:
    if isinstance(size, numbers.Integral):
        return int(size)
    size = [int(s) for s in size]
    return size[0] if len(size) == 1 or (len(size) == 2 and size[0] == size[1]) else size


def save_with_detectors(
    pl_module: Union[OODClassifier, OODModel],
    path: PathLike,
    preprocessing: Optional[Mapping[str, Any]] = None,
    thresholds: Optional[Mapping[str, float]] = None,
    compact: bool = True,
) -> str:
    """Write a model with its fitted detectors to ``path`` (atomically).

    Args:
        pl_module: an :class:`~lightning_ood.module.OODClassifier` whose ``detectors`` are
            attached (and fitted), or an :class:`OODModel` (re-saving a loaded file).
        path: destination file (folders are created).
        preprocessing: the inference preprocessing (see :func:`preprocessing_from_datamodule`).
            ``None``: the ``OODModel``'s own, or that of the datamodule of the trainer the
            module is attached to, if any.
        thresholds: detector name -> score threshold (``score < threshold`` = OOD).
            ``None``: the ``OODModel``'s own, else none.
        compact: leave out WeiPer's perturbed head when :func:`load` can re-draw it
            bit-identically from the saved head and seed (checked here, and against a
            SHA-256 at load). ``False`` stores it, e.g. for a file that must load under a
            torch version whose random generator may differ.

    Returns:
        ``path`` as a string.

    Raises:
        CheckpointError: the module is not an ``OODClassifier``, a detector's class is not
            one of :mod:`lightning_ood.detectors` (see :func:`detector_classes`), or a
            configuration value is not a plain Python value.
    """
    if isinstance(pl_module, OODModel):
        preprocessing = pl_module.preprocessing if preprocessing is None else preprocessing
        thresholds = pl_module.thresholds if thresholds is None else thresholds
        classifier = pl_module.classifier
    else:
        classifier = pl_module
    if not isinstance(classifier, OODClassifier):
        raise CheckpointError(
            f"save_with_detectors needs an OODClassifier (or an OODModel); got {type(classifier).__name__}"
        )
    if preprocessing is None:
        datamodule = _attached_datamodule(classifier)
        if datamodule is not None:
            preprocessing = preprocessing_from_datamodule(datamodule)
    state = _deployable_state(classifier)
    detectors = [_detector_config(name, detector) for name, detector in classifier.detectors.items()]
    if compact:
        for entry in detectors:
            entry["regenerated"] = _leave_out_regenerable(classifier, entry["name"], state)
    checkpoint = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lightning_ood_version": __version__,
        "torch_version": str(torch.__version__),
        "model": {"class": "OODClassifier", "hparams": _model_config(classifier)},
        "detectors": detectors,
        "state_dict": state,
        "preprocessing": _check_preprocessing(preprocessing),
        "thresholds": _check_thresholds(thresholds, list(classifier.detectors)),
    }
    path = os.fspath(path)
    atomic_write(path, lambda f: torch.save(checkpoint, f))
    return path


def _attached_datamodule(module: OODClassifier) -> Any:
    trainer = getattr(module, "_trainer", None)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    return datamodule if hasattr(datamodule, "image_size") and hasattr(datamodule, "mean") else None


def _model_config(classifier: OODClassifier) -> dict[str, Any]:
    accepted = inspect.signature(OODClassifier.__init__).parameters
    hparams = {k: v for k, v in dict(classifier.hparams).items() if k in accepted}
    return _plain(hparams, "model hyper-parameter")


def _detector_config(name: str, detector: nn.Module) -> dict[str, Any]:
    cls = type(detector)
    allowed = detector_classes()
    if allowed.get(cls.__name__) is not cls:
        raise CheckpointError(
            f"detector {name!r} is a {cls.__module__}.{cls.__qualname__}; model files can only hold "
            f"the detectors of lightning_ood.detectors ({', '.join(sorted(allowed))}), so that loading "
            "never runs code from the file. Remove it from model.detectors before saving."
        )
    init_args: dict[str, Any] = {}
    for param in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        value = getattr(detector, param.name, param.default)
        if isinstance(value, (Tensor, nn.Module)) and param.default is None:
            value = None  # tensors are carried by the state_dict (e.g. WeiPer's projections)
        if value is inspect.Parameter.empty:
            raise CheckpointError(f"cannot recover {cls.__name__}'s argument {param.name!r} of detector {name!r}")
        init_args[param.name] = _plain(value, f"detector {name!r} argument {param.name!r}")
    return {"name": name, "class": cls.__name__, "init_args": init_args}


def _deployable_state(classifier: OODClassifier) -> dict[str, Tensor]:
    """backbone.*, head.* and detectors.* (every persistent entry of an OODClassifier)."""
    state = classifier.state_dict()
    return {k: v.detach().to("cpu") for k, v in state.items() if k.split(".", 1)[0] in ("backbone", "head", "detectors")}


def _sha256(tensor: Tensor) -> str:
    array = tensor.detach().to("cpu").contiguous().numpy()
    return hashlib.sha256(memoryview(array).cast("B")).hexdigest()


def _leave_out_regenerable(classifier: OODClassifier, name: str, state: dict[str, Tensor]) -> dict[str, str]:
    """Drop the buffers a detector's ``attach`` re-draws (WeiPer's ``W~, b~``) from
    ``state`` when re-drawing them from the classifier's head gives the same bits; return
    their SHA-256 digests (empty when they are kept)."""
    drawn = classifier.detectors[name].regenerable_buffers(classifier.head)
    if not drawn:
        return {}
    digests = {buffer: _sha256(tensor) for buffer, tensor in drawn.items()}
    for buffer, digest in digests.items():
        stored = state[f"detectors.{name}.{buffer}"]  # already on the CPU
        # bit for bit, dtype included (torch.equal would let a float64 copy pass)
        if stored.dtype != torch.float32 or _sha256(stored) != digest:
            return {}  # drawn from another weight, changed since or cast: keep the tensors themselves
    for buffer in digests:
        del state[f"detectors.{name}.{buffer}"]
    return digests


def _plain(value: Any, where: str) -> Any:
    """``value`` as bool/int/float/str/None and lists/dicts of them (tuples become lists)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)  # str subclasses (e.g. TorchVersion) would pickle as their class
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise CheckpointError(f"{where}: dict keys must be strings; got {list(value)[:5]}")
        return {str(k): _plain(v, f"{where} {k!r}") for k, v in value.items()}
    raise CheckpointError(
        f"{where} is a {type(value).__name__} ({value!r:.80}); model files hold only plain values "
        "(numbers, strings, lists, dicts) so that they load with torch.load(weights_only=True)"
    )


def _check_thresholds(thresholds: Optional[Mapping[str, float]], names: Sequence[str]) -> dict[str, float]:
    if not thresholds:
        return {}
    unknown = [n for n in thresholds if n not in names]
    if unknown:
        raise CheckpointError(f"thresholds for unknown detectors {unknown}; the model has {list(names)}")
    out = {}
    for name, value in thresholds.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise CheckpointError(f"threshold of {name!r} must be a finite number; got {value!r}")
        out[str(name)] = float(value)
    return out


def _check_preprocessing(spec: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    if spec is None:
        return None
    spec = _plain(dict(spec), "preprocessing")
    size = spec.get("image_size")
    if size is None:
        raise CheckpointError("preprocessing needs at least 'image_size', 'mean' and 'std'")
    spec.setdefault("resize_size", size)
    spec.setdefault("crop_size", size)
    spec.setdefault("interpolation", "bilinear")
    for key in ("mean", "std"):
        if not isinstance(spec.get(key), list) or not spec[key]:
            raise CheckpointError(f"preprocessing[{key!r}] must be a list of per-channel floats; got {spec.get(key)!r}")
    return spec


# --------------------------------------------------------------------------- loading
_HOW_TO_MAKE = (
    "Make one with lightning_ood.export.save_with_detectors(model, path) from an OODClassifier "
    "whose detectors are attached and fitted, or run trainer.test with the OODEvaluation callback "
    f"(it writes {CHECKPOINT_NAME} next to its report)."
)


def load(path: PathLike, map_location: Optional[Union[str, torch.device]] = None) -> OODModel:
    """Load a model file written by :func:`save_with_detectors` (or ``OODEvaluation``).

    Args:
        path: the ``.ckpt`` file.
        map_location: device to put the model on (``None``: CPU).

    Returns:
        An :class:`OODModel` for inference: eval mode, parameters frozen
        (``model.requires_grad_(True)`` to fine-tune); ``model(x)`` gives logits, scores
        and ``is_ood``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: truncated or corrupted file, a file that is not a lightning_ood
            model file (a plain ``state_dict``, a Lightning training checkpoint ...), a
            ``format_version`` newer than this lightning_ood reads, or weights that do not
            fit the recorded model configuration.
    """
    checkpoint = _read(os.fspath(path))
    model = _build(checkpoint, os.fspath(path))
    if map_location is not None:
        model.to(map_location)
    return model.eval().requires_grad_(False)


def _read(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder; pass the model file inside it (e.g. {CHECKPOINT_NAME})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", str(err), re.IGNORECASE)
        if blocked and zipfile.is_zipfile(path):  # a plain pickle of objects: named by _corrupted
            raise CheckpointError(
                f"{path} holds pickled Python objects ({_sniff_pickled(path)}; it references {blocked.group(1)}, "
                "which was not loaded or run), not a lightning_ood model file, which holds only tensors and "
                f"plain values. {_HOW_TO_MAKE}"
            ) from None
        raise CheckpointError(_corrupted(path, err)) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as err:
        raise CheckpointError(_corrupted(path, err)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a lightning_ood model file. {_HOW_TO_MAKE}"
        )
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is {_describe_foreign(obj)}, not a lightning_ood model file. {_HOW_TO_MAKE}")
    version = obj.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} has an invalid format_version {version!r}; the file is damaged")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer lightning_ood (file format_version {version}, written by "
            f"lightning_ood {obj.get('lightning_ood_version', '?')}); this lightning_ood {__version__} reads "
            f"format_version <= {FORMAT_VERSION}. Upgrade lightning_ood: pip install -U lightning_ood"
        )
    missing = [k for k in ("model", "detectors", "state_dict") if k not in obj]
    if missing:
        raise CheckpointError(f"{path} lacks the entries {missing}; the file is damaged. {_HOW_TO_MAKE}")
    return obj


def _corrupted(path: str, err: BaseException) -> str:
    """What an unreadable file is, from its bytes (never unpickled): a torch.export program,
    a zip or pickle that is not a model file, or a damaged PyTorch file."""
    size = os.path.getsize(path)
    again = "Copy the file again or re-create it (save_with_detectors, or trainer.test with OODEvaluation)."
    if size == 0:
        return f"{path} (0 bytes) is empty. {again}"
    if _is_program(path):
        return (f"{path} is a torch.export program (.pt2), not a lightning_ood model file: load it with "
                "lightning_ood.export.load_program(path) (or torch.export.load(path).module())")
    names = _zip_names(path)
    if names is not None and not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        shown = ", ".join(repr(n[:60]) for n in names[:3]) + (" ..." if len(names) > 3 else "")
        return (f"{path} ({size} bytes) is not a model file: a zip archive, but not a PyTorch file (it holds "
                f"{shown or 'nothing'}). {_HOW_TO_MAKE}")
    with open(path, "rb") as file:
        starts_like_a_zip = file.read(4) == b"PK\x03\x04"
    pickled, references = (None, []) if names is not None or starts_like_a_zip else _pickle_kind(path)
    if pickled == "pickle":
        held = (f" of Python objects (it references {', '.join(references[:3])}"
                f"{' ...' if len(references) > 3 else ''})" if references else "")
        return (f"{path} is a plain Python pickle{held}; nothing in it was loaded or run. It is not a lightning_ood "
                f"model file, which is a PyTorch zip archive of tensors and plain values. {_HOW_TO_MAKE}")
    if names is not None or starts_like_a_zip:
        kind = "truncated or corrupted: a PyTorch zip archive that cannot be read"
    elif pickled == "legacy":
        kind = "truncated or corrupted: a PyTorch file of the legacy (before torch 1.6) format that cannot be read"
    else:
        kind = "not a model file: its bytes are neither a PyTorch zip archive nor a pickle (or it is cut short)"
    return f"{path} ({size} bytes) is {kind} ({_torch_detail(err)}). {again}"


def _torch_detail(err: BaseException) -> str:
    """torch's reason without its boilerplate: never its advice to load with
    ``weights_only=False``, which would run whatever code the file holds."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if "weights_only" not in line.lower() and "weightsunpickler" not in line.lower()
              and not line.lower().startswith(("check the documentation", "please file an issue"))]
    if not useful:
        return type(err).__name__
    reason = re.split(r"\s*(?:\(Could this error message be improved|This is an internal miniz error)", useful[0])[0]
    return f"{type(err).__name__}: {reason[:200]}" if reason else type(err).__name__


def _is_program(path: str) -> bool:
    """Whether ``path`` is a zip archive laid out as a ``torch.export`` program (``.pt2``)."""
    names = _zip_names(path)
    return names is not None and any(name.endswith("/models/model.json") for name in names)


def _zip_names(path: str) -> Optional[list[str]]:
    """The member names of a readable zip archive; ``None`` for anything else."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


#: ``torch.save``'s legacy (non-zip) files start with a pickle of this number.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
#: How much of a file :func:`_pickle_kind` parses.
_PICKLE_PROBE = 1 << 20


def _pickle_kind(path: str) -> tuple[Optional[str], list[str]]:
    """``("legacy", [])`` for a legacy ``torch.save`` file, ``("pickle", globals it references)``
    for any other pickle (any protocol), ``(None, [])`` otherwise. Parses the opcodes of the
    file's first MiB with :mod:`pickletools`, which neither imports nor runs anything."""
    import pickletools

    with open(path, "rb") as file:
        data = file.read(_PICKLE_PROBE)
    opcodes, strings, references = 0, [], []
    try:
        for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
            opcodes += 1
            if isinstance(arg, int) and not isinstance(arg, bool) and arg == _LEGACY_MAGIC:
                return "legacy", []
            if opcode.name == "GLOBAL" and isinstance(arg, str):
                references.append(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                references.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
            if opcode.name == "STOP":
                return "pickle", list(dict.fromkeys(references))
    except Exception:  # any parse failure: not a pickle (or the probe ended inside a large one)
        pass
    larger = len(data) == _PICKLE_PROBE and os.path.getsize(path) > _PICKLE_PROBE
    starts_with_proto = len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5
    return ("pickle", list(dict.fromkeys(references))) if larger and starts_with_proto and opcodes > 1 else (None, [])


def _sniff_pickled(path: str) -> str:
    """What a file of pickled objects seems to be, from the bytes of its pickle (never run)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            data = archive.read(name) if name else b""
    except (zipfile.BadZipFile, OSError, KeyError):
        data = b""
    if b"pytorch-lightning_version" in data:
        return ("a PyTorch Lightning training checkpoint; restore it with OODClassifier.load_from_checkpoint(path), "
                "then save it with its detectors")
    if b"torch.nn.modules" in data or b"lightning_ood" in data:
        return "a pickled torch.nn.Module; save its state_dict and config instead"
    return "objects other than tensors and plain values"


def _describe_foreign(obj: dict[str, Any]) -> str:
    if "pytorch-lightning_version" in obj or ("state_dict" in obj and "global_step" in obj):
        return (
            f"a PyTorch Lightning training checkpoint (Lightning {obj.get('pytorch-lightning_version', '?')}, "
            f"epoch {obj.get('epoch', '?')}, global step {obj.get('global_step', '?')}): it holds the weights "
            "but not the fitted detectors' configuration. Restore it with "
            "OODClassifier.load_from_checkpoint(path), then run trainer.test with OODEvaluation or call "
            "save_with_detectors after attaching and fitting detectors"
        )
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        first = next(iter(obj))
        return (
            f"a plain state_dict ({len(obj)} tensors, e.g. {first!r}): it has weights but no model "
            "configuration and no detector configuration"
        )
    if "format" in obj:
        return f"a file of format {obj['format']!r}"
    return f"a dict with keys {sorted(map(str, obj))[:8]}"


def _build(checkpoint: dict[str, Any], path: str) -> OODModel:
    model_cfg = checkpoint["model"]
    if not isinstance(model_cfg, dict) or model_cfg.get("class") != "OODClassifier":
        raise CheckpointError(f"{path}: unsupported model {model_cfg!r:.120}; this lightning_ood builds OODClassifier")
    hparams = dict(model_cfg.get("hparams") or {})
    hparams["pretrained"] = None  # the weights come from the file
    try:
        classifier = OODClassifier(**hparams)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: the recorded model config {hparams} cannot be built: {err}") from None

    state = checkpoint["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'state_dict' is not a mapping of names to tensors; the file is damaged")
    described = _config_summary(hparams)
    network = {k: v for k, v in classifier.state_dict().items() if k.split(".", 1)[0] in ("backbone", "head")}
    _check_fit(path, described, network, {k: v for k, v in state.items() if not k.startswith("detectors.")})
    for prefix in ("backbone", "head"):
        getattr(classifier, prefix).load_state_dict(
            {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}, strict=True)

    allowed = detector_classes()
    detectors: dict[str, Detector] = {}
    for cfg in checkpoint["detectors"]:
        if not isinstance(cfg, dict) or not {"name", "class", "init_args"} <= set(cfg):
            raise CheckpointError(f"{path}: damaged detector entry {cfg!r:.120}")
        name, cls_name = cfg["name"], cfg["class"]
        if cls_name not in allowed:
            raise CheckpointError(
                f"{path}: detector {name!r} has class {cls_name!r}, which this lightning_ood does not provide "
                f"(known: {', '.join(sorted(allowed))}); upgrade lightning_ood or re-save without it"
            )
        try:
            detector = allowed[cls_name](**cfg["init_args"])
            _fill_unallocated(detector, state, f"detectors.{name}.")
            detector.attach(classifier.head, classifier.backbone.num_blocks)  # re-draws what the file left out
        except (TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: detector {name!r} ({cls_name}) does not fit the model ({described}): {err}") from None
        _check_regenerated(path, checkpoint, name, detector, cfg.get("regenerated") or {}, state)
        detectors[name] = detector
    classifier.detectors.update(detectors)
    expected = {k: v for k, v in classifier.state_dict().items() if k.split(".", 1)[0] in ("backbone", "head", "detectors")}
    _check_fit(path, described, expected, state)
    classifier.load_state_dict(state, strict=True)
    return OODModel(classifier, checkpoint.get("thresholds") or {}, checkpoint.get("preprocessing"))


def _check_regenerated(path: str, checkpoint: dict[str, Any], name: str, detector: Detector,
                       digests: Mapping[str, str], state: dict[str, Tensor]) -> None:
    """Compare the buffers ``attach`` re-drew with the digests recorded at save time and
    put them into ``state`` (so the strict load that follows sees every buffer)."""
    if not isinstance(digests, Mapping) or not all(isinstance(v, str) for v in digests.values()):
        raise CheckpointError(f"{path}: detector {name!r}: damaged 'regenerated' entry {digests!r:.120}")
    for buffer, digest in digests.items():
        key = f"detectors.{name}.{buffer}"
        tensor = getattr(detector, buffer, None)
        if key in state or not isinstance(tensor, Tensor):
            raise CheckpointError(f"{path}: detector {name!r}: damaged 'regenerated' entry for {buffer!r}")
        if _sha256(tensor) == digest:
            state[key] = tensor
            continue
        written_with = checkpoint.get("torch_version", "?")
        if written_with == str(torch.__version__):
            raise CheckpointError(f"{path}: detector {name!r}: {buffer} re-drawn from the saved head and seed does "
                                  "not match its recorded digest, under the torch version that wrote the file: the "
                                  "file was edited or damaged")
        raise CheckpointError(
            f"{path}: detector {name!r}: {buffer} re-drawn from the saved head and seed differs from the one "
            f"the file was written with (torch {written_with}; this is torch {torch.__version__}, whose random "
            "generator may differ). Load the file with that torch version and re-save it with "
            "save_with_detectors(..., compact=False)."
        )


def _fill_unallocated(detector: Detector, state: dict[str, Tensor], prefix: str) -> None:
    """Give buffers that are still ``None`` (allocated lazily by ``attach``, e.g. WeiPer's
    perturbed projections) the file's tensors, so ``attach`` only checks their shapes
    instead of re-drawing them."""
    for name, buffer in list(detector._buffers.items()):
        if buffer is None and prefix + name in state:
            value = state[prefix + name].clone()
            # load builds a float32 model: its detectors keep float32 statistics whatever the
            # precision of the model the file came from
            detector._buffers[name] = value.float() if value.is_floating_point() else value


def _config_summary(hparams: Mapping[str, Any]) -> str:
    keys = ("backbone", "loss", "num_classes", "width", "cifar_stem")
    return ", ".join(f"{k}={hparams.get(k)!r}" for k in keys if k in hparams)


def _check_fit(path: str, described: str, expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches: " + "; ".join(shapes[:6]) + (" ..." if len(shapes) > 6 else ""))
    if missing:
        parts.append(f"{len(missing)} missing keys: {missing[:6]}" + (" ..." if len(missing) > 6 else ""))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {unexpected[:6]}" + (" ..." if len(unexpected) > 6 else ""))
    raise CheckpointError(
        f"{path}: the weights do not fit the recorded architecture ({described}): " + "; ".join(parts)
        + ". The file was edited, assembled from different models, or written by a lightning_ood whose "
        "architecture differs; re-create it with save_with_detectors."
    )


# --------------------------------------------------------------------------- export
class _NotExportable(Exception):
    """A detector that cannot be exported, with the reason."""


def _check_exportable(detector: Detector) -> None:
    """The checks ``Detector.forward`` makes eagerly, made before tracing (a buffer's
    value cannot be read inside the trace)."""
    if not bool(detector.fitted):
        raise _NotExportable(f"{type(detector).__name__} is not fitted")


class _ExportModule(nn.Module):
    """What the ``.pt2`` program computes: ``OODModel.forward`` for the selected detectors."""

    def __init__(self, classifier: OODClassifier, names: Sequence[str], needs_block_norms: bool,
                 thresholds: dict[str, float]) -> None:
        super().__init__()
        self.classifier = classifier
        self.names = list(names)
        self.needs_block_norms = needs_block_norms
        self.thresholds = {n: t for n, t in thresholds.items() if n in self.names}

    def forward(self, x: Tensor) -> dict[str, Any]:
        outputs = self.classifier.forward_outputs(x, with_block_norms=self.needs_block_norms)
        scores = {name: self.classifier.detectors[name](outputs) for name in self.names}
        result: dict[str, Any] = {"logits": outputs.logits, "scores": scores}
        if self.thresholds:
            result["is_ood"] = {name: scores[name] < t for name, t in self.thresholds.items()}
        return result


class _ScoreProbe(nn.Module):
    """One detector's score alone, to find out whether (and why not) it exports."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, logits: Tensor, features: Tensor, block_norms: Optional[Tensor] = None) -> Tensor:
        return self.detector(ForwardOutputs(logits, features, block_norms))


def _first_line(err: BaseException) -> str:
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text[:300]}"


def _as_model(module_or_path: Union[PathLike, OODModel, OODClassifier, "PostHocClassifier"]) -> OODModel:
    from lightning_ood.posthoc import PostHocClassifier

    if isinstance(module_or_path, OODModel):
        return module_or_path
    if isinstance(module_or_path, (OODClassifier, PostHocClassifier)):
        datamodule = _attached_datamodule(module_or_path)
        spec = preprocessing_from_datamodule(datamodule) if datamodule is not None else None
        return OODModel(module_or_path, preprocessing=spec)
    if isinstance(module_or_path, (str, os.PathLike)):
        return load(module_or_path)
    raise TypeError("export_program needs a model file path, an OODModel, an OODClassifier or a PostHocClassifier; "
                    f"got {type(module_or_path).__name__}")


def export_program(
    module_or_path: Union[PathLike, OODModel, OODClassifier, "PostHocClassifier"],
    out_path: PathLike,
    example_batch: int = 2,
    image_size: Optional[int] = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Export the model and its detectors with ``torch.export`` (dynamic batch size).

    The program takes a normalised float32 batch (B, 3, H, W) — any B >= 1, H and W fixed —
    and returns the same dict as :meth:`OODModel.forward`. Detectors that cannot be
    exported are left out (reported in the returned dict and printed); the others are
    exported. Load it with ``torch.export.load(path).module()`` or :func:`load_program`,
    which also returns the preprocessing and thresholds stored in the file.

    Args:
        module_or_path: a model file, an :class:`OODModel`, an ``OODClassifier`` or a
            ``PostHocClassifier`` (a user's network with its fitted detectors).
        out_path: the ``.pt2`` file to write (atomically).
        example_batch: batch size of the example input used for tracing (>= 2, so the
            batch dimension stays symbolic).
        image_size: input height/width; default: the stored preprocessing's crop size.
        verbose: print which detectors were exported and which were not (and why).

    Returns:
        ``{"path", "exported": [names], "not_exported": {name: reason}, "input_shape",
        "max_abs_diff": {"logits"/name: float}}`` — the last compares the program with the
        eager model on the example input.
    """
    if int(example_batch) < 2:
        raise ValueError(f"example_batch must be >= 2 (a batch of 1 would be specialised); got {example_batch}")
    model = _as_model(module_or_path)
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval().requires_grad_(False)  # an inference program: no autograd bookkeeping
    try:
        size = image_size or (model.preprocessing or {}).get("crop_size")
        if size is None:
            raise ValueError("the input size is unknown (no preprocessing stored): pass image_size=")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(int(example_batch), 3, height, width, generator=generator).to(device)

        candidates: list[str] = []
        not_exported: dict[str, str] = {}
        for name, detector in model.detectors.items():
            try:
                _check_exportable(detector)
                candidates.append(name)
            except _NotExportable as err:
                not_exported[name] = str(err)
        program, scores = _export_with_fallback(model, candidates, example, not_exported)

        with torch.no_grad():
            reference = model.forward_outputs(example)
            got = program.module()(example)
            diffs = {"logits": float((got["logits"] - reference.logits).abs().max())}
            scale = {"logits": float(reference.logits.abs().max())}
            for name in scores:
                expected = model.detectors[name](reference)
                diffs[name] = float((got["scores"][name] - expected).abs().max())
                scale[name] = float(expected.abs().max())
        drifted = [n for n, d in diffs.items() if not d <= 1e-4 * max(1.0, scale[n])]
        if drifted:  # the traced score disagrees with the eager one: a bug, say it loudly
            warnings.warn(f"the exported program differs from the eager model for {drifted} "
                          f"(max abs differences {[diffs[n] for n in drifted]}); please report this")
        metadata = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "lightning_ood_version": __version__,
            "input": "normalised float32 (B, 3, H, W)", "input_shape": [None, 3, height, width],
            "num_classes": model.num_classes, "detectors": list(scores), "not_exported": not_exported,
            "thresholds": {n: t for n, t in model.thresholds.items() if n in scores},
            "preprocessing": model.preprocessing,
        }
        out_path = os.fspath(out_path)
        atomic_write(out_path, lambda f: torch.export.save(
            program, f, extra_files={PROGRAM_METADATA: json.dumps(metadata)}))
    finally:
        for module, training in modes:  # restore every submodule's own mode
            module.training = training
        for parameter, requires_grad in grads:
            parameter.requires_grad_(requires_grad)
    result = {"path": out_path, "exported": list(scores), "not_exported": not_exported,
              "input_shape": [None, 3, height, width], "max_abs_diff": diffs}
    if verbose:
        print(f"lightning_ood.export: wrote {out_path} (batch dimension dynamic, input (B, 3, {height}, {width}))")
        print(f"  exported detectors: {', '.join(scores) or 'none'}")
        for name, reason in not_exported.items():
            print(f"  NOT exported: {name}: {reason}")
    return result


def _export_with_fallback(model: OODModel, names: list[str], example: Tensor,
                          not_exported: dict[str, str]) -> tuple[Any, list[str]]:
    """Export the network with every detector's score. Detectors of other classes than
    :mod:`lightning_ood.detectors`' are probed alone first (dropped, with the reason, when
    they do not trace); if the whole export still fails, every detector is probed and the
    rest exported."""
    from torch.export import Dim, export

    with torch.no_grad():
        outputs = model.classifier.forward_outputs(example, with_block_norms=True)

    def exports_alone(name: str) -> bool:
        batch = Dim("batch", min=1)
        try:
            with _quiet_failures():
                export(_ScoreProbe(model.detectors[name]),
                       (outputs.logits, outputs.features, outputs.block_norms),
                       dynamic_shapes=({0: batch}, {0: batch}, None if outputs.block_norms is None else {0: batch}),
                       strict=False)
            return True
        except Exception as err:
            not_exported[name] = f"does not trace with torch.export ({_first_line(err)})"
            return False

    def run(selected: list[str]) -> Any:
        needs = any(model.detectors[n].requires_block_norms for n in selected)
        module = _ExportModule(model.classifier, selected, needs, model.thresholds)
        with _quiet_failures():
            return export(module, (example,), dynamic_shapes=({0: Dim("batch", min=1)},), strict=False)

    builtin = set(detector_classes().values())
    selected = [n for n in names if type(model.detectors[n]) in builtin or exports_alone(n)]
    try:
        return run(selected), selected
    except Exception as first_error:
        if not selected:
            raise RuntimeError(f"the network itself does not export: {_first_line(first_error)}") from first_error
    selected = [n for n in selected if exports_alone(n)]
    try:
        return run(selected), selected
    except Exception as err:
        if not_exported:
            raise RuntimeError(f"export failed even without the detectors {sorted(not_exported)}: {_first_line(err)}") from err
        raise RuntimeError(f"the network itself does not export (every detector does on its own): {_first_line(err)}") from err


@contextlib.contextmanager
def _quiet_failures() -> Iterator[None]:
    """Hold back what is printed to stderr (torch.export prints the partial graph of a
    failed trace); replay it only when the block succeeds: failures are reported briefly."""
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        yield
    sys.stderr.write(captured.getvalue())


def load_program(path: PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Load a ``.pt2`` written by :func:`export_program`: ``(module, metadata)``, where
    ``module(x)`` gives ``{"logits", "scores", "is_ood"}`` and ``metadata`` holds the
    preprocessing, thresholds and the detectors that were (not) exported."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"exported program not found: {path}")
    extra = {PROGRAM_METADATA: ""}
    program = torch.export.load(path, extra_files=extra)
    return program.module(), json.loads(extra[PROGRAM_METADATA] or "{}")


# --------------------------------------------------------------------------- callback hook
def save_after_evaluation(trainer: Any, pl_module: Union[OODClassifier, "PostHocClassifier"], output_dir: str,
                          thresholds: Optional[Mapping[str, float]]) -> Optional[str]:
    """Write ``<output_dir>/model_with_detectors.ckpt`` — or, for a ``PostHocClassifier``,
    the ``torch.export`` program ``model_with_detectors.pt2`` — (rank 0 only; called by
    ``OODEvaluation``) and log it as a W&B artifact when a ``WandbLogger`` is attached.
    A model that cannot be saved (e.g. a custom detector class, a network that does not
    export) gives a warning, not an error."""
    from pytorch_lightning.loggers import WandbLogger
    from pytorch_lightning.utilities import rank_zero_warn

    from lightning_ood.posthoc import PostHocClassifier

    datamodule = getattr(trainer, "datamodule", None)
    preprocessing = preprocessing_from_datamodule(datamodule) if datamodule is not None else None
    detectors = list(pl_module.detectors)
    if isinstance(pl_module, PostHocClassifier):
        path = os.path.join(output_dir, PROGRAM_NAME)
        try:
            detectors = export_program(OODModel(pl_module, thresholds, preprocessing), path)["exported"]
        except Exception as err:  # the user's network may not trace: the report stands without it
            rank_zero_warn(f"OODEvaluation: {PROGRAM_NAME} not written: {_first_line(err)}")
            return None
    else:
        path = os.path.join(output_dir, CHECKPOINT_NAME)
        try:
            save_with_detectors(pl_module, path, preprocessing, thresholds)
        except CheckpointError as err:
            rank_zero_warn(f"OODEvaluation: {CHECKPOINT_NAME} not written: {err}")
            return None
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            log_artifact(logger.experiment, path, {
                "format": FORMAT, "format_version": FORMAT_VERSION, "detectors": detectors,
                "thresholds": {n: t for n, t in (thresholds or {}).items() if n in detectors},
            })
    return path


def log_artifact(run: Any, path: str, metadata: Optional[dict[str, Any]] = None) -> None:
    """Log a model file to a W&B run as a ``model`` artifact (alias ``latest``)."""
    import wandb

    run_id = str(getattr(run, "id", None) or "run")
    artifact = wandb.Artifact(
        name=f"model-with-detectors-{run_id}", type="model", metadata=metadata or {},
        description="lightning_ood model with its fitted OOD detectors: " + (
            "lightning_ood.export.load_program(path)" if path.endswith(".pt2") else "lightning_ood.load(path)"),
    )
    artifact.add_file(path, name=os.path.basename(path))
    run.log_artifact(artifact, aliases=["latest"])


# --------------------------------------------------------------------------- CLI
def _output_refusal(source: str, out: str, overwrite: bool) -> Optional[str]:
    """Why ``out`` must not be written (``None`` when it may): it is the input file itself,
    or an existing file that is not a torch.export program and ``--overwrite`` was not given."""
    same = os.path.abspath(os.path.realpath(source)) == os.path.abspath(os.path.realpath(out))
    if not same and os.path.exists(source) and os.path.exists(out):
        same = os.path.samefile(source, out)
    if same:
        return f"--out {out} is the input model file itself; choose another name (e.g. {os.path.splitext(out)[0]}.pt2)"
    if os.path.isdir(out):
        return f"--out {out} is a folder; name the .pt2 file to write (e.g. {os.path.join(out, 'model.pt2')})"
    if os.path.exists(out) and not overwrite and not _is_program(out):
        return f"{out} exists and is not a torch.export program; pass --overwrite to replace it"
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m lightning_ood.export CKPT --out model.pt2``."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_ood.export",
        description="Export a lightning_ood model file (model_with_detectors.ckpt) and its detectors "
                    "to a torch.export program (.pt2) with a dynamic batch dimension.",
    )
    parser.add_argument("checkpoint", help=f"model file written by OODEvaluation ({CHECKPOINT_NAME}) or save_with_detectors")
    parser.add_argument("--out", help="output .pt2 file (default: the checkpoint's name with .pt2)")
    parser.add_argument("--example-batch", type=int, default=2, help="batch size used for tracing (>= 2; default 2)")
    parser.add_argument("--image-size", type=int, default=None, help="input height/width if the file stores no preprocessing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file that is not a .pt2 program")
    args = parser.parse_args(argv)
    out = args.out or os.path.splitext(args.checkpoint)[0] + ".pt2"
    if args.example_batch < 2:
        parser.error("--example-batch must be >= 2")
    refusal = _output_refusal(args.checkpoint, out, args.overwrite)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 1
    try:
        model = load(args.checkpoint)
        export_program(model, out, example_batch=args.example_batch, image_size=args.image_size)
    except (FileNotFoundError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
