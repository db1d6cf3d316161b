"""WeiPer: OOD detection with weight perturbations of the class projections.

Granz, Heurich, Landgraf, "WeiPer: OOD Detection using Weight Perturbations of Class
Projections", NeurIPS 2024 (arXiv:2405.17164).

The last layer's class projections ``w_c`` are perturbed ``r`` times into a cone around
them (``w~ = w_c + delta * ||w_c|| * n / ||n||`` with ``n ~ N(0, I)``), giving the stacked
matrix ``W~`` (rC x D) and bias ``b~`` (b repeated r times). For every sample two
histograms are taken over the values *inside one vector*: the D entries of the feature
``z`` and the rC entries of ``W~ z + b~``. Each is compared with the mean training
histogram by a symmetric KL divergence, and the mean max-softmax over the r perturbed heads
is added:

    S(z) = -( D_z + lambda1 * D_W~z - lambda2 * MSP_W~ )      (higher = in-distribution)

Conventions (see the class docstring for the details that differ from the authors' code):

* bins: ``n_bins`` equal bins on the global training ``[min, max]`` of each space, each
  left-closed except the last, which is closed (the value ``max`` counts, as in
  ``torch.histc``); values outside fall in two overflow bins that are dropped; every
  histogram is divided by its value count (D or rC), so it may sum to less than 1;
* the test histogram (never the training mean) is smoothed by a box kernel of width
  ``s`` with "same" output length and replicate padding, padded like PyTorch's
  ``Conv1d(padding="same")``: ``(s - 1) // 2`` bins on the left and the rest on the right;
* ``eps`` is added to the smoothed test histogram and to the training mean, both are
  renormalised to sum 1, and ``D(P, Q) = KL(P||Q) + KL(Q||P)`` with P the training mean.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from lightning_ood import distributed
from lightning_ood.detectors.base import Detector, FitData, ForwardOutputs
from lightning_ood.detectors.functional import check_finite
from lightning_ood.detectors.registry import register

Features = Union[Tensor, Iterable[Tensor]]

#: Hyper-parameters of the authors' README (r, delta, bins, lambda1, lambda2, s1, s2).
PRESETS: dict[str, dict[str, float]] = {
    "cifar10": dict(n_repeats=100, delta=1.8, n_bins=100, lambda1=2.5, lambda2=0.1,
                    smoothing=4, smoothing_perturbed=15),
    "cifar100": dict(n_repeats=100, delta=2.4, n_bins=100, lambda1=0.1, lambda2=1.0,
                     smoothing=4, smoothing_perturbed=40),
    "imagenet": dict(n_repeats=100, delta=2.4, n_bins=100, lambda1=2.5, lambda2=0.25,
                     smoothing=40, smoothing_perturbed=15),
}

#: Tuning grid: brackets the authors' three presets (CIFAR-10, CIFAR-100, ImageNet).
GRID: dict[str, tuple[float, ...]] = {
    "delta": (1.8, 2.4),
    "lambda1": (0.1, 1.0, 2.5),
    "lambda2": (0.1, 0.25, 1.0),
    "smoothing": (4, 40),
    "smoothing_perturbed": (15, 40),
}

#: Samples processed at once when ``chunk_size`` is not given.
_CHUNK_ROWS = 512
#: Perturbed logits (rows x columns) materialised at once; W~ is used in column blocks of
#: whole repeats so that ImageNet-sized heads (rC = 100,000) stay within ~8 MB per block.
_BLOCK_VALUES = 1 << 21
#: Below this many classes the per-head softmax is reduced over a transposed copy (faster).
_SMALL_HEAD = 32


def bin_scale(lo: float, hi: float, n_bins: int) -> float:
    """Largest float32 factor ``s`` with ``float32(float32(hi - lo) * s) < n_bins``.

    Multiplying ``values - lo`` by it puts ``hi`` itself into the last bin without a
    separate comparison (0 when ``hi <= lo``: everything in range lands in bin 0).
    """
    if hi <= lo:
        return 0.0
    span = torch.tensor(hi, dtype=torch.float32) - torch.tensor(lo, dtype=torch.float32)
    scale = torch.tensor(min(n_bins / span.item(), torch.finfo(torch.float32).max))
    while (span * scale).item() >= n_bins:
        scale = torch.nextafter(scale, torch.zeros(()))
    return scale.item()


def bin_indices(values: Tensor, lo: float, hi: float, n_bins: int) -> Tensor:
    """Bin index of every value on ``n_bins`` equal bins of ``[lo, hi]``.

    ``floor((v - lo) * bin_scale(lo, hi, n_bins))`` in float32: bins are left-closed and
    the last one is closed (``hi`` itself lands in bin ``n_bins - 1``, as in
    ``torch.histc``). Values below ``lo`` get -1 and values above ``hi`` get ``n_bins``
    (the two overflow bins). ``lo`` and ``hi`` are exact; a value within float32 rounding
    of an interior edge (or a few ulps above ``hi``) may land on either side, as with the
    authors' float32 edges.

    Args:
        values: float32 tensor of any shape (finite values).
        lo: lower edge (a float32 value).
        hi: upper edge (a float32 value, ``>= lo``).
        n_bins: number of bins.

    Returns:
        Float tensor of the same shape holding integral indices in ``[-1, n_bins]``.
    """
    return scaled_bin_indices(values, lo, bin_scale(lo, hi, n_bins), n_bins)


def scaled_bin_indices(values: Tensor, lo: float, scale: float, n_bins: int) -> Tensor:
    """:func:`bin_indices` with the factor of :func:`bin_scale` computed beforehand
    (plain arithmetic on Python numbers, so it traces with ``torch.export``)."""
    return (values - lo).mul_(scale).floor_().clamp_(-1.0, float(n_bins))


def bin_counts(values: Tensor, lo: float, hi: float, n_bins: int) -> Tensor:
    """Per-row bin counts of the values inside each row (overflow dropped).

    Args:
        values: (B, V) values; row i gives histogram i.
        lo: lower edge of the bins.
        hi: upper edge of the bins.
        n_bins: number of bins.

    Returns:
        (B, n_bins) int64 counts; divide by V for WeiPer's histograms.
    """
    return scaled_bin_counts(values, lo, bin_scale(lo, hi, n_bins), n_bins)


def scaled_bin_counts(values: Tensor, lo: float, scale: float, n_bins: int) -> Tensor:
    """:func:`bin_counts` with a precomputed :func:`bin_scale` factor.

    Eagerly one ``bincount`` over row-offset indices (4-5x faster than a scatter for
    thousands of values per row); under ``torch.export``, whose programs need a static
    output size, the same counts by ``scatter_add`` into ``n_bins + 2`` slots per row.
    """
    rows = values.shape[0]
    slots = n_bins + 2
    idx = scaled_bin_indices(values, lo, scale, n_bins).add_(1.0)
    if torch.compiler.is_exporting():
        idx = idx.long()
        counts = torch.zeros(rows, slots, dtype=torch.int64, device=values.device)
        return counts.scatter_add_(1, idx, torch.ones_like(idx))[:, 1:-1]
    offsets = torch.arange(0, rows * slots, slots, device=values.device, dtype=torch.int32)
    idx = idx.to(torch.int32).add_(offsets.unsqueeze(1))
    counts = torch.bincount(idx.view(-1), minlength=rows * slots).view(rows, slots)
    return counts[:, 1:-1]


def box_smoothing_matrix(n_bins: int, width: int) -> Tensor:
    """(n_bins, n_bins) matrix M with ``hist @ M`` = moving average of width ``width``,
    "same" length, replicate padding.

    Pads like ``torch.nn.Conv1d(padding="same", padding_mode="replicate")`` (the authors'
    smoothing layer): ``(width - 1) // 2`` bins on the left and the rest on the right, so an
    even width reaches one bin further right than left.

    Args:
        n_bins: histogram length.
        width: kernel width (>= 1).

    Returns:
        float32 matrix; entry (j, k) is the weight of input bin j in output bin k.
    """
    left = (width - 1) // 2
    sources = (torch.arange(n_bins).unsqueeze(1) - left + torch.arange(width)).clamp_(0, n_bins - 1)
    targets = torch.arange(n_bins).unsqueeze(1).expand_as(sources)
    matrix = torch.zeros(n_bins, n_bins)
    matrix.index_put_((sources.reshape(-1), targets.reshape(-1)),
                      torch.full((sources.numel(),), 1.0 / width), accumulate=True)
    return matrix


def symmetric_kl(train_hist: Tensor, test_hist: Tensor, eps: float) -> Tensor:
    """Symmetric KL between the training mean and each (already smoothed) test histogram.

    ``P = norm(train_hist + eps)``, ``Q = norm(test_hist + eps)`` and
    ``D = KL(P||Q) + KL(Q||P) = sum (P - Q)(log P - log Q)``.

    Args:
        train_hist: (n,) mean training histogram (not smoothed).
        test_hist: (B, n) smoothed per-sample test histograms.
        eps: added to both before renormalising.

    Returns:
        (B,) divergences.
    """
    p = train_hist + eps
    p = p / p.sum()
    q = test_hist + eps
    q = q.div_(q.sum(dim=1, keepdim=True))
    return ((p - q) * (p.log() - q.log())).sum(dim=1)


def perturbed_msp_sum(logits: Tensor, n_classes: int) -> Tensor:
    """Sum over the stacked heads in ``logits`` of each head's max softmax probability.

    Args:
        logits: (B, k * C) outputs of k perturbed heads, head-major (head i = columns
            ``i*C:(i+1)*C``).
        n_classes: C.

    Returns:
        (B,) sums of the k max-softmax values.
    """
    grouped = logits.view(logits.shape[0], -1, n_classes)
    if n_classes < _SMALL_HEAD:
        grouped = grouped.transpose(1, 2).contiguous()
        shifted = grouped - grouped.amax(dim=1, keepdim=True)
        return shifted.exp_().sum(dim=1).reciprocal_().sum(dim=1)
    return torch.softmax(grouped, dim=2).amax(dim=2).sum(dim=1)


def draw_perturbed_head(weight: Tensor, bias: Optional[Tensor], n_repeats: int, delta: float,
                        seed: int) -> tuple[Tensor, Tensor]:
    """``(W~, b~)`` on the CPU in float32: ``n_repeats`` perturbations of every class
    projection, ``w_c + delta * ||w_c|| * n / ||n||`` with ``n ~ N(0, I)`` drawn by a local
    generator seeded with ``seed`` (row ``i * C + c`` is perturbation i of class c), and the
    bias repeated ``n_repeats`` times. Deterministic: the same arguments give the same bits.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be (C, D), got shape {tuple(weight.shape)}")
    classes, dim = weight.shape
    w = weight.detach().to("cpu", torch.float32)
    b = torch.zeros(classes) if bias is None else bias.detach().to("cpu", torch.float32)
    if b.shape != (classes,):
        raise ValueError(f"bias must be ({classes},), got shape {tuple(b.shape)}")
    generator = torch.Generator().manual_seed(seed)
    perturbed = torch.randn(n_repeats, classes, dim, generator=generator)
    perturbed.div_(perturbed.norm(dim=2, keepdim=True).clamp_(min=1e-12))
    perturbed.mul_(w.norm(dim=1, keepdim=True).mul_(delta)).add_(w)
    return perturbed.view(n_repeats * classes, dim), b.repeat(n_repeats)


