"""The network as plain torch: backbone + head (+ fitted detectors), and the one forward
pass every detector reads.

:class:`Classifier` is what a model file rebuilds (no Lightning needed to serve a model);
:class:`~lightning_ood.lightning.module.OODClassifier` trains one.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_ood.detectors.base import ForwardOutputs
from lightning_ood.detectors.functional import feature_norm
from lightning_ood.nn.objectives import objective
from lightning_ood.nn.resnet import build_backbone
from lightning_ood.nn.taps import Taps
from lightning_ood.nn.timm_backbone import PREFIX as TIMM_PREFIX
from lightning_ood.nn.timm_backbone import TimmBackbone

#: Constructor arguments of :class:`Classifier` (what a model file records).
NETWORK_ARGUMENTS = ("backbone", "loss", "num_classes", "cifar_stem", "width", "l2_temperature", "channels_last")


class Classifier(nn.Module):
    """A ResNet backbone, the head of a training objective, and a ``detectors`` dict.

    Args:
        backbone: ``resnet18`` (CIFAR stem by default), ``resnet50`` (ImageNet stem) or
            ``timm:<name>`` (a timm model; optional dependency).
        loss: the training objective (:data:`lightning_ood.nn.objectives.OBJECTIVES`),
            which decides the head.
        num_classes: number of ID classes.
        cifar_stem: override the backbone's default stem.
        width: channels of the first stage (64 = the standard ResNet).
        l2_temperature: temperature of the ``l2_norm`` head.
        channels_last: run the backbone in channels-last memory format.
    """

    def __init__(self, backbone: str = "resnet18", loss: str = "ce", num_classes: int = 10,
                 cifar_stem: Optional[bool] = None, width: int = 64, l2_temperature: float = 1.0,
                 channels_last: bool = False) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.config: dict[str, Any] = dict(backbone=backbone, loss=loss, num_classes=num_classes,
                                           cifar_stem=cifar_stem, width=width, l2_temperature=l2_temperature,
                                           channels_last=channels_last)
        if backbone.startswith(TIMM_PREFIX):
            if cifar_stem is not None or width != 64:  # e.g. a recipe config written for the ResNets
                warnings.warn(f"cifar_stem={cifar_stem} and width={width} apply to the project's ResNets and are "
                              f"ignored for {backbone} (choose the timm model of the size you want)", stacklevel=2)
            self.backbone: nn.Module = TimmBackbone(backbone[len(TIMM_PREFIX):])
        else:
            self.backbone = build_backbone(backbone, cifar_stem, width)
        self.head = objective(loss).head(self.backbone.num_features, num_classes, l2_temperature)
        self.detectors = nn.ModuleDict()
        self.channels_last = channels_last
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self._compiled_backbone: Optional[Any] = None

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    def use_compiled_backbone(self, compiled: Any) -> None:
        """Run the plain forward pass through ``compiled`` (a ``torch.compile`` of the
        backbone), kept out of the module tree: its parameters are the backbone's own."""
        object.__setattr__(self, "_compiled_backbone", compiled)

    @property
    def num_blocks(self) -> int:
        return self.backbone.num_blocks

    @property
    def block_names(self) -> list[str]:
        """Names of the blocks whose FeatureNorms ``block_norms`` holds, in its column order
        (``layer1.0`` ... ``layer4.1`` for ResNet18)."""
        return [name for name, _ in self.backbone.named_blocks()]

    def block_taps(self) -> Taps:
        """Forward hooks computing FeatureNorm on every residual block's output (the
        mechanism used for any network, :mod:`lightning_ood.nn.taps`)."""
        return Taps(blocks=self.backbone.named_blocks(), reduce=feature_norm)

    def _features(self, x: Tensor, with_block_norms: bool) -> tuple[Tensor, Optional[Tensor]]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not with_block_norms:
            backbone = self._compiled_backbone if self._compiled_backbone is not None else self.backbone
            return backbone(x), None
        taps = self.block_taps()  # hooks on the eager backbone, for this pass only
        with taps.capture(blocks=True) as captured:
            features = self.backbone(x)
        return features, taps.block_norms(captured)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, C)."""
        return self.head(self._features(x, False)[0])

    def forward_outputs(self, x: Tensor, with_block_norms: bool = False) -> ForwardOutputs:
        """One forward pass giving logits, pooled features and (optionally) the
        FeatureNorm of every residual block — everything the detectors read — in float32
        even under mixed precision."""
        features, block_norms = self._features(x, with_block_norms)
        return ForwardOutputs(logits=self.head(features), features=features, block_norms=block_norms).float()

    def check_forward(self, images: Tensor, with_block_norms: bool = True) -> None:
        """A dry forward pass on (at most two of) ``images``: raises a ValueError naming the
        problem when the input does not run, or logits, features or (``with_block_norms``,
        for a network with blocks) block norms do not have the widths the detectors expect.
        Leaves train/eval modes and weights untouched."""
        expected = {"logits": self.num_classes, "features": self.backbone.num_features}
        with_block_norms = with_block_norms and self.num_blocks > 0
        if with_block_norms:
            expected["block_norms"] = self.num_blocks
        outputs = dry_forward(self, images, with_block_norms)
        for what, width in expected.items():
            value = getattr(outputs, what)
            if value.dim() != 2 or value.shape[1] != width:
                raise ValueError(f"Classifier: {what} have shape {tuple(value.shape)}, expected (B, {width})")


def dry_forward(model: nn.Module, images: Tensor, with_block_norms: bool = True) -> ForwardOutputs:
    """``model.forward_outputs(images[:2], with_block_norms)`` in eval mode without
    gradients, on the model's device and dtype; modes are restored. A network that fails
    on the batch raises a ValueError saying so."""
    if not isinstance(images, Tensor) or images.dim() < 2 or images.shape[0] == 0:
        raise ValueError(f"check_forward takes a non-empty batch of images (B, C, H, W); got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    batch = images[:2]
    if first is not None:
        batch = batch.to(device=first.device, dtype=first.dtype if batch.is_floating_point() else batch.dtype)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            try:
                return model.forward_outputs(batch, with_block_norms=with_block_norms)
            except ValueError:
                raise  # already says what is wrong (a tap's own check)
            except Exception as err:
                raise ValueError(f"the network fails on a test batch of shape {tuple(batch.shape)} "
                                 f"({batch.dtype}): {type(err).__name__}: {err}") from err
    finally:
        for module, training in modes:
            module.training = training
