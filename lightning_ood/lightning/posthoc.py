"""Post-hoc evaluation of a classifier the user brings: any ``nn.Module`` plus the names of
its penultimate and head modules (e.g. a torchvision ResNet: ``avgpool`` and ``fc``)."""
from __future__ import annotations

import importlib
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_ood.detectors.base import ForwardOutputs
from lightning_ood.io import load_state_dict_file


def import_class(class_path: str) -> type:
    """``package.module.Class`` -> the class, with a clear error."""
    module_name, _, name = class_path.rpartition(".")
    if not module_name or not name:
        raise ValueError(f"cannot import {class_path!r}: give a full class path like torchvision.models.resnet18")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:  # the real cause: the module itself, or an import inside it
        raise ValueError(f"cannot import {class_path!r}: {type(err).__name__}: {err}. A module of your own must be "
                         "importable: run train.py/evaluate.py from its folder or add the folder to PYTHONPATH") from err
    if not hasattr(module, name):
        raise ValueError(f"cannot import {class_path!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) "
                         f"has no attribute {name!r}")
    return getattr(module, name)


class _NoBlocks(nn.Module):
    """Stands in for a backbone: a user module exposes no residual blocks."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.num_blocks = 0


class PostHocClassifier(pl.LightningModule):
    """Wraps a trained classifier for :class:`~lightning_ood.lightning.callback.OODEvaluation`.

    The pooled features are the (flattened) output of the ``penultimate`` module, read by a
    forward hook during the model's own forward pass; logits are the model's output, so one
    pass feeds every detector. The ``head`` module receives the features (ASH re-computes
    logits through it; WeiPer reads its weight). FeatureNorm needs residual blocks and is
    skipped.

    Args:
        class_path: the model class, e.g. ``torchvision.models.resnet18``.
        init_args: keyword arguments of the class (e.g. ``{"num_classes": 10}``).
        weights: path of a ``state_dict`` file (loaded with ``weights_only=True``).
        penultimate: name of the module whose output is the pooled feature (``avgpool``).
        head: name of the final classification module (``fc``).
        num_classes: expected number of classes (checked against the head's output).

    After ``trainer.test`` with ``OODEvaluation``, the network and its fitted detectors are
    written as a ``torch.export`` program, ``model_with_detectors.pt2`` (a weights-only
    checkpoint could not rebuild an arbitrary class); read it with
    :func:`lightning_ood.deploy.load_program`.
    """

    def __init__(
        self,
        class_path: str,
        weights: Optional[str] = None,
        penultimate: str = "avgpool",
        head: str = "fc",
        init_args: Optional[dict[str, Any]] = None,
        num_classes: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.network: nn.Module = import_class(class_path)(**(init_args or {}))
        if weights:
            try:
                missing, unexpected = self.network.load_state_dict(load_state_dict_file(weights), strict=False)
            except RuntimeError as err:  # shape mismatches raise even with strict=False
                raise ValueError(f"{weights} does not fit {class_path} with init_args {init_args or {}} "
                                 f"(e.g. a different num_classes): {err}") from err
            if missing or unexpected:
                raise ValueError(f"{weights} does not fit {class_path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        modules = dict(self.network.named_modules())
        for role, name in (("penultimate", penultimate), ("head", head)):
            if name not in modules or name == "":
                raise ValueError(f"{class_path} has no {role} module {name!r}; some of its modules: "
                                 f"{[n for n in modules if n][:12]}")
        self.head = modules[head]
        out_features = getattr(self.head, "out_features", None)
        if num_classes is not None and out_features is not None and out_features != num_classes:
            raise ValueError(f"the model's head {head!r} has {out_features} outputs but the data has {num_classes} classes")
        in_features = getattr(self.head, "in_features", 0)
        self.backbone = _NoBlocks(in_features)
        self.detectors = nn.ModuleDict()
        self._features: Optional[Tensor] = None
        modules[penultimate].register_forward_hook(self._keep_features)
        self.hparams["loss"] = "ce"
        classes = out_features or num_classes
        if not classes:
            raise ValueError(f"the class count is unknown: the head {head!r} has no out_features; pass num_classes")
        self.test_accuracy = MulticlassAccuracy(classes, average="micro")

    @property
    def num_classes(self) -> int:
        return self.test_accuracy.num_classes

    def _keep_features(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self._features = torch.flatten(output, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def forward_outputs(self, x: Tensor, with_block_norms: bool = False) -> ForwardOutputs:
        logits = self.network(x)
        return ForwardOutputs(logits=logits, features=self._features, block_norms=None).float()

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict:
        images, labels, indices = batch
        outputs = self.forward_outputs(images)
        if dataloader_idx == 0:
            self.test_accuracy(outputs.logits, labels)
            self.log("test/acc", self.test_accuracy, on_epoch=True, add_dataloader_idx=False)
        return {"outputs": outputs, "labels": labels, "indices": indices}
