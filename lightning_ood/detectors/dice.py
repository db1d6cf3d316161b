"""DICE: directed sparsification of the last layer by weight contribution."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_ood.detectors.base import Detector, FitData, ForwardOutputs
from lightning_ood.detectors.functional import check_finite, energy
from lightning_ood.detectors.react import linear_percentile
from lightning_ood.detectors.registry import register
from lightning_ood.distributed import all_reduce

#: Sparsity percentiles tried by the tuning (the paper's ablation spans 0-99).
SPARSITY_GRID: tuple[float, ...] = (50.0, 70.0, 90.0, 95.0)
#: The authors' demo scripts: ``--p 90`` for CIFAR-10/100 (DenseNet-101), ``--p 70`` for
#: ImageNet (ResNet-50).
PUBLISHED_SPARSITY = {"*": {"sparsity": 90.0}, "imagenet": {"sparsity": 70.0}}
#: Rows read at once when summing the training features.
CHUNK_ROWS = 4096


def dice_mask(weight: Tensor, mean_feature: Tensor, sparsity: float) -> tuple[Tensor, Tensor]:
    """DICE's weight mask from the contribution matrix (Sun & Li, ECCV 2022).

    ``V = W * mean_feature`` (entry (c, j) = w_cj * mean training activation of unit j),
    computed in float64; ``threshold`` = the ``sparsity``-th percentile of all ``C x D``
    entries of V (NumPy's linear interpolation, :func:`~lightning_ood.detectors.react.linear_percentile`);
    the mask keeps the entries with ``V > threshold`` (strictly, as the authors), i.e. the
    top ``100 - sparsity`` % of contributions over the whole matrix, not per class.

    Args:
        weight: (C, D) last-layer weight.
        mean_feature: (D,) mean ID training feature.
        sparsity: percentile p on the 0-100 scale.

    Returns:
        ``(mask, threshold)``: (C, D) bool mask and the float64 0-d threshold.
    """
    if weight.dim() != 2 or mean_feature.shape != (weight.shape[1],):
        raise ValueError(f"dice_mask expects a (C, D) weight and a (D,) mean; got {tuple(weight.shape)} "
                         f"and {tuple(mean_feature.shape)}")
    contribution = weight.detach().double() * mean_feature.detach().double().unsqueeze(0)
    threshold = linear_percentile(contribution, sparsity)
    return contribution > threshold, threshold


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= float(sparsity) < 100.0:
        raise ValueError(f"DICE sparsity must be a percentile in [0, 100) (e.g. 90, not 0.9); got {sparsity}")
    if 0 < float(sparsity) <= 1:
        raise ValueError(f"DICE sparsity {sparsity} is on the 0-100 scale; did you mean {float(sparsity) * 100:g}?")


@register("dice", defaults=PUBLISHED_SPARSITY)
class DICE(Detector):
    """DICE: energy of the last layer with only its most contributing weights.

    Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution Detection",
    ECCV 2022. :meth:`fit` computes the mean ID training feature ``m`` (float64 sums over
    row chunks, reduced across ranks) and the mask ``M = [W * m > percentile_p(W * m)]``
    (:func:`dice_mask`); the score is ``logsumexp((W * M) f + b)``, which are also the
    logits the detector classifies with (``changes_logits``).

    Buffers (allocated by :meth:`attach` from ``head.weight``): ``mean_feature`` (D,)
    float64, ``mask`` (C, D) bool, ``contribution_threshold``, ``num_fit_images``. Fitting
    memory: O(D) sums plus the (C, D) float64 contribution matrix (16 MB for ImageNet).
    Changing the sparsity recomputes the mask from the kept mean at once;
    :meth:`set_hyperparameters` still reports it as needing a refit (which gives the same
    mask).

    Deviations from the authors' code (deeplearning-wisc/dice ``models/route.py``): none in
    the math; the mean is an exact float64 mean over all ranks (theirs: one process,
    float64 too).

    Args:
        sparsity: p, the percentile of contributions dropped (CIFAR 90, ImageNet 70).
    """

    name = "dice"
    reads = ("features", "head")
    requires_fit = True
    changes_logits = True
    tuning_grid = {"sparsity": SPARSITY_GRID}
    reported_attributes = ("sparsity",)
    reported_buffers = ("num_fit_images", "contribution_threshold", "kept_weights")

    def __init__(self, sparsity: float = 90.0) -> None:
        super().__init__()
        _check_sparsity(sparsity)
        self.sparsity = float(sparsity)
        self.register_buffer("mean_feature", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("mask", torch.zeros(0, 0, dtype=torch.bool))
        self.register_buffer("contribution_threshold", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("num_fit_images", torch.tensor(0, dtype=torch.long))
        self.register_buffer("kept_weights", torch.tensor(0, dtype=torch.long))
        self.register_buffer("fitted_sparsity", torch.tensor(float(sparsity), dtype=torch.float64))
        self._head: tuple[nn.Module, ...] = ()

    # ------------------------------------------------------------------ set-up
    def skip_reason(self, head: nn.Module, num_blocks: int = 0) -> Optional[str]:
        weight = getattr(head, "weight", None)
        if isinstance(head, nn.Linear) and isinstance(weight, Tensor) and weight.dim() == 2:
            return None
        return (f"DICE masks the weight of a linear head; {type(head).__name__} is not a plain linear "
                "projection (e.g. a prototype/distance head)")

    def attach(self, head: nn.Module, num_blocks: int = 0) -> None:
        """Keep a reference to the head and size the buffers for its (C, D) weight (the fit
        is discarded only when the shape differs, so attaching after loading keeps it)."""
        reason = self.skip_reason(head, num_blocks)
        if reason is not None:
            raise ValueError(reason)
        self._head = (head,)
        classes, dim = head.weight.shape
        if tuple(self.mask.shape) != (classes, dim):
            device = head.weight.device
            self.mean_feature = torch.zeros(dim, dtype=torch.float64, device=device)
            self.mask = torch.zeros(classes, dim, dtype=torch.bool, device=device)
            self.fitted.fill_(False)

    def _require_head(self) -> nn.Module:
        if not self._head:
            raise RuntimeError("dice has no classification head: call attach(head) first")
        return self._head[0]

    # ------------------------------------------------------------------ tuning
    def set_hyperparameters(self, **values: Any) -> bool:
        """``sparsity`` changes the mask: it is recomputed from the kept mean right away
        when the detector is fitted and attached (nothing is stale, ``False``); otherwise
        ``True`` (a fit is needed)."""
        self.check_grid({key: [value] for key, value in values.items()})
        if "sparsity" not in values:
            return False
        _check_sparsity(values["sparsity"])
        changed = float(values["sparsity"]) != float(self.fitted_sparsity)
        self.sparsity = float(values["sparsity"])
        if changed and bool(self.fitted) and self._head:
            self._update_mask()
            return False
        return changed

    def _update_mask(self) -> None:
        mask, threshold = dice_mask(self._require_head().weight, self.mean_feature, self.sparsity)
        self.mask.copy_(mask)
        self.contribution_threshold.fill_(float(threshold))
        self.kept_weights.fill_(int(mask.sum()))
        self.fitted_sparsity.fill_(self.sparsity)

    # ------------------------------------------------------------------ fit / score
    @torch.no_grad()
    def fit(self, data: FitData) -> None:
        """Mean training feature (float64, all ranks), then the mask."""
        _check_sparsity(self.sparsity)
        head = self._require_head()
        dim = head.weight.shape[1]
        if data.features.dim() != 2 or data.features.shape[1] != dim:
            raise ValueError(f"DICE expects fit features of shape (N, {dim}); got {tuple(data.features.shape)}")
        device = self.mean_feature.device
        total = torch.zeros(dim, dtype=torch.float64, device=device)
        for chunk in data.chunks(CHUNK_ROWS):
            check_finite(chunk.features, "DICE fit features")
            total += chunk.features.detach().to(device, torch.float64).sum(dim=0)
        total = all_reduce(total, "sum")
        count = all_reduce(torch.tensor(len(data), dtype=torch.long, device=device), "sum")
        if int(count) == 0:
            raise ValueError("DICE.fit received no training features on any rank")
        self.mean_feature.copy_(total / count)
        self.num_fit_images.fill_(int(count))
        self._update_mask()
        self.sync_from_buffers()
        super().fit(data)

    def masked_weight(self) -> Tensor:
        """``W * M``, the (C, D) sparsified weight."""
        weight = self._require_head().weight
        return weight * self.mask.to(weight.dtype)

    def shaped_logits(self, outputs: ForwardOutputs) -> Tensor:
        head = self._require_head()
        features = outputs.features
        dim = head.weight.shape[1]
        if features.dim() != 2 or features.shape[1] != dim:
            raise ValueError(f"DICE expects features of shape (B, {dim}); got {tuple(features.shape)}")
        check_finite(features, "DICE input features")
        weight = self.masked_weight()
        logits = features.to(weight.dtype) @ weight.t()
        if head.bias is not None:
            logits = logits + head.bias
        return logits.to(torch.promote_types(features.dtype, torch.float32))

    def score(self, outputs: ForwardOutputs) -> Tensor:
        return energy(self.shaped_logits(outputs))

    def extra_repr(self) -> str:
        return f"sparsity={self.sparsity}"
