"""Classification heads: the layer that turns pooled features into logits.

Every head maps (B, D) features to (B, C) logits, so detectors that re-compute logits
from shaped features (ASH) can call any head the same way.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LinearHead(nn.Linear):
    """Plain linear layer (softmax cross-entropy training)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(in_features, num_classes)


class L2NormalizedHead(nn.Linear):
    """Linear head whose input is L2-normalised **in training only**.

    Haas, Yolland & Rabus, "Exploring Simple, High Quality Out-of-Distribution Detection
    with L2 Normalization" (TMLR 2024). In training the logits are
    ``W (f / ||f||) / temperature + b``; in evaluation mode the normalisation (and the
    temperature) is removed, logits are ``W f + b`` and ``||f||`` is the OOD score. Reported
    accuracies in evaluation are therefore those of the un-normalised path.

    Args:
        in_features: feature width D.
        num_classes: number of classes C.
        temperature: tau dividing the normalised features in training (1.0 = the paper;
            OpenOOD's T2FNorm uses 0.1).
    """

    def __init__(self, in_features: int, num_classes: int, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__(in_features, num_classes)
        self.temperature = temperature

    def forward(self, features: Tensor) -> Tensor:
        if self.training:
            features = F.normalize(features, dim=1) / self.temperature
        return super().forward(features)


class IsoMaxPlusHead(nn.Module):
    """Isometric distance head of IsoMax+ (Macêdo & Ludermir, 2021, arXiv:2105.14399).

    ``logits_j = -|d| * || f/||f|| - p_j/||p_j|| ||_2`` with learnable prototypes ``p``
    (C x D, initialised N(0, 1)) and learnable ``distance_scale`` d (initialised 1.0, used
    through its absolute value). Exact Euclidean distances, not the matmul shortcut.
    """

    #: read by the minimum-distance score, which applies only to distance heads
    logits_are_negative_distances = True

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.prototypes = nn.Parameter(torch.empty(num_classes, in_features))
        self.distance_scale = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.prototypes, mean=0.0, std=1.0)
        nn.init.constant_(self.distance_scale, 1.0)

    def forward(self, features: Tensor) -> Tensor:
        # distances in float32 at least, under any (autocast) precision: cdist has no bfloat16
        # kernel on CPU, and half-precision distances between unit vectors blur the ranking
        dtype = torch.promote_types(features.dtype, torch.float32)
        device_type = features.device.type
        no_autocast = (torch.autocast(device_type=device_type, enabled=False)
                       if torch.amp.is_autocast_available(device_type) else contextlib.nullcontext())
        with no_autocast:
            distances = torch.cdist(
                F.normalize(features.to(dtype), dim=1),
                F.normalize(self.prototypes.to(dtype), dim=1),
                compute_mode="donot_use_mm_for_euclid_dist",
            )
        return -torch.abs(self.distance_scale.to(dtype)) * distances

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"
