"""GEN: generalised entropy of the top-M softmax probabilities."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_ood.detectors.base import Detector, ForwardOutputs
from lightning_ood.detectors.functional import check_finite
from lightning_ood.detectors.registry import register

#: The tuning sweep of OpenOOD's GEN config (``configs/postprocessors/gen.yml``).
GAMMA_GRID: tuple[float, ...] = (0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0)
M_GRID: tuple[int, ...] = (10, 50, 100, 200, 500, 1000)


def _check_gen_arguments(gamma: float, M: int) -> None:
    if not (isinstance(gamma, (int, float)) and math.isfinite(float(gamma)) and float(gamma) > 0):
        raise ValueError(f"GEN gamma must be a finite number > 0; got {gamma!r}")
    if isinstance(M, bool) or int(M) != M or int(M) < 1:
        raise ValueError(f"GEN M must be a positive integer; got {M!r}")


def generalized_entropy_score(logits: Tensor, gamma: float = 0.1, M: int = 100) -> Tensor:
    """GEN score ``-sum_{j in top-M} p_j^gamma (1 - p_j)^gamma`` (higher = ID).

    Liu et al., CVPR 2023. ``p = softmax(logits)``; the sum runs over the ``min(M, C)``
    largest probabilities. Computed in log space in the logits' dtype,
    ``exp(gamma * (log p + log(1 - p)))``: ``log(1 - p)`` is ``log1p(-p)`` for every class
    except the most probable one (the only one that can exceed 1/2), whose complement is the
    softmax mass of all other classes, a ``logsumexp`` of their ``log p``. So a very
    confident sample keeps its small ``(1 - p)^gamma`` term instead of rounding ``1 - p`` to
    0 (float32 does that for any ``p > 1 - 6e-8``), and the score is finite for any finite
    logits.

    Args:
        logits: (B, C) logits; not modified.
        gamma: exponent, > 0 (authors: 0.1).
        M: number of top classes, >= 1 (authors: 100 for ImageNet); capped at C.

    Returns:
        (B,) scores in ``[-min(M, C) * 4**-gamma, 0]``, in the logits' dtype (at least
        float32).

    Raises:
        ValueError: logits not (B, C), non-finite logits, or invalid gamma / M.
    """
    _check_gen_arguments(gamma, M)
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"GEN expects (B, C) logits with C >= 1; got {tuple(logits.shape)}")
    check_finite(logits, "GEN input logits")
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    m = min(int(M), x.shape[1])
    # log space throughout: log p from log_softmax; log(1 - p) is log1p(-p) for every class but
    # the most probable one (the only one that can exceed 1/2), whose complement is the softmax
    # mass of all the others, a logsumexp of their log p (-inf when C = 1: its term is 0). No
    # 1 - p is ever rounded, so a very confident sample keeps its small (1 - p)^gamma.
    log_p = torch.log_softmax(x, dim=1)
    top = log_p.argmax(dim=1, keepdim=True)
    log_q_top = torch.logsumexp(log_p.scatter(1, top, float("-inf")), dim=1, keepdim=True)
    if m < x.shape[1]:  # the top M (unsorted: the sum does not need their order)
        log_p = log_p.topk(m, dim=1, sorted=False).values
        top = log_p.argmax(dim=1, keepdim=True)  # the most probable class's column among them
    log_q = torch.exp(log_p).neg_().log1p_().scatter_(1, top, log_q_top)
    return torch.exp(log_q.add_(log_p).mul_(float(gamma))).sum(dim=1).neg_()


@register("gen", defaults={"*": {"gamma": 0.1, "M": 100}, "imagenet": {"gamma": 0.1, "M": 100}})
class GEN(Detector):
    """GEN, the generalised-entropy score of the softmax (no fitting).

    Liu, Lochman, Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution
    Detection", CVPR 2023. The score is minus the generalised entropy of the ``M`` largest
    softmax probabilities, ``-sum_j p_j^gamma (1 - p_j)^gamma``
    (:func:`generalized_entropy_score`); higher = ID. Authors' defaults gamma = 0.1,
    M = 100 (ImageNet); with fewer than M classes all C classes are used (``attach``
    caps ``M`` at the head's number of classes, so the report and the tuning grid show
    the value actually used).

    Deviations from the authors' code (XixiLiu95/GEN ``benchmark.py``):

    * computed in log space (the logits' dtype), with ``1 - p`` of the most probable class taken from
      the other classes' softmax mass (theirs evaluates ``(1 - p)**gamma`` on the rounded
      softmax, which is exactly 0 for every very confident sample, so those samples tie).
      On ordinary logits the two agree to float precision.

    Args:
        gamma: exponent > 0.
        M: number of top classes used (>= 1).
    """

    name = "gen"
    reads = ("logits",)
    tuning_grid = {"gamma": GAMMA_GRID, "M": M_GRID}
    reported_attributes = ("gamma", "M")

    def __init__(self, gamma: float = 0.1, M: int = 100) -> None:
        super().__init__()
        _check_gen_arguments(gamma, M)
        self.gamma = float(gamma)
        self.M = int(M)
        self._num_classes: Optional[int] = None

    def attach(self, head: nn.Module, num_blocks: int = 0) -> None:
        classes = _num_classes(head)
        self._num_classes = classes
        if classes is not None:
            self.M = min(self.M, classes)

    def _cap(self, M: int) -> int:
        return int(M) if self._num_classes is None else min(int(M), self._num_classes)

    def set_hyperparameters(self, **values: Any) -> bool:
        self.check_grid({key: [value] for key, value in values.items()})
        gamma = float(values.get("gamma", self.gamma))
        M = values.get("M", self.M)
        _check_gen_arguments(gamma, M)
        self.gamma, self.M = gamma, self._cap(M)
        return False

    def tuning_candidates(self, overrides: Optional[dict[str, Sequence[Any]]] = None) -> list[dict[str, Any]]:
        """The grid with every M capped at the number of classes (once attached) and the
        duplicates this creates removed (e.g. only gamma is tuned for CIFAR-10)."""
        unique: dict[tuple[float, int], dict[str, Any]] = {}
        for candidate in super().tuning_candidates(overrides):
            capped = {**candidate, "M": self._cap(candidate["M"])}
            unique[(float(capped["gamma"]), capped["M"])] = capped
        return [unique[key] for key in sorted(unique)]

    def score(self, outputs: ForwardOutputs) -> Tensor:
        return generalized_entropy_score(outputs.logits, self.gamma, self.M)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, M={self.M}"


def _num_classes(head: nn.Module) -> Optional[int]:
    """C of a head: ``out_features`` of a linear head, ``num_classes`` of a distance head."""
    for attr in ("out_features", "num_classes"):
        value = getattr(head, attr, None)
        if isinstance(value, int) and value >= 1:
            return value
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return None
