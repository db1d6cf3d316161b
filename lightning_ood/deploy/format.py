"""The model file format: what a ``model_with_detectors.ckpt`` holds, and the checks that
keep it loadable with ``torch.load(weights_only=True)``.

File layout (``format_version`` 2)::

    {"format": "lightning_ood", "format_version": 2, "lightning_ood_version": str,
     "torch_version": str,
     "model": {"class": "OODClassifier", "hparams": {backbone, loss, num_classes, ...}},
     "detectors": [{"name": str, "class": str, "init_args": {...},
                    "regenerated": {buffer name: sha256 hex}}, ...],   # may be empty
     "state_dict": {name: Tensor},        # backbone.*, head.*, detectors.<name>.*
     "preprocessing": {image_size, resize_size, crop_size, interpolation, mean, std} | None,
     "thresholds": {detector name: float}}   # score < threshold -> OOD

Only plain values (numbers, strings, lists, dicts) and tensors, so loading never unpickles
code. Version 2 leaves out buffers a detector re-draws bit for bit from the saved head and
its seed (WeiPer's perturbed head ``W~, b~``: 819 MB for an ImageNet ResNet50), recording
their SHA-256 instead; version 1 files, which store them, still load.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from torch import Tensor

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


class CheckpointError(ValueError):
    """A model file that cannot be written or read; the message names the problem and the fix."""


def plain_value(value: Any, where: str) -> Any:
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
        return [plain_value(v, where) for v in value]
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise CheckpointError(f"{where}: dict keys must be strings; got {list(value)[:5]}")
        return {str(k): plain_value(v, f"{where} {k!r}") for k, v in value.items()}
    raise CheckpointError(
        f"{where} is a {type(value).__name__} ({value!r:.80}); model files hold only plain values "
        "(numbers, strings, lists, dicts) so that they load with torch.load(weights_only=True)"
    )


def check_thresholds(thresholds: Optional[Mapping[str, float]], names: Sequence[str]) -> dict[str, float]:
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


def check_preprocessing(spec: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    if spec is None:
        return None
    spec = plain_value(dict(spec), "preprocessing")
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


def sha256_of(tensor: Tensor) -> str:
    array = tensor.detach().to("cpu").contiguous().numpy()
    return hashlib.sha256(memoryview(array).cast("B")).hexdigest()


def first_line(err: BaseException) -> str:
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text[:300]}"
