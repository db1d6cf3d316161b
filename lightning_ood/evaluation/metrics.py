"""OOD-detection metrics on top of torchmetrics.

Scores follow the project convention: **higher score = more in-distribution (ID)**. Every
metric is computed on the exact curve over all distinct scores (``thresholds=None``) and
with torchmetrics' automatic sigmoid switched off (``normalization=None``): by default
torchmetrics squashes any batch with values outside [0, 1] through a sigmoid, which turns
large energies into ties and silently corrupts AUROC/AUPR.

Positive class of each metric:

* ``auroc``: the probability that a random ID sample scores above a random OOD sample
  (ties count 1/2). Symmetric: the same whichever class is called positive.
* ``aupr_in``: ID positive, ranked by score (average precision, as scikit-learn).
* ``aupr_out``: OOD positive, ranked by -score.
* ``fpr95``: false-positive rate at the first threshold where the true-positive rate
  reaches 95%, with the positive class chosen by ``fpr95_positive``:

  - ``"ood"`` (default; OpenOOD v1.5, pytorch-ood): OOD positive, detected by low
    score; FPR = fraction of ID samples flagged OOD when 95% of OOD is caught.
  - ``"id"`` (ODIN, ASH and FeatureNorm papers): ID positive; FPR = fraction of OOD
    samples accepted as ID when 95% of ID is kept.

  The curve keeps every threshold (scikit-learn's ``roc_curve(...,
  drop_intermediate=False)``). With tied scores, scikit-learn's default
  ``drop_intermediate=True`` (used by OpenOOD) can skip the first threshold reaching 95%
  and report a higher FPR; this module does not.
"""
from __future__ import annotations

from typing import Any

import math

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision, BinaryROC
from torchmetrics.utilities import dim_zero_cat

FPR95_POSITIVE_CLASSES = ("ood", "id")

# Exact curves over every distinct score, no sigmoid on scores outside [0, 1], and no
# cross-process sync: these metrics see already-gathered scores, and rank-0-only code (the
# plots) calls them, so a sync here would wait forever for the other ranks.
_EXACT = {"thresholds": None, "normalization": None, "sync_on_compute": False}


def ood_metrics(
    id_scores: Tensor, ood_scores: Tensor, fpr95_positive: str = "ood"
) -> dict[str, float]:
    """AUROC, FPR@95%TPR, AUPR-In and AUPR-Out of one ID set against one OOD set.

    Args:
        id_scores: (N_id,) scores of ID samples, higher = more in-distribution.
        ood_scores: (N_ood,) scores of OOD samples, same convention.
        fpr95_positive: positive class of FPR95, ``"ood"`` (OOD positive: fraction of ID
            flagged OOD at 95% of OOD caught) or ``"id"`` (ID positive: fraction of OOD
            accepted at 95% of ID kept).

    Returns:
        ``{"auroc", "fpr95", "aupr_in", "aupr_out"}`` as fractions in [0, 1]. AUROC is
        symmetric in the classes; AUPR-In takes ID as positive, AUPR-Out takes OOD as
        positive (ranked by -score).

    Raises:
        ValueError: a set is empty, not 1-D or holds NaN/inf, or ``fpr95_positive`` is
            unknown.
    """
    _check_fpr95_positive(fpr95_positive)
    id_scores = _validated_scores("id_scores", id_scores)
    ood_scores = _validated_scores("ood_scores", ood_scores)

    scores = torch.cat([id_scores, ood_scores])
    is_id = torch.cat([torch.ones_like(id_scores), torch.zeros_like(ood_scores)]).long()
    is_ood = 1 - is_id
    if fpr95_positive == "ood":
        fpr95 = _fpr_at_95_tpr(-scores, is_ood)
    else:
        fpr95 = _fpr_at_95_tpr(scores, is_id)
    return {
        "auroc": float(_exact_metric(BinaryAUROC, scores, is_id)),
        "fpr95": fpr95,
        "aupr_in": float(_exact_metric(BinaryAveragePrecision, scores, is_id)),
        "aupr_out": float(_exact_metric(BinaryAveragePrecision, -scores, is_ood)),
    }


def roc_curve_ood(id_scores: Tensor, ood_scores: Tensor) -> tuple[Tensor, Tensor]:
    """(FPR, TPR) of the exact ROC curve with **OOD positive**: TPR = fraction of OOD
    detected (score below threshold), FPR = fraction of ID flagged OOD."""
    id_scores = _validated_scores("id_scores", id_scores)
    ood_scores = _validated_scores("ood_scores", ood_scores)
    scores = torch.cat([id_scores, ood_scores])
    is_ood = torch.cat([torch.zeros_like(id_scores), torch.ones_like(ood_scores)]).long()
    fpr, tpr, _ = _exact_metric(BinaryROC, -scores, is_ood)
    return fpr, tpr