@register("weiper", default=True,
          defaults={"*": PRESETS["cifar10"], "cifar100": PRESETS["cifar100"], "imagenet": PRESETS["imagenet"]})
class WeiPer(Detector):
    """WeiPer+KLD detector (Granz et al., NeurIPS 2024, arXiv:2405.17164).

    ``W~`` is drawn once from ``seed`` with a local generator (global RNG untouched) and
    kept as buffers, together with the fitted statistics, so that strict
    ``load_state_dict`` restores the detector exactly. Row ``i * C + c`` of
    ``perturbed_weight`` is the i-th perturbation of class c (``view(r, C, D)[i]`` is head
    i). For ImageNet (r = 100, C = 1000, D = 2048) the buffer takes 819 MB (781 MiB) in float32.
    Fitting streams over the training features twice (global min/max, then summed bin
    counts) and reduces across ranks, so memory does not grow with N and 1 or N ranks give
    identical state.

    Differences from the authors' code (mgranz/weiper), all deliberate:

    * one seeded ``W~`` for fit and test (theirs silently redraws it for every batch);
    * histograms are divided by the exact value count; theirs, for vectors longer than
      1000 values, averages per-1000-value chunk means, over-weighting a short last chunk
      (ImageNet z-space: D = 2048 -> chunks 1000, 1000, 48);
    * the training mean is the exact mean over samples (theirs is a mean of per-batch means);
    * the value equal to the training max counts in the last bin (theirs puts the top edge
      at ``max + 1e-8`` in float32, which rounds to ``max`` for ``|max| > ~0.17`` and then
      drops that value as overflow);
    * non-finite features raise ``ValueError`` instead of silently vanishing from the bins.

    Args:
        weight: (C, D) class projections of the linear head, or ``None`` to take them
            from the head passed to :meth:`attach`.
        bias: (C,) bias, or ``None`` (zeros when ``weight`` is given).
        n_repeats: r, number of perturbed copies of the head.
        delta: relative perturbation length.
        n_bins: histogram bins per space.
        lambda1: weight of the perturbed-space divergence.
        lambda2: weight of the perturbed MSP.
        smoothing: box width s1 for the feature-space test histogram.
        smoothing_perturbed: box width s2 for the perturbed-space test histogram.
        eps_z: epsilon of the feature-space divergence.
        eps_perturbed: epsilon of the perturbed-space divergence.
        seed: seed of the local generator drawing ``W~``.
        chunk_size: samples processed at once (``None``: 512). ``W~`` is applied in
            column blocks of whole repeats so one block holds at most ~2M logits.
    """

    name = "weiper"
    reads = ("features", "head")
    requires_fit = True
    tuning_grid = GRID
    reported_attributes = ("n_repeats", "delta", "n_bins", "lambda1", "lambda2", "smoothing",
                           "smoothing_perturbed", "seed")
    reported_buffers = ("n_train",)

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
        n_repeats: int = 100,
        delta: float = 1.8,
        n_bins: int = 100,
        lambda1: float = 2.5,
        lambda2: float = 0.1,
        smoothing: int = 4,
        smoothing_perturbed: int = 15,
        eps_z: float = 0.01,
        eps_perturbed: float = 0.025,
        seed: int = 0,
        chunk_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        for label, value in (("n_repeats", n_repeats), ("n_bins", n_bins),
                             ("smoothing", smoothing),
                             ("smoothing_perturbed", smoothing_perturbed)):
            if int(value) != value or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if delta < 0 or eps_z <= 0 or eps_perturbed <= 0:
            raise ValueError("delta must be >= 0 and eps_z, eps_perturbed > 0")
        self.n_repeats = int(n_repeats)
        self.delta = float(delta)
        self.n_bins = int(n_bins)
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.smoothing = int(smoothing)
        self.smoothing_perturbed = int(smoothing_perturbed)
        self.eps_z = float(eps_z)
        self.eps_perturbed = float(eps_perturbed)
        self.seed = int(seed)
        self.chunk_size = chunk_size
        self._bins: Optional[tuple[float, float, float, float]] = None  # z lo/scale, W~z lo/scale
        for buffer in ("perturbed_weight", "perturbed_bias", "z_range", "wz_range",
                       "train_hist_z", "train_hist_wz", "n_train"):
            self.register_buffer(buffer, None)
        self.register_buffer("smooth_z", box_smoothing_matrix(self.n_bins, self.smoothing),
                             persistent=False)
        self.register_buffer("smooth_wz",
                             box_smoothing_matrix(self.n_bins, self.smoothing_perturbed),
                             persistent=False)
        if weight is not None:
            self._allocate(weight, bias)
        elif bias is not None:
            raise ValueError("bias given without weight")

    @classmethod
    def from_preset(
        cls,
        preset: str,
        weight: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
        seed: int = 0,
        **overrides: Any,
    ) -> "WeiPer":
        """WeiPer with the authors' hyper-parameters for ``cifar10``, ``cifar100`` or
        ``imagenet`` (ResNet18 / ResNet18 / ResNet50); ``overrides`` replace any of them."""
        if preset not in PRESETS:
            raise ValueError(f"unknown WeiPer preset {preset!r}; valid: {sorted(PRESETS)}")
        return cls(weight, bias, seed=seed, **{**PRESETS[preset], **overrides})

    # ------------------------------------------------------------------ set-up
    def _allocate(self, weight: Tensor, bias: Optional[Tensor]) -> None:
        """Draw ``W~`` from ``seed`` and allocate the fitted-state buffers."""
        perturbed_weight, perturbed_bias = draw_perturbed_head(weight, bias, self.n_repeats, self.delta, self.seed)
        # kept (unregistered) so set_hyperparameters can redraw W~ for another delta
        self._source = (weight.detach(), None if bias is None else bias.detach())
        device = weight.device
        self.perturbed_weight = perturbed_weight.to(device)
        self.perturbed_bias = perturbed_bias.to(device)
        self.z_range = torch.zeros(2, device=device)
        self.wz_range = torch.zeros(2, device=device)
        self.train_hist_z = torch.zeros(self.n_bins, device=device)
        self.train_hist_wz = torch.zeros(self.n_bins, device=device)
        self.n_train = torch.zeros((), dtype=torch.int64, device=device)
        self.smooth_z = self.smooth_z.to(device)
        self.smooth_wz = self.smooth_wz.to(device)
        self.fitted.fill_(False)
        self._bins = None

    def sync_from_buffers(self) -> None:
        """Bin edges as Python numbers (what :meth:`score_features` reads)."""
        if self.z_range is None or self.wz_range is None:
            self._bins = None
            return
        z_lo, z_hi = self.z_range.tolist()
        w_lo, w_hi = self.wz_range.tolist()
        self._bins = (z_lo, bin_scale(z_lo, z_hi, self.n_bins), w_lo, bin_scale(w_lo, w_hi, self.n_bins))

    def regenerable_buffers(self, head: nn.Module) -> dict[str, Tensor]:
        """``W~, b~`` as :meth:`attach` draws them from ``head`` and the seed."""
        if self.perturbed_weight is None or not isinstance(head, nn.Linear):
            return {}
        drawn = draw_perturbed_head(head.weight, head.bias, self.n_repeats, self.delta, self.seed)
        return dict(zip(("perturbed_weight", "perturbed_bias"), drawn))

    def skip_reason(self, head: nn.Module, num_blocks: int = 0) -> Optional[str]:
        if isinstance(head, nn.Linear):
            return None
        return (f"WeiPer perturbs the rows of a linear head's weight; {type(head).__name__} "
                "is not a plain linear projection (e.g. a prototype/distance head)")

    def attach(self, head: nn.Module, num_blocks: int = 0) -> None:
        """Draw ``W~`` from ``head.weight``/``head.bias`` unless it exists already (then
        only the shapes are checked)."""
        reason = self.skip_reason(head, num_blocks)
        if reason is not None:
            raise ValueError(reason)
        if self.perturbed_weight is None:
            self._allocate(head.weight, head.bias)
            return
        expected = (self.perturbed_weight.shape[0] // self.n_repeats,
                    self.perturbed_weight.shape[1])
        if tuple(head.weight.shape) != expected:
            raise ValueError(f"head weight {tuple(head.weight.shape)} does not match the "
                             f"(C, D) = {expected} this WeiPer was built for")

    def set_hyperparameters(self, **values: float) -> bool:
        """Change hyper-parameters in place (used by :mod:`lightning_ood.evaluation.tuning`).

        Returns ``True`` when the training statistics are now stale and :meth:`fit` must
        run again: ``delta``, ``n_repeats`` or ``seed`` redraw ``W~`` from the same head,
        ``n_bins`` changes the histograms. The lambdas, smoothing widths and epsilons only
        change scoring.
        """
        types = {"delta": float, "n_repeats": int, "n_bins": int, "seed": int, "lambda1": float,
                 "lambda2": float, "smoothing": int, "smoothing_perturbed": int, "eps_z": float,
                 "eps_perturbed": float}
        unknown = set(values) - set(types)
        if unknown:
            raise ValueError(f"unknown WeiPer hyper-parameters {sorted(unknown)}; valid: {sorted(types)}")
        changed = {k for k, v in values.items() if getattr(self, k) != types[k](v)}
        for key in changed:
            setattr(self, key, types[key](values[key]))
        device = self.smooth_z.device
        if "n_bins" in changed:
            self.sync_from_buffers()
        if changed & {"n_bins", "smoothing"}:
            self.smooth_z = box_smoothing_matrix(self.n_bins, self.smoothing).to(device)
        if changed & {"n_bins", "smoothing_perturbed"}:
            self.smooth_wz = box_smoothing_matrix(self.n_bins, self.smoothing_perturbed).to(device)
        refit = bool(changed & {"delta", "n_repeats", "n_bins", "seed"})
        if refit and self.perturbed_weight is not None:
            self._allocate(*self._source)
        return refit

    # ------------------------------------------------------------------ helpers
    def _require_allocated(self) -> None:
        if self.perturbed_weight is None:
            raise RuntimeError("WeiPer has no class projections: pass weight= or call attach()")

    def _rows_per_chunk(self) -> int:
        return self.chunk_size or _CHUNK_ROWS

    def _column_blocks(self) -> list[tuple[Tensor, Tensor]]:
        """(weight, bias) slices of ``W~`` / ``b~`` holding whole perturbed heads, sized for
        a full chunk of rows (the same slices for every batch size)."""
        classes = self.perturbed_weight.shape[0] // self.n_repeats
        step = classes * max(1, min(self.n_repeats, _BLOCK_VALUES // (self._rows_per_chunk() * classes)))
        return list(zip(self.perturbed_weight.split(step), self.perturbed_bias.split(step)))

    def _prepare(self, batch: Tensor) -> Tensor:
        if not isinstance(batch, Tensor) or batch.ndim != 2:
            raise TypeError("WeiPer expects (n, D) feature tensors")
        if batch.shape[1] != self.perturbed_weight.shape[1]:
            raise ValueError(f"features have D = {batch.shape[1]}, the head expects "
                             f"D = {self.perturbed_weight.shape[1]}")
        batch = batch.detach().to(self.perturbed_weight.device, torch.float32)
        check_finite(batch, "WeiPer features")
        return batch

    def _chunker(self, features: Features) -> Callable[[], Iterator[Tensor]]:
        """A factory re-iterating ``features`` in prepared chunks (for the two fit passes)."""
        rows = self._rows_per_chunk()
        if isinstance(features, Tensor):
            return lambda: (self._prepare(c) for c in features.split(rows))
        if isinstance(features, Iterator) or not isinstance(features, Iterable):
            raise TypeError("WeiPer.fit_features needs a tensor or a re-iterable collection "
                            "of (n, D) batches (e.g. a list or a DataLoader): fitting reads "
                            "the data twice, a one-shot iterator/generator cannot be reused")

        def chunks() -> Iterator[Tensor]:
            for batch in features:
                if not isinstance(batch, Tensor):
                    raise TypeError(f"WeiPer expects (n, D) feature tensors, got {type(batch)}")
                for chunk in batch.split(rows):
                    yield self._prepare(chunk)

        return chunks

    # ------------------------------------------------------------------ fit / score
    @torch.no_grad()
    def fit_features(self, features: Features) -> None:
        """Fit the global ranges and mean histograms of both spaces from ID features.

        Two streamed passes (global min/max, then summed bin counts); memory does not
        depend on N. Min/max, counts and N are reduced across ranks.

        Args:
            features: (N, D) tensor or a re-iterable of (n, D) batches (read twice).
        """
        self._require_allocated()
        chunks = self._chunker(features)
        device = self.perturbed_weight.device
        n_bins, slots = self.n_bins, self.n_bins + 2
        # Pass 1: global [min, max] of z and of W~z + b~, kept as max(-min, max).
        extremes = torch.full((4,), -float("inf"), device=device)
        count = torch.zeros((), dtype=torch.int64, device=device)
        for z in chunks():
            parts = [torch.aminmax(z)]
            parts += [torch.aminmax(torch.addmm(b, z, w.t()))
                      for w, b in self._column_blocks()]
            lows, highs = (torch.stack(v) for v in zip(*parts))
            extremes = torch.maximum(extremes, torch.stack(
                [-lows[0], highs[0], -lows[1:].min(), highs[1:].max()]))
            count += z.shape[0]
        extremes = distributed.all_reduce(extremes, "max")
        count = distributed.all_reduce(count, "sum")
        if int(count) == 0:
            raise ValueError("WeiPer.fit_features got no training features")
        neg_z_lo, z_hi, neg_w_lo, w_hi = extremes.tolist()
        z_lo, w_lo = -neg_z_lo, -neg_w_lo
        # Pass 2: summed bin counts (integers: exact under any batching or sharding).
        counts = torch.zeros(2, slots, dtype=torch.int64, device=device)
        for z in chunks():
            idx = bin_indices(z, z_lo, z_hi, n_bins).add_(1.0).to(torch.int32)
            counts[0] += torch.bincount(idx.view(-1), minlength=slots)
            for w, b in self._column_blocks():
                idx = bin_indices(torch.addmm(b, z, w.t()), w_lo, w_hi, n_bins)
                counts[1] += torch.bincount(idx.add_(1.0).to(torch.int32).view(-1),
                                            minlength=slots)
        totals = distributed.all_reduce(counts, "sum").double()[:, 1:-1]
        n = int(count)
        dim, width = self.perturbed_weight.shape[1], self.perturbed_weight.shape[0]
        self.z_range.copy_(torch.tensor([z_lo, z_hi]))
        self.wz_range.copy_(torch.tensor([w_lo, w_hi]))
        self.train_hist_z.copy_(totals[0] / (n * dim))
        self.train_hist_wz.copy_(totals[1] / (n * width))
        self.n_train.fill_(n)
        self.fitted.fill_(True)
        self.sync_from_buffers()

    def fit(self, data: FitData) -> None:
        self.fit_features(data.features)

    @torch.no_grad()
    def score_features(self, features: Tensor) -> Tensor:
        """WeiPer scores of (B, D) features, higher = in-distribution.

        Args:
            features: (B, D) penultimate features.

        Returns:
            (B,) float32 scores on the detector's device.
        """
        self._require_allocated()
        if self._bins is None:
            raise RuntimeError("WeiPer needs ID training statistics: call fit_features() first")
        exporting = torch.compiler.is_exporting()
        if not exporting and features.shape[0] == 0:
            return torch.zeros(0, device=self.train_hist_z.device)
        z_lo, z_scale, w_lo, w_scale = self._bins
        width, dim = self.perturbed_weight.shape
        classes = width // self.n_repeats
        scores = []
        # row chunks bound the memory eagerly; an exported program has a symbolic batch size
        for chunk in [features] if exporting else features.split(self._rows_per_chunk()):
            z = self._prepare(chunk)
            counts_w = torch.zeros(z.shape[0], self.n_bins, dtype=torch.int64, device=z.device)
            msp = torch.zeros(z.shape[0], device=z.device)
            for w, b in self._column_blocks():
                logits = torch.addmm(b, z, w.t())
                counts_w = counts_w + scaled_bin_counts(logits, w_lo, w_scale, self.n_bins)
                msp = msp + perturbed_msp_sum(logits, classes)
            hist_z = scaled_bin_counts(z, z_lo, z_scale, self.n_bins).float().mm(self.smooth_z).div_(dim)
            hist_w = counts_w.float().mm(self.smooth_wz).div_(width)
            d_z = symmetric_kl(self.train_hist_z, hist_z, self.eps_z)
            d_w = symmetric_kl(self.train_hist_wz, hist_w, self.eps_perturbed)
            msp = msp.div_(self.n_repeats)
            scores.append(self.lambda2 * msp - d_z - self.lambda1 * d_w)
        return scores[0] if len(scores) == 1 else torch.cat(scores)

    def score(self, outputs: ForwardOutputs) -> Tensor:
        return self.score_features(outputs.features)

    def extra_repr(self) -> str:
        return (f"n_repeats={self.n_repeats}, delta={self.delta}, n_bins={self.n_bins}, "
                f"lambda1={self.lambda1}, lambda2={self.lambda2}, smoothing={self.smoothing}, "
                f"smoothing_perturbed={self.smoothing_perturbed}, seed={self.seed}")
