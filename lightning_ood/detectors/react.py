"""ReAct: rectified (clipped) penultimate activations, scored with the energy."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ood.detectors.base import Detector, FitData, ForwardOutputs
from lightning_ood.detectors.functional import check_finite, energy, shaped_head_logits
from lightning_ood.detectors.registry import register
from lightning_ood.distributed import all_gather_rows

#: Clipping percentiles tried by the tuning (OpenOOD's sweep 85-99, plus 80).
PERCENTILE_GRID: tuple[float, ...] = (80.0, 85.0, 90.0, 95.0, 99.0)


def linear_percentile(values: Tensor, percentile: float) -> Tensor:
    """The ``percentile``-th percentile of all entries of ``values``, exactly as
    ``numpy.percentile(values.numpy(), percentile)`` (default "linear" method) computes
    it for a Python-number ``percentile``.

    With ``n`` values sorted as ``v``, ``h = (n - 1) * (percentile / 100)`` (float64),
    ``a = v[floor(h)]``, ``b = v[floor(h) + 1]`` and ``t = h - floor(h)``; the result is
    ``a + (b - a) * t`` for ``t < 1/2`` and ``b - (b - a) * (1 - t)`` otherwise, evaluated
    in the dtype of ``values`` (as NumPy 2 does for a Python-number percentile), and
    ``v[n - 1]`` when ``h >= n - 1``. The two order statistics come from
    ``torch.kthvalue`` (no size limit, unlike ``torch.quantile``'s 2**24 elements; it
    copies the input once).

    Args:
        values: floating-point tensor of any shape with at least one entry.
        percentile: on the 0-100 scale.

    Returns:
        0-d tensor of ``values``' dtype on its device.
    """
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be on the 0-100 scale; got {percentile}")
    if not values.is_floating_point():
        raise TypeError(f"linear_percentile expects floating-point values; got {values.dtype}")
    flat = values.reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("linear_percentile needs at least one value")
    h = (n - 1) * (float(percentile) / 100.0)
    if h >= n - 1:
        return flat.max()
    lo = math.floor(h)
    t = h - lo
    a = flat.kthvalue(lo + 1).values
    b = flat.kthvalue(lo + 2).values
    diff = b - a
    if t >= 0.5:
        return b - diff * torch.tensor(1.0 - t, dtype=flat.dtype, device=flat.device)
    return a + diff * torch.tensor(t, dtype=flat.dtype, device=flat.device)


def _check_percentile(percentile: float) -> None:
    if not 0.0 < float(percentile) <= 100.0:
        raise ValueError(f"ReAct percentile must be on the 0-100 scale, in (0, 100] (e.g. 90, not 0.9); got {percentile}")
    if float(percentile) <= 1.0:
        raise ValueError(f"ReAct percentile {percentile} is on the 0-100 scale; did you mean {float(percentile) * 100:g}?")


@register("react", defaults={"*": {"percentile": 90.0}, "imagenet": {"percentile": 90.0}})
class ReAct(Detector):
    """ReAct: clip the pooled features at an ID percentile, score the energy of the head.

    Sun, Guo, Li, "ReAct: Out-of-distribution Detection With Rectified Activations",
    NeurIPS 2021. :meth:`fit` sets the threshold ``c`` to the ``percentile``-th percentile
    of every value of the ID training features (all samples and units flattened together,
    :func:`linear_percentile`, NumPy's linear interpolation); the score is
    ``logsumexp(head(min(f, c)))``. The clipped logits are also what the detector
    classifies with (``changes_logits``).

    Fitting gathers every rank's features (:func:`~lightning_ood.distributed.all_gather_rows`),
    so the threshold is the exact percentile over all ranks: memory ``N x D`` values on
    every rank (N = all fit samples, bounded by the evaluation's ``fit_samples``), plus one
    copy inside ``kthvalue``. The threshold is a float64 buffer (``threshold``), read
    directly by :meth:`score`, so checkpoints carry it and the score traces.

    Deviations from the authors' code (deeplearning-wisc/react):

    * the percentile is taken over the ID *training* features the evaluation fits on (the
      authors' ``compute_threshold.py`` uses about 2,000 ImageNet validation images; the
      paper speaks of "ID data");
    * a percentile change needs a refit (the activations are not kept after fitting).

    Args:
        percentile: clipping percentile on the 0-100 scale (paper: 90).
    """

    name = "react"
    reads = ("features", "head")
    requires_fit = True
    changes_logits = True
    tuning_grid = {"percentile": PERCENTILE_GRID}
    reported_attributes = ("percentile",)
    reported_buffers = ("threshold", "num_fit_images")

    def __init__(self, percentile: float = 90.0) -> None:
        super().__init__()
        _check_percentile(percentile)
        self.percentile = float(percentile)
        self.register_buffer("threshold", torch.tensor(float("inf"), dtype=torch.float64))
        self.register_buffer("fitted_percentile", torch.tensor(float(percentile), dtype=torch.float64))
        self.register_buffer("num_fit_images", torch.tensor(0, dtype=torch.long))
        self._head: tuple[nn.Module, ...] = ()
        self._threshold = float("inf")

    def attach(self, head: nn.Module, num_blocks: int = 0) -> None:
        self._head = (head,)

    def sync_from_buffers(self) -> None:
        self._threshold = float(self.threshold)

    def set_hyperparameters(self, **values: Any) -> bool:
        self.check_grid({key: [value] for key, value in values.items()})
        if "percentile" not in values:
            return False
        _check_percentile(values["percentile"])
        changed = float(values["percentile"]) != float(self.fitted_percentile)
        self.percentile = float(values["percentile"])
        return changed

    def _check_features(self, features: Tensor, what: str) -> None:
        width = getattr(self._head[0], "in_features", None) if self._head else None
        if features.dim() != 2 or (width is not None and features.shape[1] != width):
            expected = f"(N, {width})" if width is not None else "(N, D)"
            raise ValueError(f"ReAct expects {what} of shape {expected}; got {tuple(features.shape)}")
        check_finite(features, f"ReAct {what}")

    @torch.no_grad()
    def fit(self, data: FitData) -> None:
        """Threshold = the percentile of all ID training feature values, over all ranks."""
        _check_percentile(self.percentile)
        self._check_features(data.features, "fit features")
        gathered = all_gather_rows(data.features.detach())
        count = int(gathered.shape[0])
        if count == 0 or gathered.shape[1] == 0:
            raise ValueError("ReAct.fit received no training features on any rank")
        threshold = linear_percentile(gathered, self.percentile)
        del gathered
        self.threshold.fill_(float(threshold))
        self.fitted_percentile.fill_(self.percentile)
        self.num_fit_images.fill_(count)
        self.sync_from_buffers()
        super().fit(data)

    def shaped_logits(self, outputs: ForwardOutputs) -> Tensor:
        if not self._head:
            raise RuntimeError("react has no classification head: call attach(head) first")
        features = outputs.features
        self._check_features(features, "features")
        threshold = self.threshold.to(features.dtype)
        return shaped_head_logits(self._head[0], features, lambda rows: rows.clamp(max=threshold))

    def score(self, outputs: ForwardOutputs) -> Tensor:
        return energy(self.shaped_logits(outputs))

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}, threshold={self._threshold}"