class OODMetrics(Metric):
    """Stateful :func:`ood_metrics`: accumulate scores batch by batch, compute once.

    ``compute()`` is a collective (by torchmetrics' default ``sync_on_compute=True``): call
    it on every rank, or pass ``sync_on_compute=False``. States are concatenated across processes (``dist_reduce_fx="cat"``). Samples that a
    distributed sampler pads in (repeated to equal length per rank) are **not** removed:
    deduplicate by sample index before updating when that matters.

    Example:
        >>> metric = OODMetrics()
        >>> metric.update(torch.tensor([3.0, 2.5, 0.1]), torch.tensor([False, False, True]))
        >>> metric.compute()["auroc"]
        1.0

    Args:
        fpr95_positive: positive class of FPR95, ``"ood"`` (default) or ``"id"``; see
            :func:`ood_metrics` for every metric's positive class.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = None  # FPR95 is lower-is-better, the others higher-is-better
    full_state_update = False

    scores: list[Tensor]
    is_ood: list[Tensor]

    def __init__(self, fpr95_positive: str = "ood", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_fpr95_positive(fpr95_positive)
        self.fpr95_positive = fpr95_positive
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("is_ood", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, is_ood: Tensor) -> None:
        """Add a batch.

        Args:
            scores: (B,) scores, higher = more in-distribution.
            is_ood: (B,) bool or 0/1 labels, true/1 for OOD samples.
        """
        if scores.ndim != 1 or scores.shape != is_ood.shape:
            raise ValueError(
                f"scores and is_ood must be 1-D of equal length, got shapes {tuple(scores.shape)} "
                f"and {tuple(is_ood.shape)}"
            )
        if not bool(((is_ood == 0) | (is_ood == 1)).all()):
            raise ValueError("is_ood must hold only booleans or 0/1 values")
        self.scores.append(scores.detach())
        self.is_ood.append(is_ood.detach().to(torch.long))

    def compute(self) -> dict[str, float]:
        """:func:`ood_metrics` over everything seen since the last reset."""
        scores = dim_zero_cat(self.scores)
        is_ood = dim_zero_cat(self.is_ood).bool()
        return ood_metrics(scores[~is_ood], scores[is_ood], self.fpr95_positive)


def _check_fpr95_positive(fpr95_positive: str) -> None:
    if fpr95_positive not in FPR95_POSITIVE_CLASSES:
        raise ValueError(
            f"fpr95_positive must be one of {FPR95_POSITIVE_CLASSES}, got {fpr95_positive!r}"
        )


def _validated_scores(name: str, scores: Tensor) -> Tensor:
    """Check one score set; return it as a float64 CPU tensor (exact ranks, deterministic)."""
    scores = torch.as_tensor(scores)
    if scores.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D (one score per sample), got shape {tuple(scores.shape)}"
        )
    if scores.numel() == 0:
        raise ValueError(f"{name} is empty: need at least one sample")
    scores = scores.detach().to(device="cpu", dtype=torch.float64)
    n_nan = int(torch.isnan(scores).sum())
    n_inf = int(torch.isinf(scores).sum())
    if n_nan or n_inf:
        raise ValueError(
            f"{name} holds {n_nan} NaN and {n_inf} infinite value(s) out of {scores.numel()}; "
            "every score must be finite"
        )
    return scores


def _exact_metric(metric_cls: type[Metric], preds: Tensor, target: Tensor) -> Any:
    metric = metric_cls(**_EXACT)
    metric.update(preds, target)
    return metric.compute()


def _fpr_at_95_tpr(preds: Tensor, target: Tensor) -> float:
    """FPR at the first threshold (descending ``preds``) where TPR >= 0.95; target 1 = positive."""
    fpr, tpr, _ = _exact_metric(BinaryROC, preds, target)
    n_pos = int(target.sum())
    true_pos = torch.round(tpr.double() * n_pos)
    reached = torch.nonzero(20 * true_pos >= 19 * n_pos)  # TP / P >= 0.95, exact in integers
    return float(fpr[reached[0, 0]])


def id_threshold(id_scores: Tensor, keep_fraction: float = 0.95) -> float:
    """The score threshold that keeps ``keep_fraction`` of ID samples (score >= threshold
    counts as ID): the largest t with at least ``keep_fraction`` of ID scores >= t."""
    ordered = torch.sort(id_scores.double(), descending=True).values
    position = max(math.ceil(keep_fraction * len(ordered) - 1e-9) - 1, 0)
    return float(ordered[position])
