"""Post-hoc baseline scores read directly off one forward pass (no fitting).

Every table carries MSP, MaxLogit and Energy, plus the native score of the trained head:
the minimum distance score for IsoMax+ and the penultimate feature norm for train-time
L2-normalised models. All raise ``ValueError`` on non-finite inputs
(:func:`~lightning_ood.detectors.functional.check_finite`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from lightning_ood.detectors.base import Detector, ForwardOutputs
from lightning_ood.detectors.functional import check_finite, energy, max_logit, msp
from lightning_ood.detectors.registry import register


@register("msp", default=True)
class MSP(Detector):
    """Maximum softmax probability.

    Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
    Examples in Neural Networks", ICLR 2017.
    """

    name = "msp"

    def score(self, outputs: ForwardOutputs) -> Tensor:
        check_finite(outputs.logits, "logits")
        return msp(outputs.logits)


@register("max_logit", aliases=("maxlogit",), default=True)
class MaxLogit(Detector):
    """Largest logit.

    Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings",
    ICML 2022.
    """

    name = "max_logit"

    def score(self, outputs: ForwardOutputs) -> Tensor:
        check_finite(outputs.logits, "logits")
        return max_logit(outputs.logits)


@register("energy", default=True)
class Energy(Detector):
    """Negative free energy, ``logsumexp`` of the logits.

    Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020.
    """

    name = "energy"

    def score(self, outputs: ForwardOutputs) -> Tensor:
        check_finite(outputs.logits, "logits")
        return energy(outputs.logits)


@register("min_distance", aliases=("mds",))
class MinDistance(Detector):
    """Minimum distance score of IsoMax+: ``max_j logits_j = -min_j distance_j``.

    Macêdo & Ludermir, "Enhanced Isotropy Maximization Loss: Seamless and High-Performance
    Out-of-Distribution Detection Simply Replacing the SoftMax Loss", arXiv:2105.14399
    (2021). Only meaningful for an :class:`~lightning_ood.nn.heads.IsoMaxPlusHead`, whose
    logits are negative distances; the entropic scale is a training-only factor and is
    not applied.
    """

    name = "min_distance"

    def skip_reason(self, head: nn.Module, num_blocks: int = 0) -> Optional[str]:
        if getattr(head, "logits_are_negative_distances", False):
            return None
        return f"min_distance needs a distance head such as IsoMaxPlusHead, the model has a {type(head).__name__}"

    def score(self, outputs: ForwardOutputs) -> Tensor:
        check_finite(outputs.logits, "logits")
        return max_logit(outputs.logits)


@register("penultimate_norm")
class PenultimateNorm(Detector):
    """L2 norm of the pooled penultimate feature, ``||f||_2`` (NOT FeatureNorm).

    The native score of models trained with L2-normalised features: Haas, Yolland & Rabus,
    "Exploring Simple, High Quality Out-of-Distribution Detection with L2 Normalization",
    TMLR 2024. It reads ``ForwardOutputs.features`` (the head's input); it is unrelated to
    the block-wise FeatureNorm of Yu et al.
    (:class:`~lightning_ood.detectors.featurenorm.FeatureNorm`).
    """

    name = "penultimate_norm"
    reads = ("features",)

    def score(self, outputs: ForwardOutputs) -> Tensor:
        check_finite(outputs.features, "penultimate features")
        return torch.linalg.vector_norm(outputs.features.flatten(1), dim=1)
