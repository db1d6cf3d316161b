"""The network as plain torch: backbone + head (+ fitted detectors), and the one forward
pass every detector reads.

:class:`Classifier` is what a model file rebuilds (no Lightning needed to serve a model);
:class:`~lightning_ood.lightning.module.OODClassifier` trains one.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_ood.detectors.base import ForwardOutputs
from lightning_ood.detectors.functional import feature_norm
from lightning_ood.nn.objectives import objective
from lightning_ood.nn.resnet import build_backbone

#: Constructor arguments of :class:`Classifier` (what a model file records).
NETWORK_ARGUMENTS = ("backbone", "loss", "num_classes", "cifar_stem", "width", "l2_temperature", "channels_last")


class Classifier(nn.Module):
    """A ResNet backbone, the head of a training objective, and a ``detectors`` dict.

    Args:
        backbone: ``resnet18`` (CIFAR stem by default) or ``resnet50`` (ImageNet stem).
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

    def _features(self, x: Tensor, with_block_norms: bool) -> tuple[Tensor, Optional[list[Tensor]]]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not with_block_norms and self._compiled_backbone is not None:
            return self._compiled_backbone(x)
        return self.backbone(x, block_fn=feature_norm if with_block_norms else None)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, C)."""
        return self.head(self._features(x, False)[0])

    def forward_outputs(self, x: Tensor, with_block_norms: bool = False) -> ForwardOutputs:
        """One forward pass giving logits, pooled features and (optionally) the
        FeatureNorm of every residual block — everything the detectors read — in float32
        even under mixed precision."""
        features, block_norms = self._features(x, with_block_norms)
        return ForwardOutputs(
            logits=self.head(features),
            features=features,
            block_norms=torch.stack(block_norms, dim=1) if block_norms is not None else None,
        ).float()
