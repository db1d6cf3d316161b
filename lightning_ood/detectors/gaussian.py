"""Streamed Gaussian statistics of pooled features (shared by the Mahalanobis-type detectors).

Pure helpers, no detector and no registry entry. The class-conditional Gaussians of Lee et
al. (NeurIPS 2018) and the background Gaussian of Ren et al. (arXiv:2106.09022) are both
fitted from three sums that add up over row chunks and over ranks:

* ``counts``: (C,) samples per class ``n_c``;
* ``class_sums``: (C, D) per-class feature sums ``s_c = sum_{y_i = c} f_i``;
* ``outer``: (D, D) ``S = sum_i f_i f_i^T``.

From them (N = sum_c n_c): class means ``mu_c = s_c / n_c``; the tied (shared) covariance
``Sigma = (S - sum_c n_c mu_c mu_c^T) / N = (S - sum_c s_c s_c^T / n_c) / N``; the pooled
mean ``mu_0 = sum_c s_c / N`` and covariance ``Sigma_0 = S / N - mu_0 mu_0^T``. Everything
is float64, so the memory is O(C·D + D²) whatever N is, and summing the sums of shards
gives exactly the statistics of the whole data up to float64 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_ood import distributed
from lightning_ood.detectors.base import FitData
from lightning_ood.detectors.functional import check_finite

#: Largest finite float32: scores are clamped to it before the cast, so a float64 distance
#: of e.g. 1e60 (huge features) gives a finite float32 score.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class GaussianSums:
    """Additive sufficient statistics of class-conditional Gaussians (float64, counts int64).

    Attributes:
        counts: (C,) int64 number of samples of each class.
        class_sums: (C, D) float64 sum of the features of each class.
        outer: (D, D) float64 sum over all samples of ``f f^T``.
    """

    counts: Tensor
    class_sums: Tensor
    outer: Tensor

    @property
    def total(self) -> int:
        """N, the number of samples summed."""
        return int(self.counts.sum())

    def __add__(self, other: "GaussianSums") -> "GaussianSums":
        return GaussianSums(self.counts + other.counts, self.class_sums + other.class_sums,
                            self.outer + other.outer)


def empty_sums(num_classes: int, dim: int, device: Any = None) -> GaussianSums:
    """Zero sums for ``num_classes`` classes of ``dim``-dimensional features."""
    return GaussianSums(torch.zeros(num_classes, dtype=torch.int64, device=device),
                        torch.zeros(num_classes, dim, dtype=torch.float64, device=device),
                        torch.zeros(dim, dim, dtype=torch.float64, device=device))


def check_features(features: Tensor, dim: int, what: str) -> None:
    """``ValueError`` unless ``features`` is a finite floating (B, dim) tensor."""
    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[1] != dim:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"{what} must have shape (B, {dim}) (B samples, D = {dim}); got {shape}")
    if not features.is_floating_point():
        raise ValueError(f"{what} must be floating point; got {features.dtype}")
    check_finite(features, what)


def accumulate(sums: GaussianSums, features: Tensor, labels: Tensor) -> GaussianSums:
    """Add a chunk of labelled features to ``sums`` (in place; also returned).

    Args:
        sums: the running sums (C classes, D dims).
        features: (n, D) finite features.
        labels: (n,) integer class labels in ``[0, C)``.
    """
    num_classes, dim = sums.class_sums.shape
    check_features(features, dim, "fit features")
    if labels.shape != (features.shape[0],) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"fit labels must be an integer tensor of shape ({features.shape[0]},); "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    if labels.numel() == 0:
        return sums
    labels = labels.to(sums.counts.device, torch.int64)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"fit labels must lie in [0, {num_classes}) (the head has {num_classes} "
                         f"classes); got labels in [{low}, {high}]")
    f = features.detach().to(sums.outer.device, torch.float64)
    sums.counts += torch.bincount(labels, minlength=num_classes)
    sums.class_sums.index_add_(0, labels, f)
    sums.outer.addmm_(f.t(), f)
    return sums


def reduce_sums(sums: GaussianSums) -> GaussianSums:
    """The sums of every rank added up (three ``all_reduce`` calls; a copy on one process).
    A collective: every rank calls it, or none."""
    return GaussianSums(distributed.all_reduce(sums.counts, "sum"),
                        distributed.all_reduce(sums.class_sums, "sum"),
                        distributed.all_reduce(sums.outer, "sum"))


def stream_sums(data: FitData, num_classes: int, dim: int, rows: int = 4096,
                device: Any = None) -> GaussianSums:
    """The sums of ``data`` (labels required) over every rank, read in chunks of ``rows``.

    Raises:
        ValueError: no labels, wrong shapes, non-finite features, labels out of range, or
            no sample on any rank.
    """
    if data.labels is None:
        raise ValueError("class-conditional Gaussian fitting needs FitData.labels (the ID training labels)")
    if data.labels.shape != (len(data),):
        raise ValueError(f"FitData.labels must have shape ({len(data)},); got {tuple(data.labels.shape)}")
    sums = empty_sums(num_classes, dim, device)
    for chunk in data.chunks(rows):
        accumulate(sums, chunk.features, chunk.labels)
    sums = reduce_sums(sums)
    if sums.total == 0:
        raise ValueError("class-conditional Gaussian fitting received no training features on any rank")
    return sums


def class_means(sums: GaussianSums) -> Tensor:
    """(C, D) float64 class means ``s_c / n_c``; zero rows for classes without samples."""
    return sums.class_sums / sums.counts.clamp_min(1).unsqueeze(1).to(torch.float64)


def tied_covariance(sums: GaussianSums) -> Tensor:
    """(D, D) float64 shared covariance ``(S - sum_c s_c s_c^T / n_c) / N`` (divisor N,
    as sklearn's ``EmpiricalCovariance``), symmetrised."""
    means = class_means(sums)
    between = (means * sums.counts.unsqueeze(1).to(torch.float64)).t() @ means
    cov = (sums.outer - between) / max(sums.total, 1)
    return (cov + cov.t()) / 2


def pooled_moments(sums: GaussianSums) -> tuple[Tensor, Tensor]:
    """Mean (D,) and covariance (D, D) of all samples pooled, ignoring labels (divisor N)."""
    n = max(sums.total, 1)
    mean = sums.class_sums.sum(0) / n
    cov = sums.outer / n - torch.outer(mean, mean)
    return mean, (cov + cov.t()) / 2


def stable_pinv(cov: Tensor, scale: Optional[float] = None) -> Tensor:
    """Pseudo-inverse of a symmetric PSD matrix by eigen-decomposition (float64).

    Eigenvalues ``<= D * eps64 * max(largest eigenvalue, scale)`` count as zero (their
    inverse is 0), as ``scipy.linalg.pinvh`` does (used by sklearn's ``EmpiricalCovariance
    .precision_``) with the extra floor ``scale``: pass the largest raw second moment
    ``max diag(S / N)`` so that directions whose variance is at the rounding level of the
    streamed subtraction ``S/N - mu mu^T`` (e.g. constant features) are dropped instead of
    being inverted into ~1e16.

    Args:
        cov: (D, D) symmetric matrix.
        scale: optional magnitude floor for the cut-off (see above).

    Returns:
        (D, D) float64 symmetric precision matrix.
    """
    cov = cov.to(torch.float64)
    dim = cov.shape[0]
    if dim == 0:
        return cov.clone()
    values, vectors = torch.linalg.eigh((cov + cov.t()) / 2)
    top = max(float(values.max()), float(scale or 0.0), 0.0)
    cutoff = dim * torch.finfo(torch.float64).eps * top
    keep = values > cutoff
    inverse = torch.where(keep, 1.0 / torch.where(keep, values, torch.ones_like(values)), 0.0)
    precision = (vectors * inverse) @ vectors.t()
    return (precision + precision.t()) / 2


def raw_second_moment_scale(sums: GaussianSums) -> float:
    """``max diag(S / N)``, the floor passed to :func:`stable_pinv`."""
    return float(sums.outer.diagonal().max()) / max(sums.total, 1) if sums.outer.numel() else 0.0


def quadratic_parts(precision: Tensor, means: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
    """Precomputed parts of ``(f - mu_c)^T P (f - mu_c)`` about a centre ``m``.

    With ``g = f - m`` and ``nu_c = mu_c - m`` the distance is
    ``g^T P g - 2 g^T (P nu_c) + nu_c^T P nu_c``; this returns ``P nu_c`` as (C, D) and
    ``nu_c^T P nu_c`` as (C,) (float64). Centring at the training mean keeps the three
    terms small, so their difference does not cancel catastrophically.
    """
    nu = means.to(torch.float64) - center.to(torch.float64)
    projected = nu @ precision.to(torch.float64)  # P symmetric: rows are (P nu_c)^T
    return projected, (projected * nu).sum(1)


def squared_mahalanobis(features: Tensor, center: Tensor, precision: Tensor, projected: Tensor,
                        constants: Tensor) -> Tensor:
    """(B, C) float64 squared Mahalanobis distances of every sample to every class mean,
    from :func:`quadratic_parts`, without forming a (B, C, D) tensor. Clamped at 0 (the
    expanded form can round slightly below)."""
    g = features.to(torch.float64) - center.to(torch.float64)
    own = ((g @ precision.to(torch.float64)) * g).sum(1, keepdim=True)
    return (own - 2.0 * (g @ projected.t()) + constants.unsqueeze(0)).clamp_min(0.0)


def squared_norm_in(features: Tensor, center: Tensor, precision: Tensor) -> Tensor:
    """(B,) float64 ``(f - m)^T P (f - m)``, clamped at 0."""
    g = features.to(torch.float64) - center.to(torch.float64)
    return ((g @ precision.to(torch.float64)) * g).sum(1).clamp_min(0.0)


def to_float32_score(score: Tensor) -> Tensor:
    """float64 scores clamped to the finite float32 range and cast to float32."""
    return score.clamp(-FLOAT32_MAX, FLOAT32_MAX).to(torch.float32)


def head_dimensions(head: nn.Module) -> tuple[Optional[int], Optional[int]]:
    """(C, D) of a classification head, read from ``out_features``/``num_classes`` and
    ``in_features``, else from the shape of ``weight`` or ``prototypes`` (C, D); ``None``
    for what cannot be found."""
    classes = getattr(head, "out_features", None) or getattr(head, "num_classes", None)
    dim = getattr(head, "in_features", None)
    for attr in ("weight", "prototypes"):
        matrix = getattr(head, attr, None)
        if isinstance(matrix, Tensor) and matrix.dim() == 2:
            classes = classes or int(matrix.shape[0])
            dim = dim or int(matrix.shape[1])
            break
    ok = lambda v: int(v) if isinstance(v, int) and v > 0 else None
    return ok(classes), ok(dim)


def head_dimensions_reason(head: nn.Module) -> Optional[str]:
    """Why the number of classes or the feature width of ``head`` is unknown, or ``None``."""
    classes, dim = head_dimensions(head)
    if classes is None or dim is None:
        return (f"cannot tell the number of classes C and feature width D of the head "
                f"{type(head).__name__}: it has no out_features/num_classes, in_features, or a 2-D "
                "weight/prototypes (C, D)")
    return None
