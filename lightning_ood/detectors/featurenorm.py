"""FeatureNorm scored at the block chosen by NormRatio."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from lightning_ood.detectors.base import Detector, FitData, ForwardOutputs
from lightning_ood.detectors.functional import check_finite
from lightning_ood.detectors.registry import register
from lightning_ood.distributed import all_reduce

#: Lower bound on a jigsaw image's FeatureNorm in the NormRatio denominator. FeatureNorms
#: are non-negative; an exactly zero one (a block whose output is entirely non-positive)
#: would otherwise divide by zero. A clamped pair contributes ``norm / 1e-6``, i.e. such a
#: block is counted as separating that image extremely well.
MIN_JIGSAW_NORM = 1e-6


@register("feature_norm", aliases=("featurenorm",), default=True)
class FeatureNorm(Detector):
    """FeatureNorm of one residual block, the block selected automatically by NormRatio.

    Yu et al., "Block Selection Method for Using Feature Norm in Out-of-distribution
    Detection", CVPR 2023. The score of an image is the FeatureNorm
    (:func:`~lightning_ood.detectors.functional.feature_norm`) of the selected block's
    output, read from ``ForwardOutputs.block_norms``. :meth:`fit` computes, for every
    block, NormRatio = mean over ID training images of
    ``FeatureNorm(x) / FeatureNorm(jigsaw(x))`` (summed over row chunks, so its working
    memory does not grow with N) and selects the block with the largest ratio. All
    ratios, the selected block and the number of images are buffers, so they are carried
    by checkpoints and can be reported.

    Args:
        num_blocks: number of blocks in ``block_norms``; 0 until :meth:`attach` sets it
            (pass the model's value here to load a fitted checkpoint before attaching).
    """

    name = "feature_norm"
    reads = ("block_norms",)
    requires_fit = True
    requires_jigsaw = True
    reported_buffers = ("selected_block", "num_fit_images", "ratios")

    def __init__(self, num_blocks: int = 0) -> None:
        super().__init__()
        self._allocate(num_blocks)

    def _allocate(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0; got {num_blocks}")
        self.num_blocks = num_blocks
        self.register_buffer("ratios", torch.zeros(num_blocks))
        self.register_buffer("selected_block", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("num_fit_images", torch.tensor(0, dtype=torch.long))
        self.fitted.fill_(False)
        self._block = -1

    def sync_from_buffers(self) -> None:
        self._block = int(self.selected_block)

    def attach(self, head: nn.Module, num_blocks: int = 0) -> None:
        """Size the buffers for ``num_blocks`` blocks.

        Buffers are re-allocated (and the fit discarded) only when ``num_blocks`` differs
        from the current size, so attaching after loading a checkpoint keeps its fit.
        """
        if num_blocks != self.num_blocks:
            self._allocate(num_blocks)

    def skip_reason(self, head: nn.Module, num_blocks: int = 0) -> Optional[str]:
        if num_blocks == 0:
            return "feature_norm needs per-block FeatureNorms, the model exposes no blocks"
        return None

    def fit(self, data: FitData) -> None:
        """Compute every block's NormRatio on ID training data and select the largest.

        Sums of ratios and image counts are reduced across ranks
        (:func:`lightning_ood.distributed.all_reduce`), so 1 or N ranks give the same
        result. Denominators are clamped to :data:`MIN_JIGSAW_NORM`. Buffers are written
        in place (``copy_``/``fill_``), so they must be normal tensors, not inference
        tensors: allocate them (construct/attach) outside ``torch.inference_mode``.
        """
        if self.num_blocks == 0:
            raise RuntimeError("feature_norm has no blocks: call attach(head, num_blocks) first")
        if data.block_norms is None or data.jigsaw_block_norms is None:
            raise ValueError(
                "feature_norm.fit needs FitData.block_norms and FitData.jigsaw_block_norms"
            )
        expected = (len(data), self.num_blocks)
        for what in ("block_norms", "jigsaw_block_norms"):
            norms = getattr(data, what)
            if tuple(norms.shape) != expected:
                raise ValueError(
                    f"FitData.{what} has shape {tuple(norms.shape)}, expected {expected}"
                )
            check_finite(norms, f"FitData.{what}")

        device = data.block_norms.device
        ratio_sum = torch.zeros(self.num_blocks, dtype=torch.float64, device=device)
        for chunk in data.chunks():
            ratio_sum += (chunk.block_norms.double() / chunk.jigsaw_block_norms.double().clamp_min(MIN_JIGSAW_NORM)).sum(0)
        ratio_sum = all_reduce(ratio_sum, op="sum")
        count = all_reduce(torch.tensor(len(data), dtype=torch.long, device=device), op="sum")
        if int(count) == 0:
            raise ValueError("feature_norm.fit received no training images on any rank")
        mean_ratio = ratio_sum / count
        self.ratios.copy_(mean_ratio)
        self.selected_block.fill_(int(mean_ratio.argmax()))
        self.num_fit_images.fill_(int(count))
        self.sync_from_buffers()
        super().fit(data)

    def score(self, outputs: ForwardOutputs) -> Tensor:
        if self._block < 0:
            raise RuntimeError("feature_norm has not selected a block: call fit() first")
        norms = outputs.block_norms
        if norms is None or norms.dim() != 2 or norms.shape[1] != self.num_blocks:
            shape = None if norms is None else tuple(norms.shape)
            raise ValueError(
                f"feature_norm needs block_norms of shape (B, {self.num_blocks}); got {shape}"
            )
        check_finite(norms, "block norms")
        return norms[:, self._block]

    def extra_repr(self) -> str:
        return f"num_blocks={self.num_blocks}"
