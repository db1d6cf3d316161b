"""The networks, as plain torch: backbones (:mod:`~lightning_ood.nn.resnet`), heads
(:mod:`~lightning_ood.nn.heads`), training objectives (:mod:`~lightning_ood.nn.objectives`:
head, loss, native score) and :class:`~lightning_ood.nn.classifier.Classifier`, the network
with its detectors and its one forward pass."""
from lightning_ood.nn.classifier import Classifier
from lightning_ood.nn.objectives import OBJECTIVES, objective
from lightning_ood.nn.resnet import BACKBONES, ResNetBackbone, build_backbone

__all__ = ["BACKBONES", "Classifier", "OBJECTIVES", "ResNetBackbone", "build_backbone", "objective"]
