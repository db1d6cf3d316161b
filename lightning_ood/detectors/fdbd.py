"""fDBD: feature distance to the decision boundaries, regularised by the distance to the
training feature mean."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from lightning_ood.detectors.base import Detector, FitData, ForwardOutputs
from lightning_ood.detectors.functional import check_finite, stable_row_norm
from lightning_ood.detectors.registry import register
from lightning_ood.distributed import all_reduce

#: Below this, two classes' weight rows are taken as identical (no boundary between them).
SAME_ROWS = 1e-12


def linear_head_reason(head: nn.Module, what: str) -> Optional[str]:
    """One-line reason why ``head`` has no plain (C, D) linear weight with C >= 2."""
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return (f"{what} reads the class weight vectors of a linear head; {type(head).__name__} has no "
                "(C, D) `weight` (e.g. a prototype/distance head)")
    if weight.shape[0] < 2:
        return f"{what} needs at least 2 classes, the head has {weight.shape[0]}"
    return None


def training_mean(data: FitData, rows: int, what: str) -> tuple[Tensor, int]:
    """Mean of ``FitData.features`` over every rank: float64 sums of row chunks, reduced
    with ``all_reduce`` (every rank calls it). Returns ``(mean (D,) float64, count)``."""
    features = data.features
    if features.dim() != 2:
        raise ValueError(f"{what} fit expects FitData.features of shape (N, D); got {tuple(features.shape)}")
    check_finite(features, "FitData.features")
    total = torch.zeros(features.shape[1], dtype=torch.float64, device=features.device)
    for chunk in data.chunks(rows):
        total += chunk.features.double().sum(dim=0)
    total = all_reduce(total, "sum")
    count = int(all_reduce(torch.tensor(len(data), dtype=torch.long, device=features.device), "sum"))
    if count == 0:
        raise ValueError(f"{what} fit received no training features on any rank")
    return total / count, count


def inverse_boundary_norms(weight: Tensor) -> Tensor:
    """(C, C) float32 matrix with entry (c, j) = 1 / ||w_c - w_j||, and 0 on the diagonal
    and wherever two rows coincide (no boundary between those classes)."""
    w = weight.detach().to(torch.float64)
    norms = torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist")
    inverse = torch.where(norms > SAME_ROWS, 1.0 / norms.clamp_min(SAME_ROWS), torch.zeros_like(norms))
    inverse.fill_diagonal_(0.0)
    return inverse.to(torch.float32)


@register("fdbd")
class FDBD(Detector):
    """Fast decision-boundary score, regularised by the distance to the training mean.

    Liu & Qin, "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024.
    For the predicted class c = argmax logits, the distance of the feature z to the
    boundary between c and every other class j of the linear head (W, b) is
    ``|(w_c - w_j)^T z + (b_c - b_j)| / ||w_c - w_j|| = |l_c - l_j| / ||w_c - w_j||``
    (l the logits). The score is their mean over j != c divided by ``||z - mu||``, mu the
    mean ID training feature (higher = ID)::

        S(z) = (1 / (C - 1)) * sum_{j != c} |l_c - l_j| / ||w_c - w_j||  /  ||z - mu||

    ``1 / ||w_c - w_j||`` is a (C, C) matrix computed from the head at :meth:`attach` (a
    non-persistent buffer: 4 MB for C = 1000, rebuilt from the head, not checkpointed;
    refreshed at :meth:`fit`), with 0 on the diagonal, so the j = c term vanishes without
    masking. The fitted state is ``train_mean`` (D,) and ``num_fit_images``.

    Deviations from the authors' code (litianliu/fDBD-OOD), all deliberate:

    * mean over the C - 1 other classes as in the paper; the code sums (a factor C - 1,
      same ranking);
    * mu is the mean of the evaluation's fit subset (``fit_samples``), not of the whole
      training set;
    * ``||z - mu||`` is clamped at 1e-12 and pairs of identical weight rows are left out
      of the sum (their boundary is undefined), so the score stays finite;
    * only the paper's mean-distance regulariser; OpenOOD's integration can also divide
      by ``||z||`` (``distance_as_normalizer=False``), not offered here.

    Args:
        fit_chunk: fit-data rows summed at once.
    """

    name = "fdbd"
    reads = ("logits", "features", "head")
    requires_fit = True
    reported_buffers = ("num_fit_images",)

    def __init__(self, fit_chunk: int = 4096) -> None:
        super().__init__()
        if int(fit_chunk) != fit_chunk or fit_chunk < 1:
            raise ValueError(f"fit_chunk must be a positive integer, got {fit_chunk}")
        self.fit_chunk = int(fit_chunk)
        self.register_buffer("train_mean", None)
        self.register_buffer("num_fit_images", torch.tensor(0, dtype=torch.long))
        self.register_buffer("inverse_norms", None, persistent=False)
        self._head: tuple[nn.Module, ...] = ()

    def skip_reason(self, head: nn.Module, num_blocks: int = 0) -> Optional[str]:
        return linear_head_reason(head, "fdbd")

    def attach(self, head: nn.Module, num_blocks: int = 0) -> None:
        """Compute ``1 / ||w_c - w_j||`` from the head and allocate ``train_mean`` (D,)
        unless it exists (a loaded fit is kept when its width matches)."""
        reason = self.skip_reason(head, num_blocks)
        if reason is not None:
            raise ValueError(reason)
        weight = head.weight
        self._head = (head,)
        self.inverse_norms = inverse_boundary_norms(weight).to(weight.device)
        if self.train_mean is None:
            self.train_mean = torch.zeros(weight.shape[1], device=weight.device)
        elif self.train_mean.shape != (weight.shape[1],):
            raise ValueError(f"fdbd train_mean of shape {tuple(self.train_mean.shape)} does not match the "
                             f"head's feature width D = {weight.shape[1]}")

    def fit(self, data: FitData) -> None:
        """The mean ID training feature (float64 sums over chunks and ranks)."""
        if not self._head:
            raise RuntimeError("fdbd has no classification head: call attach(head) first")
        mean, count = training_mean(data, self.fit_chunk, "fdbd")
        if mean.shape != self.train_mean.shape:
            raise ValueError(f"fdbd expects FitData.features of shape (N, {self.train_mean.shape[0]}); "
                             f"got {tuple(data.features.shape)}")
        self.inverse_norms = inverse_boundary_norms(self._head[0].weight).to(self.train_mean.device)
        # assigned, not copied in place: works whether or not attach ran under inference_mode
        self.train_mean = mean.to(device=self.train_mean.device, dtype=torch.float32)
        self.num_fit_images.fill_(count)
        self.fitted.fill_(True)
        self.sync_from_buffers()

    def score(self, outputs: ForwardOutputs) -> Tensor:
        if self.train_mean is None or self.inverse_norms is None:
            raise RuntimeError("fdbd has no classification head: call attach(head) first")
        logits, features = outputs.logits, outputs.features
        classes, width = self.inverse_norms.shape[0], self.train_mean.shape[0]
        if logits.dim() != 2 or logits.shape[1] != classes:
            raise ValueError(f"fdbd expects logits of shape (B, {classes}); got {tuple(logits.shape)}")
        if features.dim() != 2 or features.shape[1] != width or features.shape[0] != logits.shape[0]:
            raise ValueError(f"fdbd expects features of shape (B, {width}) with B = {logits.shape[0]}; "
                             f"got {tuple(features.shape)}")
        check_finite(logits, "fdbd logits")
        check_finite(features, "fdbd features")
        dtype = torch.promote_types(features.dtype, torch.float32)
        logits = logits.to(dtype)
        top, predicted = logits.max(dim=1)
        gaps = (top.unsqueeze(1) - logits).abs()  # |l_c - l_j|, exactly 0 at j = c
        boundary = (gaps * self.inverse_norms.to(dtype).index_select(0, predicted)).sum(dim=1) / (classes - 1)
        distance = stable_row_norm(features.to(dtype) - self.train_mean.to(dtype)).clamp_min(1e-12)
        return boundary / distance

    def extra_repr(self) -> str:
        return f"fit_chunk={self.fit_chunk}"
