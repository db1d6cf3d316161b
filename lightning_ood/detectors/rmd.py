"""Relative Mahalanobis distance: class Gaussians relative to one background Gaussian."""
from __future__ import annotations

import torch
from torch import Tensor

from lightning_ood.detectors import gaussian
from lightning_ood.detectors.base import FitData, ForwardOutputs
from lightning_ood.detectors.mahalanobis import Mahalanobis
from lightning_ood.detectors.registry import register


@register("rmd", aliases=("rmds", "relative_mahalanobis"))
class RelativeMahalanobis(Mahalanobis):
    """Relative Mahalanobis distance (RMD).

    Ren, Fort, Liu, Roy, Padhy, Lakshminarayanan, "A Simple Fix to Mahalanobis Distance
    for Improving Near-OOD Detection", arXiv:2106.09022 (2021). With ``MD_c`` the squared
    Mahalanobis distance to class c under the shared covariance (as :class:`Mahalanobis`)
    and ``MD_0`` the one to a background Gaussian ``N(mu_0, Sigma_0)`` fitted to all
    training features pooled (labels ignored),
    ``RMD_c(f) = MD_c(f) - MD_0(f)`` and the score is ``-min_c RMD_c(f)`` (higher = ID).

    Same streamed float64 sums as :class:`Mahalanobis` (one pass: the background mean and
    covariance come from the same sums, ``Sigma_0 = S/N - mu_0 mu_0^T``). Extra buffer:
    ``background_precision`` (D, D) float64 (33.6 MB for D = 2048); the background mean is
    ``center``.

    Deviations from the authors' description / OpenOOD's ``rmds``: those of
    :class:`Mahalanobis` (pseudo-inverse cut-off, streamed covariance, classes without
    samples left out).

    Args:
        chunk_rows: training rows read at once during :meth:`fit`.
    """

    name = "rmd"

    def _persistent_buffers(self) -> tuple[str, ...]:
        return (*super()._persistent_buffers(), "background_precision")

    def _shapes(self, classes: int, dim: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {**super()._shapes(classes, dim), "background_precision": ((dim, dim), torch.float64)}

    @torch.no_grad()
    def fit(self, data: FitData) -> None:
        """Fit the class Gaussians and the background Gaussian (one streamed pass)."""
        sums = self._fit_gaussians(data)
        _, cov = gaussian.pooled_moments(sums)
        self.background_precision.copy_(gaussian.stable_pinv(cov, gaussian.raw_second_moment_scale(sums)))
        self.sync_from_buffers()
        self.fitted.fill_(True)

    def score(self, outputs: ForwardOutputs) -> Tensor:
        d2 = self.class_distances(outputs.features)
        background = gaussian.squared_norm_in(outputs.features, self.center, self.background_precision)
        return gaussian.to_float32_score(background - d2.amin(dim=1))
