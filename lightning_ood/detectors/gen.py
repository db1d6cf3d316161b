"""GEN: generalised entropy of the top-M softmax probabilities."""
from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

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
    ``exp(gamma * (log p + log(1 - p)))``, from the logits directly (no softmax tensor):
    ``log(1 - p)`` is ``log1p(-p)`` for every class except the most probable one (the only
    one that can exceed 1/2), whose complement is the softmax mass of all the other
    classes, summed relative to the second-largest logit. So a very confident sample keeps
    its small ``(1 - p)^gamma`` term instead of rounding ``1 - p`` to 0 (float32 does that
    for any ``p > 1 - 6e-8``), and the score is finite for any finite logits.

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
    x = _checked_logits(logits)
    return _score(x, float(gamma), min(int(M), x.shape[1]))


def _checked_logits(logits: Tensor) -> Tensor:
    """``logits`` checked to be finite (B, C), C >= 1, in float32 or float64."""
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"GEN expects (B, C) logits with C >= 1; got {tuple(logits.shape)}")
    check_finite(logits, "GEN input logits")
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _score(x: Tensor, gamma: float, m: int) -> Tensor:
    """:func:`generalized_entropy_score` of checked float logits, ``1 <= m <= C``."""
    B, C = x.shape
    if C == 1:  # p = 1 and (1 - p)^gamma = 0
        return x.new_zeros(B)
    # z_j = x_j - x_top (the log-softmax frame, where the top classes' logits subtract exactly),
    # -inf in the most probable class's own column
    if m == C:
        largest, top = x.max(dim=1, keepdim=True)
        z = x - largest
    else:
        arranged = _top_m_last(x, m)
        largest = arranged.narrow(1, C - 1, 1)
        z = arranged - largest
        top = torch.full((B, 1), C - 1, dtype=torch.long, device=x.device)
    z.scatter_(1, top, float("-inf"))
    def top_m(t: Tensor) -> Tensor:  # the top M columns, the most probable one's included
        return t if m == C else t.narrow(1, C - m, m)

    chosen = top_m(z)
    shift = (chosen if m >= 2 else z).amax(dim=1, keepdim=True)  # x_second - x_top
    floor_rest, floor_p = _floors(x.dtype, C)
    # e_j = exp(z_j - shift) <= 1, the second's is 1, so their sum is >= 1 and nothing
    # underflows; terms under eps / (e C) of it (the top's -inf among them) are floored there (no
    # subnormal is made, CPUs are ~10x slower on them), which moves the sum by under half an ulp
    e = (z - shift).clamp_(min=floor_rest).exp_()
    log_rest = e.sum(dim=1, keepdim=True).log_().add_(shift)  # log sum_{j != top} exp(z_j)
    log_norm = F.softplus(log_rest)  # log sum_j exp(z_j): log p_j = z_j - log_norm
    # log(1 - p) = log1p(-p) with p_j = e_j p_second: exact for p <= 1/2, i.e. all but the top.
    # Once p_second < eps / e every p is, and log(1 - p) ~ -p is under half an ulp of log p
    # (|log p| > 1), so p_second is floored there too.
    minus_p_second = (shift - log_norm).clamp_(min=floor_p).exp_().neg_()
    log_q = (top_m(e) * minus_p_second).log1p_()
    # the most probable class: p (1 - p) = exp(log_rest - 2 log_norm), its 1 - p being the mass of
    # the rest; its own log_q (from its floored e) is under half an ulp of |log p(1-p)| >= log 4
    z.scatter_(1, top, log_rest - log_norm)
    # -sum p^g (1 - p)^g = -sum exp(g (log p + log(1 - p)))
    return log_q.add_(chosen).sub_(log_norm).mul_(gamma).exp_().sum(dim=1).neg_()


@functools.lru_cache(maxsize=None)
def _floors(dtype: torch.dtype, num_classes: int) -> tuple[float, float]:
    """log(eps / (e C)) and log(eps / e) for ``dtype``: the floors of :func:`_score`."""
    log_eps = math.log(torch.finfo(dtype).eps)
    return log_eps - math.log(num_classes) - 1.0, log_eps - 1.0


def _top_m_last(x: Tensor, m: int) -> Tensor:
    """The logits of each row rearranged so that its ``m`` largest fill the last ``m`` columns
    with the largest one last; ``x`` is (B, C) with ``m < C``. The order is otherwise arbitrary.

    Eagerly on the CPU this is numpy's ``partition``, one pivot per call (6.5x faster than
    ``torch.topk`` at B = 256, C = 1000, M = 100 on one thread, measured; several pivots in
    one call are as slow as ``topk``); elsewhere, and under ``torch.export``, a sort.
    """
    if x.device.type != "cpu" or x.requires_grad or torch.compiler.is_compiling():
        return x.sort(dim=1).values
    C = x.shape[1]
    arranged = np.partition(x.detach().numpy(), C - m, axis=1)
    arranged[:, C - m:].partition(m - 1, axis=1)  # in place: the largest to the last column
    return torch.from_numpy(arranged)


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
        x = _checked_logits(outputs.logits)  # gamma and M were checked when set
        return _score(x, self.gamma, min(self.M, x.shape[1]))

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
