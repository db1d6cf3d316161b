"""OODModel: a trained network with its fitted detectors, ready for inference, and the
stored preprocessing that turns raw images into its input."""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lightning_ood.detectors import ForwardOutputs, reads_block_norms
from lightning_ood.detectors.functional import finite_inputs_checked
from lightning_ood.deploy.format import CheckpointError, check_preprocessing, check_thresholds


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
        classifier: a :class:`~lightning_ood.nn.classifier.Classifier` (backbone, head and
            ``detectors``; or a :class:`~lightning_ood.lightning.posthoc.PostHocClassifier`, which
            can be exported but not saved); its ``forward_outputs`` is the one forward pass
            used here.
        thresholds: detector name -> score threshold.
        preprocessing: ``image_size``, ``resize_size``, ``crop_size``, ``interpolation``,
            ``mean``, ``std`` of the ID test transform, or ``None``.
    """

    def __init__(
        self,
        classifier: nn.Module,
        thresholds: Optional[Mapping[str, float]] = None,
        preprocessing: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.classifier = classifier
        self.thresholds = check_thresholds(thresholds, list(classifier.detectors))
        self.preprocessing = check_preprocessing(preprocessing)
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
        return reads_block_norms(self.detectors.values())

    def forward_outputs(self, x: Tensor) -> ForwardOutputs:
        """Logits, pooled features and (when needed) block norms of one forward pass."""
        return self.classifier.forward_outputs(x, with_block_norms=self.needs_block_norms)

    def forward(self, x: Tensor) -> dict[str, Any]:
        self._check_input(x)
        outputs = self.forward_outputs(x).check_finite()  # once, not once per detector
        with finite_inputs_checked():
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
