"""Writing a model file (atomically): the network, its fitted detectors, preprocessing and
thresholds (see :mod:`lightning_ood.deploy.format`)."""
from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lightning_ood.version import __version__
from lightning_ood.io import atomic_write
from lightning_ood.detectors import detector_classes
from lightning_ood.deploy.format import CheckpointError, FORMAT, FORMAT_VERSION, PathLike, check_preprocessing, check_thresholds, plain_value, sha256_of
from lightning_ood.deploy.model import OODModel, preprocessing_from_datamodule
from lightning_ood.nn.classifier import Classifier


def save_with_detectors(
    pl_module: Union[Classifier, OODModel],
    path: PathLike,
    preprocessing: Optional[Mapping[str, Any]] = None,
    thresholds: Optional[Mapping[str, float]] = None,
    compact: bool = True,
) -> str:
    """Write a model with its fitted detectors to ``path`` (atomically).

    Args:
        pl_module: a :class:`~lightning_ood.nn.classifier.Classifier` (e.g. an ``OODClassifier``) whose ``detectors`` are
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
        CheckpointError: the module is not a ``Classifier`` (e.g. an ``OODClassifier``) or an
            ``OODModel``, a detector's class is not
            one of :mod:`lightning_ood.detectors` (see :func:`detector_classes`), or a
            configuration value is not a plain Python value.
    """
    if isinstance(pl_module, OODModel):
        preprocessing = pl_module.preprocessing if preprocessing is None else preprocessing
        thresholds = pl_module.thresholds if thresholds is None else thresholds
        classifier = pl_module.classifier
    else:
        classifier = pl_module
    if not isinstance(classifier, Classifier):
        raise CheckpointError(
            f"save_with_detectors needs an OODClassifier (or an OODModel); got {type(classifier).__name__}"
        )
    if preprocessing is None:
        datamodule = attached_datamodule(classifier)
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
        "preprocessing": check_preprocessing(preprocessing),
        "thresholds": check_thresholds(thresholds, list(classifier.detectors)),
    }
    path = os.fspath(path)
    atomic_write(path, lambda f: torch.save(checkpoint, f))
    return path


def attached_datamodule(module: Classifier) -> Any:
    trainer = getattr(module, "_trainer", None)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    return datamodule if hasattr(datamodule, "image_size") and hasattr(datamodule, "mean") else None


def _model_config(classifier: Classifier) -> dict[str, Any]:
    return plain_value(dict(classifier.config), "model hyper-parameter")


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
        init_args[param.name] = plain_value(value, f"detector {name!r} argument {param.name!r}")
    return {"name": name, "class": cls.__name__, "init_args": init_args}


def _deployable_state(classifier: Classifier) -> dict[str, Tensor]:
    """backbone.*, head.* and detectors.* (every persistent entry of an OODClassifier)."""
    state = classifier.state_dict()
    return {k: v.detach().to("cpu") for k, v in state.items() if k.split(".", 1)[0] in ("backbone", "head", "detectors")}


def _leave_out_regenerable(classifier: Classifier, name: str, state: dict[str, Tensor]) -> dict[str, str]:
    """Drop the buffers a detector's ``attach`` re-draws (WeiPer's ``W~, b~``) from
    ``state`` when re-drawing them from the classifier's head gives the same bits; return
    their SHA-256 digests (empty when they are kept)."""
    drawn = classifier.detectors[name].regenerable_buffers(classifier.head)
    if not drawn:
        return {}
    digests = {buffer: sha256_of(tensor) for buffer, tensor in drawn.items()}
    for buffer, digest in digests.items():
        stored = state[f"detectors.{name}.{buffer}"]  # already on the CPU
        # bit for bit, dtype included (torch.equal would let a float64 copy pass)
        if stored.dtype != torch.float32 or sha256_of(stored) != digest:
            return {}  # drawn from another weight, changed since or cast: keep the tensors themselves
    for buffer in digests:
        del state[f"detectors.{name}.{buffer}"]
    return digests
