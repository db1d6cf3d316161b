"""The training objectives selectable by ``--model.loss``: one table row per objective.

Each row says which head the objective trains, its loss (with the IsoMax+ entropic scale,
a training-only factor) and the native OOD score of the trained head, which the evaluation
adds to the default detector list.

* ``ce``: linear head, softmax cross-entropy.
* ``isomax_plus``: isometric distance head, cross-entropy of ``entropic_scale * logits``
  (Macêdo & Ludermir, "Enhanced Isotropy Maximization Loss", arXiv:2105.14399, 2021);
  native score: the minimum distance (``min_distance``).
* ``l2_norm``: features L2-normalised (divided by a temperature) before the linear head in
  training only (Haas, Yolland & Rabus, "Exploring Simple, High Quality
  Out-of-Distribution Detection with L2 Normalization", TMLR 2024); native score: the
  penultimate feature norm (``penultimate_norm``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ood.nn.heads import IsoMaxPlusHead, L2NormalizedHead, LinearHead


def cross_entropy_loss(logits: Tensor, targets: Tensor, entropic_scale: float = 1.0) -> Tensor:
    """Softmax cross-entropy (``entropic_scale`` is ignored)."""
    return F.cross_entropy(logits, targets)


def isomax_plus_loss(logits: Tensor, targets: Tensor, entropic_scale: float = 10.0) -> Tensor:
    """IsoMax+ loss: cross-entropy of ``entropic_scale * logits``.

    ``logits`` are the (negative, scaled) distances of
    :class:`~lightning_ood.nn.heads.IsoMaxPlusHead`. The entropic scale is used in training
    only; scores at test time use the raw logits. ``log_softmax`` replaces the authors'
    softmax-then-log (equal in exact arithmetic, numerically safer).
    """
    return F.nll_loss(F.log_softmax(entropic_scale * logits, dim=1), targets)


@dataclass(frozen=True)
class Objective:
    """One training objective.

    Attributes:
        name: the ``--model.loss`` value.
        head: ``(in_features, num_classes, l2_temperature) -> head module``.
        loss: ``(logits, targets, entropic_scale) -> scalar loss``.
        native_score: detector name of the trained head's own OOD score, or ``None``.
    """

    name: str
    head: Callable[[int, int, float], nn.Module]
    loss: Callable[[Tensor, Tensor, float], Tensor]
    native_score: Optional[str] = None


OBJECTIVES: dict[str, Objective] = {
    "ce": Objective("ce", lambda d, c, t: LinearHead(d, c), cross_entropy_loss),
    "isomax_plus": Objective("isomax_plus", lambda d, c, t: IsoMaxPlusHead(d, c), isomax_plus_loss, "min_distance"),
    "l2_norm": Objective("l2_norm", lambda d, c, t: L2NormalizedHead(d, c, t), cross_entropy_loss, "penultimate_norm"),
}


def objective(name: str) -> Objective:
    """The table row of an objective name, with a clear error for unknown names."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown loss {name!r}; valid choices: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def native_score(name: Optional[str]) -> Optional[str]:
    """The native OOD score of an objective (``None`` for unknown names and ``ce``)."""
    row = OBJECTIVES.get(name or "")
    return row.native_score if row else None
