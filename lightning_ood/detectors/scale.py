"""SCALE: per-sample scaling of the pooled features (ASH's scale, without pruning)."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_ood.detectors.base import Detector, ForwardOutputs
from lightning_ood.detectors.functional import _keep_top, check_finite, check_percentile, energy, shaped_head_logits
from lightning_ood.detectors.registry import register

#: The authors' sweep (kai422/SCALE ``configs/postprocessors/scale.yml``).
PERCENTILE_GRID: tuple[float, ...] = (50.0, 55.0, 60.0, 65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0)
#: ImageNet-1K ResNet-50: 85 (the authors' config and their released run); CIFAR-10/100
#: ResNet-18: 65, the value their released OpenOOD v1.5 runs selected (OpenOOD's search: ID vs OOD
#: validation AUROC over 65..95).
PUBLISHED_PERCENTILE = {"*": {"percentile": 65.0}, "imagenet": {"percentile": 85.0}}


def scale_exponent(x: Tensor, percentile: float) -> Tensor:
    """SCALE's per-sample log scale ``r = s1 / s2`` (Xu et al., ICLR 2024).

    ``s1`` is the sum of all ``n`` values of a sample and ``s2`` the sum of its ``k``
    largest, ``k = n - round(n * percentile / 100)`` (the same ``k`` as ASH,
    :func:`~lightning_ood.detectors.functional._keep_top`). Guard (the reference divides
    unconditionally): ``r = 0`` (scale 1) when ``s2 <= 0``, and ``r`` is clamped to at most
    ``log(finfo(dtype).max) / 2`` (44.4 in float32). For non-negative features ``s2 > 0``
    implies ``1 <= r <= n / k``.

    Args:
        x: (B, D) or (B, C, H, W) features; not modified.
        percentile: on the 0-100 scale (85 sums the top 15 % into ``s2``).

    Returns:
        (B,) exponents ``r`` in the dtype of ``x``.
    """
    flat, values, _ = _keep_top(x, percentile)
    s1 = flat.sum(dim=1)
    s2 = values.sum(dim=1)
    positive = s2 > 0
    r = torch.where(positive, s1 / torch.where(positive, s2, torch.ones_like(s2)), 0.0)
    return r.clamp(max=math.log(torch.finfo(x.dtype).max) / 2)


def scale_features(x: Tensor, percentile: float) -> Tensor:
    """SCALE shaping: every value of a sample multiplied by ``exp(r)``, nothing pruned
    (:func:`scale_exponent`); a new tensor shaped like ``x``."""
    r = scale_exponent(x, percentile)
    return x * torch.exp(r).reshape(-1, *([1] * (x.dim() - 1)))


@register("scale", defaults=PUBLISHED_PERCENTILE)
class SCALE(Detector):
    """SCALE: ASH-S's scale factor applied to the whole (unpruned) feature, energy score.

    Xu, Chen, Franchi, Yao, "Scaling for Training Time and Post-hoc Out-of-distribution
    Detection Enhancement", ICLR 2024. Per sample, ``r = sum(f) / sum(top-k of f)`` with
    ``k = n - round(n * p / 100)``, the feature is scaled to ``exp(r) * f``
    (:func:`scale_features`) and the score is ``logsumexp(head(exp(r) f))``.

    Predictions: ``head(exp(r) f) = exp(r) W f + b`` for a linear head, so the arg-max
    equals the model's whenever ``b = 0`` but can differ with a bias (and through a
    non-linear head); the detector therefore reports the scaled logits'
    (``changes_logits``) accuracy, which the paper calls unchanged.

    Deviations from the authors' code (kai422/SCALE ``openood/networks/scale_net.py``):

    * guard for ``s2 <= 0`` and a clamp of ``r`` (see :func:`scale_exponent`); identical
      on post-ReLU features of ordinary size.

    Args:
        percentile: on the 0-100 scale (ImageNet 85, CIFAR 65; see
            :data:`PUBLISHED_PERCENTILE`).
    """

    name = "scale"
    reads = ("features", "head")
    changes_logits = True
    assumes_nonnegative_features = True
    tuning_grid = {"percentile": PERCENTILE_GRID}
    reported_attributes = ("percentile",)

    def __init__(self, percentile: float = 85.0) -> None:
        super().__init__()
        self._check(percentile)
        self.register_buffer("scale_percentile", torch.tensor(float(percentile), dtype=torch.float64))
        self._percentile = float(percentile)
        self._head: tuple[nn.Module, ...] = ()

    @property
    def percentile(self) -> float:
        """The percentile (0-100 scale), stored in the ``scale_percentile`` buffer."""
        return self._percentile

    @percentile.setter
    def percentile(self, value: float) -> None:
        self._check(value)
        self.scale_percentile.fill_(float(value))
        self._percentile = float(value)

    @staticmethod
    def _check(percentile: float) -> None:
        check_percentile(percentile)
        if 0 < float(percentile) <= 1:
            raise ValueError(f"SCALE percentile {percentile} is on the 0-100 scale; did you mean "
                             f"{float(percentile) * 100:g}?")

    def sync_from_buffers(self) -> None:
        self._check(float(self.scale_percentile))
        self._percentile = float(self.scale_percentile)

    def set_hyperparameters(self, **values: Any) -> bool:
        self.check_grid({key: [value] for key, value in values.items()})
        if "percentile" in values:
            self.percentile = values["percentile"]
        return False

    def skip_reason(self, head: nn.Module, num_blocks: int = 0) -> Optional[str]:
        width = getattr(head, "in_features", None)
        if width is not None and width - round(width * self.percentile / 100.0) < 1:
            return f"percentile {self.percentile} leaves none of the {width} features in the top-k sum; use a smaller percentile"
        return None

    def attach(self, head: nn.Module, num_blocks: int = 0) -> None:
        self._head = (head,)

    def shaped_logits(self, outputs: ForwardOutputs) -> Tensor:
        if not self._head:
            raise RuntimeError("scale has no classification head: call attach(head) first")
        features = outputs.features
        width = getattr(self._head[0], "in_features", None)
        if features.dim() != 2 or (width is not None and features.shape[1] != width):
            raise ValueError(f"SCALE expects features of shape (B, {width if width is not None else 'D'}); "
                             f"got {tuple(features.shape)}")
        check_finite(features, "SCALE input features")
        percentile = self.percentile
        return shaped_head_logits(self._head[0], features, lambda rows: scale_features(rows, percentile))

    def score(self, outputs: ForwardOutputs) -> Tensor:
        return energy(self.shaped_logits(outputs))

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}"
