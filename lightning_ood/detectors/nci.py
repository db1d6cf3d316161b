"""NCI: neural-collapse inspired score (alignment of the centred feature with the predicted
class's weight vector, plus a feature-norm filter)."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_ood.detectors.base import Detector, FitData, ForwardOutputs
from lightning_ood.detectors.fdbd import linear_head_reason, training_mean
from lightning_ood.detectors.functional import check_finite, stable_row_norm
from lightning_ood.detectors.registry import register

#: alpha values of the authors' automatic parameter search (configs/postprocessors/nci.yml).
ALPHA_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
#: The authors' config default (the same for every benchmark; they then tune it on
#: ID/OOD validation data with OpenOOD's APS).
PUBLISHED_ALPHA = {"*": {"alpha": 1e-4}}


#: Up to this many classes the alignment w_c . (z - mu) comes from one (B, D) x (D, C) matmul;
#: above it from the gathered (B, D) weight rows, whose (B, D) copy costs about as much as the
#: matmul near C = 100-200 (measured at B = 10,000, D = 512 and 2048, one thread: the matmul is
#: 4-8x faster at C = 10 and 3x slower at C = 1000).
DOT_BY_MATMUL_MAX_CLASSES = 128


@register("nci", defaults=PUBLISHED_ALPHA)
class NCI(Detector):
    """Neural Collapse Inspired OOD score.

    Liu & Qin, "Detecting Out-of-Distribution through the Lens of Neural Collapse",
    CVPR 2025 (arXiv:2311.01479). With mu the mean ID training feature, c = argmax logits
    and w_c the head's weight row of class c::

        S(z) = w_c^T (z - mu) / ||z - mu||  +  alpha * ||z||_1        (higher = ID)

    The first term (the paper's pScore) is the projection of w_c on the direction of the
    centred feature, ``||w_c|| cos(w_c, z - mu)``, exactly as the authors' code computes
    it (w_c is not normalised); the second is the L1-norm filter. W is read from the head
    at score time (an unregistered reference), so the fitted state is only ``train_mean``
    (D,), ``num_fit_images`` and the ``alpha_value`` buffer (checkpoints carry a tuned
    alpha).

    Deviations from the authors' code (litianliu/NCI-OOD, an OpenOOD fork), deliberate:

    * mu is the mean of the evaluation's fit subset (``fit_samples``), not of the whole
      training set;
    * ``||z - mu||`` is clamped at 1e-12 (overflow-safe, :func:`stable_row_norm`), so a feature equal
      to mu scores ``alpha ||z||_1`` instead of NaN.

    Args:
        alpha: weight of the L1 feature norm (authors' default 1e-4, tuned over
            1e-4 ... 1e-1).
        fit_chunk: fit-data rows summed at once.
    """

    name = "nci"
    reads = ("logits", "features", "head")
    requires_fit = True
    tuning_grid = {"alpha": ALPHA_GRID}
    reported_attributes = ("alpha",)
    reported_buffers = ("num_fit_images",)

    def __init__(self, alpha: float = 1e-4, fit_chunk: int = 4096) -> None:
        super().__init__()
        self._check_alpha(alpha)
        if int(fit_chunk) != fit_chunk or fit_chunk < 1:
            raise ValueError(f"fit_chunk must be a positive integer, got {fit_chunk}")
        self.fit_chunk = int(fit_chunk)
        # float64, so that a checkpoint restores alpha exactly (1e-4 is not a float32 value)
        self.register_buffer("alpha_value", torch.tensor(float(alpha), dtype=torch.float64))
        self.register_buffer("train_mean", None)
        self.register_buffer("num_fit_images", torch.tensor(0, dtype=torch.long))
        self._alpha = float(alpha)
        self._head: tuple[nn.Module, ...] = ()

    @staticmethod
    def _check_alpha(alpha: Any) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) < float("inf"):
            raise ValueError(f"NCI alpha must be a finite number >= 0, got {alpha!r}")

    @property
    def alpha(self) -> float:
        """Weight of the L1 norm term, stored in the ``alpha_value`` buffer."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._check_alpha(value)
        self.alpha_value.fill_(float(value))
        self._alpha = float(value)

    def sync_from_buffers(self) -> None:
        stored = float(self.alpha_value)
        # keep the exact Python value when the buffer only holds its rounding (e.g. after a
        # cast of the module to float32)
        if float(torch.tensor(self._alpha, dtype=self.alpha_value.dtype)) != stored:
            self._alpha = stored

    def skip_reason(self, head: nn.Module, num_blocks: int = 0) -> Optional[str]:
        return linear_head_reason(head, "nci")

    def attach(self, head: nn.Module, num_blocks: int = 0) -> None:
        """Keep a reference to the head and allocate ``train_mean`` (D,) unless it exists
        (a loaded fit is kept when its width matches)."""
        reason = self.skip_reason(head, num_blocks)
        if reason is not None:
            raise ValueError(reason)
        weight = head.weight
        self._head = (head,)
        if self.train_mean is None:
            self.train_mean = torch.zeros(weight.shape[1], device=weight.device)
        elif self.train_mean.shape != (weight.shape[1],):
            raise ValueError(f"nci train_mean of shape {tuple(self.train_mean.shape)} does not match the "
                             f"head's feature width D = {weight.shape[1]}")

    def fit(self, data: FitData) -> None:
        """The mean ID training feature (float64 sums over chunks and ranks)."""
        if not self._head:
            raise RuntimeError("nci has no classification head: call attach(head) first")
        mean, count = training_mean(data, self.fit_chunk, "nci")
        if mean.shape != self.train_mean.shape:
            raise ValueError(f"nci expects FitData.features of shape (N, {self.train_mean.shape[0]}); "
                             f"got {tuple(data.features.shape)}")
        # assigned, not copied in place: works whether or not attach ran under inference_mode
        self.train_mean = mean.to(device=self.train_mean.device, dtype=torch.float32)
        self.num_fit_images.fill_(count)
        self.fitted.fill_(True)
        self.sync_from_buffers()

    def score(self, outputs: ForwardOutputs) -> Tensor:
        if not self._head or self.train_mean is None:
            raise RuntimeError("nci has no classification head: call attach(head) first")
        weight = self._head[0].weight
        logits, features = outputs.logits, outputs.features
        classes, width = weight.shape
        if logits.dim() != 2 or logits.shape[1] != classes:
            raise ValueError(f"nci expects logits of shape (B, {classes}); got {tuple(logits.shape)}")
        if features.dim() != 2 or features.shape[1] != width or features.shape[0] != logits.shape[0]:
            raise ValueError(f"nci expects features of shape (B, {width}) with B = {logits.shape[0]}; "
                             f"got {tuple(features.shape)}")
        check_finite(logits, "nci logits")
        check_finite(features, "nci features")
        dtype = torch.promote_types(features.dtype, torch.float32)
        z = features.to(dtype)
        centred = z - self.train_mean.to(dtype)
        distance = stable_row_norm(centred).clamp_min(1e-12)
        w = weight.detach().to(dtype)
        predicted = logits.argmax(dim=1, keepdim=True)
        if classes <= DOT_BY_MATMUL_MAX_CLASSES:  # all C products in one matmul, then pick one
            dot = (centred @ w.T).gather(1, predicted).squeeze(1)
        else:  # the predicted class's weight row per sample
            dot = torch.linalg.vecdot(w.index_select(0, predicted.squeeze(1)), centred)
        alignment = dot / distance
        return alignment + self._alpha * torch.linalg.vector_norm(z, ord=1, dim=1)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
