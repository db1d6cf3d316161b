"""Post-hoc evaluation of a classifier the user brings: any ``nn.Module`` plus the name of
its head module (``fc`` of a torchvision ResNet, ``linear`` of akamaster's CIFAR ResNets);
features and block norms are read by hooks (:mod:`lightning_ood.nn.taps`)."""
from __future__ import annotations

import importlib
from typing import Any, Optional, Union

import pytorch_lightning as pl
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_ood.detectors.base import ForwardOutputs, reads_block_norms
from lightning_ood.io import load_state_dict_file
from lightning_ood.nn.taps import Taps


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


class _Backbone(nn.Module):
    """Stands in for a backbone: the widths the evaluation reads (``num_features``,
    ``num_blocks``) of a user's network, which is not split into backbone and head."""

    def __init__(self, num_features: int, num_blocks: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.num_blocks = num_blocks


class PostHocClassifier(pl.LightningModule):
    """Wraps a trained classifier for :class:`~lightning_ood.lightning.callback.OODEvaluation`.

    Hooks (:class:`lightning_ood.nn.taps.Taps`) read, during the model's own forward pass:

    - the pooled **features**: the flattened **input of the head module**, so ``head``
      alone is enough, also for networks that pool functionally (``F.avg_pool2d`` in
      ``forward``); ``penultimate`` names a module whose flattened output is read instead;
    - the **block norms** (FeatureNorm of each chosen block's output, for FeatureNorm /
      NormRatio) when a detector reads them; ``blocks`` chooses the blocks
      (:func:`lightning_ood.nn.taps.resolve_blocks`; ``auto`` finds the residual blocks of
      torchvision, timm and the usual CIFAR ResNets).

    Logits are the model's output, so one pass feeds every detector. The ``head`` module
    also serves detectors that re-compute logits from features (ASH) or read its weight
    (WeiPer). Call :meth:`check_forward` with one batch to find a wrong ``head``,
    ``penultimate``, ``blocks`` or class count before any compute.

    Args:
        class_path: the model class or factory, e.g. ``torchvision.models.resnet18`` or
            ``mymodels.resnet56`` (a module in the working directory).
        init_args: keyword arguments of the class (e.g. ``{"num_classes": 10}``).
        weights: path of a ``state_dict`` file (loaded with ``weights_only=True``).
        head: name of the final classification module (``fc``; ``linear`` for akamaster's
            CIFAR ResNets). When the network has no ``fc`` but a timm-style
            ``get_classifier()`` (``class_path: timm.create_model``), the default is that
            module (``head.fc`` of a ConvNeXt, ``classifier`` of an EfficientNet).
        penultimate: optional override: the module whose flattened output is the feature
            (default ``None``: the head's input).
        blocks: the blocks FeatureNorm reads: ``auto`` (default), module names, glob
            patterns (``layer*.*``), a class name (``BasicBlock``), a list of those, or
            ``none``.
        num_classes: expected number of classes (checked against the head's output).

    Attributes:
        block_names: the chosen blocks, in the column order of ``block_norms``.
        num_blocks: their number (0: FeatureNorm is skipped, with the reason).

    After ``trainer.test`` with ``OODEvaluation``, the network and its fitted detectors are
    written as a ``torch.export`` program, ``model_with_detectors.pt2`` (a weights-only
    checkpoint could not rebuild an arbitrary class); read it with
    :func:`lightning_ood.deploy.load_program`.
    """

    def __init__(
        self,
        class_path: str,
        weights: Optional[str] = None,
        penultimate: Optional[str] = None,
        head: str = "fc",
        init_args: Optional[dict[str, Any]] = None,
        num_classes: Optional[int] = None,
        blocks: Union[str, list[str], None] = "auto",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.network: nn.Module = import_class(class_path)(**(init_args or {}))
        if not isinstance(self.network, nn.Module):
            raise ValueError(f"{class_path} with init_args {init_args or {}} gave a {type(self.network).__name__}, "
                             "not a torch.nn.Module")
        if weights:
            try:
                missing, unexpected = self.network.load_state_dict(
                    _without_wrapper_prefix(load_state_dict_file(weights), self.network), strict=False)
            except RuntimeError as err:  # shape mismatches raise even with strict=False
                raise ValueError(f"{weights} does not fit {class_path} with init_args {init_args or {}} "
                                 f"(e.g. a different num_classes): {err}") from err
            if missing or unexpected:
                raise ValueError(f"{weights} does not fit {class_path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        modules = dict(self.network.named_modules())
        head = _default_head(self.network, head, modules)
        self.head_name = head
        for role, name in (("penultimate", penultimate), ("head", head)):
            if name is not None and (name not in modules or name == ""):
                raise ValueError(f"{class_path} has no {role} module {name!r}; some of its modules: "
                                 f"{[n for n in modules if n][:12]}")
        self.head = modules[head]
        self.taps = Taps.on(self.network, head=head, penultimate=penultimate, blocks=blocks)
        out_features = getattr(self.head, "out_features", None)
        if num_classes is not None and out_features is not None and out_features != num_classes:
            raise ValueError(f"the model's head {head!r} has {out_features} outputs but the data has {num_classes} classes")
        self.backbone = _Backbone(_head_in_features(self.head), self.taps.num_blocks)
        self.detectors = nn.ModuleDict()
        self.hparams["loss"] = "ce"
        classes = out_features or num_classes
        if not classes:
            raise ValueError(f"the class count is unknown: the head {head!r} has no out_features; pass num_classes")
        self.test_accuracy = MulticlassAccuracy(classes, average="micro")

    @property
    def num_classes(self) -> int:
        return self.test_accuracy.num_classes

    @property
    def num_blocks(self) -> int:
        return self.taps.num_blocks

    @property
    def block_names(self) -> list[str]:
        return self.taps.block_names

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def forward_outputs(self, x: Tensor, with_block_norms: bool = False) -> ForwardOutputs:
        with self.taps.capture(blocks=with_block_norms) as captured:
            logits = self.network(x)
        block_norms = self.taps.block_norms(captured) if with_block_norms else None
        return ForwardOutputs(logits=logits, features=self.taps.features(captured), block_norms=block_norms).float()

    def check_forward(self, images: Tensor, with_block_norms: bool = True) -> None:
        """One dry forward pass on (at most two of) ``images``, before any compute.

        Raises a ValueError that names the problem and its fix when: the network fails on
        the batch; the head does not run; the features' width D differs from the head's
        ``in_features`` (e.g. ``penultimate: layer3``); the logits are not (B,
        ``num_classes``); a block's output is not a (B, C, H, W) feature map, or a block
        does not run exactly once. Block specs that match nothing already fail at
        construction. Sets ``backbone.num_features`` when the head does not declare its
        width. Train/eval modes and weights are left as they were.
        """
        from lightning_ood.nn.classifier import dry_forward

        hp = self.hparams
        outputs = dry_forward(self, images, with_block_norms and self.num_blocks > 0)
        logits, features = outputs.logits, outputs.features
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] != self.num_classes:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"{hp['class_path']} returns {shape}, but the evaluation needs logits (B, "
                             f"{self.num_classes}) (num_classes = {self.num_classes}): the network's forward must "
                             "return the class logits of its head (set init_args such as num_classes to the data's "
                             "class count)")
        width = _head_in_features(self.head)
        if hp["penultimate"] is not None and width and features.shape[1] != width:
            raise ValueError(f"penultimate: {hp['penultimate']!r} gives features of width D = {features.shape[1]} "
                             f"(its flattened output), but the head {self.head_name!r} expects in_features = {width}: "
                             f"leave penultimate unset to read the head's input (the default), or name the module "
                             f"whose output the head receives")
        if width and features.shape[1] != width:
            raise ValueError(f"the input of the head {self.head_name!r} has width D = {features.shape[1]}, but the head "
                             f"declares in_features = {width}")
        if not width:
            self.backbone.num_features = int(features.shape[1])


    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict:
        images, labels, indices = batch
        wanted = reads_block_norms(self.detectors.values())
        outputs = self.forward_outputs(images, with_block_norms=wanted)
        if dataloader_idx == 0:
            self.test_accuracy(outputs.logits, labels)
            self.log("test/acc", self.test_accuracy, on_epoch=True, add_dataloader_idx=False)
        return {"outputs": outputs, "labels": labels, "indices": indices}


def _head_in_features(head: nn.Module) -> int:
    """The input width of a head: ``in_features``, else the second dimension of a 2-D
    ``weight``; 0 when unknown."""
    width = getattr(head, "in_features", None)
    if isinstance(width, int):
        return width
    weight = getattr(head, "weight", None)
    return int(weight.shape[1]) if isinstance(weight, Tensor) and weight.dim() == 2 else 0


def _default_head(network: nn.Module, head: str, modules: dict[str, nn.Module]) -> str:
    """``head``, or for the default ``fc`` on a network without one, the module a timm
    model's ``get_classifier()`` returns."""
    if head != "fc" or "fc" in modules or not callable(getattr(network, "get_classifier", None)):
        return head
    try:
        classifier = network.get_classifier()
    except Exception:  # not timm's method after all
        return head
    return next((name for name, module in modules.items() if name and module is classifier), head)


def _without_wrapper_prefix(state: dict[str, Tensor], network: nn.Module) -> dict[str, Tensor]:
    """A state_dict saved from ``nn.DataParallel``/DDP (every key ``module.*``, e.g.
    akamaster's CIFAR ResNet checkpoints) without that prefix, when the network's own keys
    lack it."""
    prefix = "module."
    if state and all(k.startswith(prefix) for k in state) and not any(
            k.startswith(prefix) for k in network.state_dict()):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state
