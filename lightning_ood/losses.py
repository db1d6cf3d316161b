"""Training objectives selectable by ``--model.loss``."""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor

LOSSES = ("ce", "isomax_plus", "l2_norm")


def isomax_plus_loss(logits: Tensor, targets: Tensor, entropic_scale: float = 10.0) -> Tensor:
    """IsoMax+ loss (Macêdo & Ludermir, 2021): cross-entropy of ``entropic_scale * logits``.

    ``logits`` are the (negative, scaled) distances of :class:`~lightning_ood.heads.IsoMaxPlusHead`.
    The entropic scale is used in training only; scores at test time use the raw logits.
    ``log_softmax`` replaces the authors' softmax-then-log (equal in exact arithmetic,
    numerically safer).
    """
    return F.nll_loss(F.log_softmax(entropic_scale * logits, dim=1), targets)


def build_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss function that goes with an objective name."""
    if name == "isomax_plus":
        return isomax_plus_loss
    if name in ("ce", "l2_norm"):
        return F.cross_entropy
    raise ValueError(f"unknown loss {name!r}; valid choices: {', '.join(LOSSES)}")
