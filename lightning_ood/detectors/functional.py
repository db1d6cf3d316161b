"""Pure tensor functions behind the detectors.

Every function here returns new tensors and never modifies its inputs. Scores follow the
project convention: **higher = more in-distribution (ID)**.

References:
    * ASH: Djurisic et al., "Extremely Simple Activation Shaping for Out-of-Distribution
      Detection", ICLR 2023.
    * MSP: Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and
      Out-of-Distribution Examples in Neural Networks", ICLR 2017.
    * MaxLogit: Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World
      Settings", ICML 2022.
    * Energy: Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020.
    * FeatureNorm and jigsaw pseudo-OOD: Yu et al., "Block Selection Method for Using
      Feature Norm in Out-of-distribution Detection", CVPR 2023.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

#: Set (to True) by :func:`finite_inputs_checked`: the scored bundle was checked once.
_FINITE_INPUTS_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "lightning_ood_finite_inputs_checked", default=False)


@contextlib.contextmanager
def finite_inputs_checked() -> Iterator[None]:
    """Inside this block :func:`check_finite` is a no-op.

    For scoring one forward bundle with many detectors: check its tensors **once**
    (:meth:`~lightning_ood.detectors.base.ForwardOutputs.check_finite`), then score every
    detector inside the block, so each detector does not repeat the same check (one host
    sync per detector and tensor). Put nothing else inside the block: every check in it is
    skipped, so fitting and unchecked tensors belong outside::

        outputs.check_finite()
        with finite_inputs_checked():
            scores = {name: detector(outputs) for name, detector in detectors.items()}

    Outside the block (a detector used alone) every detector still refuses non-finite
    inputs with a ``ValueError``. The flag is a :mod:`contextvars` variable, so it is local
    to the current thread / asyncio task and is reset on exit, also after an exception.
    """
    token = _FINITE_INPUTS_CHECKED.set(True)
    try:
        yield
    finally:
        _FINITE_INPUTS_CHECKED.reset(token)


def _finite_sum(tensor: Tensor) -> Tensor:
    """0-d sum of ``tensor`` (float32 at least): non-finite whenever some entry is NaN or
    infinite (IEEE addition propagates them), finite for finite entries unless the sum
    overflows. Much cheaper than ``isfinite(tensor).all()`` on the CPU."""
    dtype = torch.promote_types(tensor.dtype, torch.float32)
    return tensor.sum(dtype=dtype)


def check_finite(tensor: Tensor, what: str) -> None:
    """Raise ``ValueError`` when ``tensor`` holds NaN or infinite values.

    Detectors call this on their inputs: a non-finite feature or logit means the model's
    forward pass is broken, and a NaN score would silently corrupt every metric.

    Args:
        tensor: any tensor.
        what: name used in the error message (e.g. ``"ASH input features"``).

    Under ``torch.export`` the check cannot branch on tensor values; it becomes a runtime
    assertion inside the exported program (``RuntimeError`` with the same message).
    Inside :func:`finite_inputs_checked` it does nothing (the bundle was checked once).
    Integer and bool tensors are always finite.
    """
    if not _FINITE_INPUTS_CHECKED.get():
        require_finite(tensor, what)


def require_finite(tensor: Tensor, what: str) -> None:
    """:func:`check_finite` that always checks, also inside :func:`finite_inputs_checked`
    (the once-per-bundle check itself uses it)."""
    if torch.compiler.is_exporting():
        torch._assert_async(torch.isfinite(tensor).all(), f"{what} contain NaN or infinite values")
        return
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return
    # fast path: a finite sum proves every entry finite; only a non-finite sum (a NaN/inf
    # entry, or an overflowing sum of finite entries) pays for the exact elementwise check
    if not bool(torch.isfinite(_finite_sum(tensor))) and not bool(torch.isfinite(tensor).all()):
        where = ""
        if tensor.dim() >= 1 and tensor.shape[0] > 0:
            bad = int((~torch.isfinite(tensor.reshape(tensor.shape[0], -1))).any(dim=1).sum())
            where = f" in {bad} of {tensor.shape[0]} rows"
        raise ValueError(
            f"{what} contain NaN or infinite values{where}; the model's forward pass produced "
            "non-finite outputs, so no meaningful OOD score exists for them."
        )


def check_percentile(percentile: float) -> None:
    """Raise ``ValueError`` unless ``percentile`` is on the ASH paper's 0-100 scale."""
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(
            f"ASH percentile must be on the paper's 0-100 scale (e.g. 90, not 0.9); "
            f"got {percentile}"
        )


def _keep_top(x: Tensor, percentile: float) -> tuple[Tensor, Tensor, Tensor]:
    """Flatten ``x`` per sample and find the values ASH keeps.

    Returns ``(flat, values, indices)``: ``flat`` is the (B, n) view of ``x``, ``values``
    and ``indices`` the (B, k) largest entries per row, with
    ``k = n - round(n * percentile / 100)`` (Python's ``round``: halves go to the even
    integer, as NumPy's ``round`` in the authors' code).
    """
    check_percentile(percentile)
    if x.dim() < 2:
        raise ValueError(f"ASH expects (B, D) or (B, C, H, W) features; got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"ASH expects floating-point features; got {x.dtype}")
    check_finite(x, "ASH input features")
    flat = x.reshape(x.shape[0], -1)
    n = flat.shape[1]
    k = n - round(n * float(percentile) / 100.0)
    if k < 1:
        raise ValueError(
            f"ASH percentile {percentile} keeps none of the {n} values per sample (k = 0); "
            "use a smaller percentile"
        )
    # unsorted: the same k positions as sorted=True (the selection does not depend on the
    # order the kept values are returned in), without sorting them
    values, indices = flat.topk(k, dim=1, sorted=False)
    return flat, values, indices


def _place(flat: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """A new zero tensor shaped like ``flat`` with ``values`` at ``indices`` (per row): one
    allocation, filled in place (``flat`` is not modified)."""
    return torch.zeros_like(flat).scatter_(1, indices, values)


def ash_p(x: Tensor, percentile: float) -> Tensor:
    """ASH-P: keep each sample's k largest values unchanged and zero the rest.

    Djurisic et al., ICLR 2023. ``n`` is the number of values per sample (all non-batch
    dimensions together) and ``k = n - round(n * percentile / 100)``.

    Args:
        x: features of shape (B, D) or (B, C, H, W); not modified.
        percentile: pruning percentile on the paper's 0-100 scale (90 prunes 90 %).

    Returns:
        A new tensor shaped like ``x``.

    Raises:
        ValueError: percentile outside [0, 100], ``k`` would be 0, or non-finite ``x``.
    """
    flat, values, indices = _keep_top(x, percentile)
    return _place(flat, indices, values).reshape(x.shape)


def ash_b(x: Tensor, percentile: float) -> Tensor:
    """ASH-B: binarise; every kept position becomes ``s1 / k``, all others 0.

    Djurisic et al., ICLR 2023. ``s1`` is the per-sample sum before pruning, so the
    per-sample sum is preserved.

    Args:
        x: features of shape (B, D) or (B, C, H, W); not modified.
        percentile: pruning percentile on the paper's 0-100 scale.

    Returns:
        A new tensor shaped like ``x``.

    Raises:
        ValueError: percentile outside [0, 100], ``k`` would be 0, or non-finite ``x``.
    """
    flat, values, indices = _keep_top(x, percentile)
    k = values.shape[1]
    fill = (flat.sum(dim=1, keepdim=True) / k).expand(-1, k)
    return _place(flat, indices, fill).reshape(x.shape)


def ash_s(x: Tensor, percentile: float) -> Tensor:
    """ASH-S: prune like ASH-P, then multiply by ``exp(s1 / s2)``.

    Djurisic et al., ICLR 2023. ``s1`` is the per-sample sum before pruning and ``s2`` the
    sum of the kept values.

    Guard (the reference divides by ``s2`` unconditionally and overflows): for a sample
    with ``s2 <= 0`` (all kept values zero, or negative features such as GELU outputs) the
    scale is 1, i.e. the sample is only pruned. The exponent ``s1 / s2`` is clamped to at
    most ``log(finfo(dtype).max) / 2`` (about 44.4 in float32), so neither the scale nor the
    scaled features can overflow for any realistic feature magnitude. Whenever ``s2 > 0``,
    ``s1 / s2 <= n / k`` (pruned values never exceed the smallest kept one): 10 at
    percentile 90, 20 at 95, so the clamp only acts above a percentile of about 97.7.

    Args:
        x: features of shape (B, D) or (B, C, H, W); not modified.
        percentile: pruning percentile on the paper's 0-100 scale.

    Returns:
        A new finite tensor shaped like ``x``.

    Raises:
        ValueError: percentile outside [0, 100], ``k`` would be 0, or non-finite ``x``.
    """
    flat, values, indices = _keep_top(x, percentile)
    s1 = flat.sum(dim=1)
    s2 = values.sum(dim=1)
    positive = s2 > 0
    exponent = torch.where(positive, s1 / torch.where(positive, s2, torch.ones_like(s2)), 0.0)
    exponent = exponent.clamp(max=math.log(torch.finfo(x.dtype).max) / 2)
    # scale the k kept values, then place them (the same products as scaling the pruned tensor)
    return _place(flat, indices, values * torch.exp(exponent).unsqueeze(1)).reshape(x.shape)


def head_logits(head: "torch.nn.Module", features: Tensor) -> Tensor:
    """``head(features)`` computed in the head's own dtype (e.g. a bf16-true model) and
    returned in the features' dtype, for detectors that re-run the head on shaped features."""
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor) and weight.dtype != features.dtype:
        return head(features.to(weight.dtype)).to(features.dtype)
    return head(features)


#: Rows of shaped features per head call in :func:`shaped_head_logits`, as a count of values
#: (2**17 floats = 512 KB: 256 rows at D = 512), so that each shaped chunk is still in cache
#: when the head reads it.
SHAPED_CHUNK_VALUES = 2 ** 17


def shaped_head_logits(head: "torch.nn.Module", features: Tensor, shape: Callable[[Tensor], Tensor]) -> Tensor:
    """``head_logits(head, shape(features))`` for a row-wise ``shape`` (ReAct's clip, ASH,
    SCALE), computed eagerly over row chunks of :data:`SHAPED_CHUNK_VALUES` values (and at
    least 16 C rows): the shaped copy of a chunk is still in cache when the head reads it
    (ReAct at B = 10,000, D = 512, C = 10 on one thread: 1.9x faster than shaping the whole
    batch first, measured, identical logits). Under ``torch.export`` it is a single call."""
    if torch.compiler.is_compiling():  # first: a symbolic batch size must not be compared
        return head_logits(head, shape(features))
    weight = getattr(head, "weight", None)
    classes = int(weight.shape[0]) if isinstance(weight, Tensor) and weight.dim() == 2 else 1
    # each chunk re-reads the head's (C, D) weight: chunks of at least 16 C rows keep that under
    # 1/16 of the feature traffic (at C = 1000 a 10,000-row batch is one call)
    rows = max(SHAPED_CHUNK_VALUES // max(1, features.shape[-1]), 16 * classes)
    if features.shape[0] <= rows:
        return head_logits(head, shape(features))
    return torch.cat([head_logits(head, shape(chunk)) for chunk in features.split(rows)])


def stable_row_norm(x: Tensor) -> Tensor:
    """(B,) L2 norms of the rows of ``x`` (B, D) that neither overflow nor underflow.

    The plain norm sums squares in ``x``'s dtype: a row with entries past ~1e19 (float32)
    gives inf, one whose squares are subnormal loses digits. Only such rows (norm inf or
    below ``sqrt(D * tiny / eps)``, where the squares that underflowed can no longer move it)
    are recomputed on the row rescaled by its largest absolute value. Eagerly on the CPU
    those rows are found first (usually none, and the rest is one pass, 6x faster than
    rescaling every row); elsewhere, and under ``torch.export``, both are computed and
    selected without a host sync.
    """
    norms = torch.linalg.vector_norm(x, dim=1)
    info = torch.finfo(x.dtype)
    lowest = math.sqrt(x.shape[1] * info.tiny / info.eps)
    def unreliable() -> Tensor:
        return (norms < lowest) | torch.isinf(norms)

    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.where(unreliable(), _rescaled_row_norm(x), norms)
    smallest, largest = norms.aminmax() if norms.numel() else (lowest, 0.0)
    if smallest < lowest or largest == math.inf:  # one reduction and a bool: usually no row to redo
        rows = unreliable().nonzero().squeeze(1)
        norms = norms.index_put((rows,), _rescaled_row_norm(x.index_select(0, rows)))
    return norms


def _rescaled_row_norm(x: Tensor) -> Tensor:
    scale = x.abs().amax(dim=1, keepdim=True)
    safe = scale.clamp_min(torch.finfo(x.dtype).tiny)
    return torch.linalg.vector_norm(x / safe, dim=1) * scale.squeeze(1)


def energy(logits: Tensor) -> Tensor:
    """Negative free energy ``logsumexp_c logits_c`` (Liu et al., NeurIPS 2020).

    Args:
        logits: (B, C) logits.

    Returns:
        (B,) scores, higher = ID; finite for any finite logits (also > 100).
    """
    return torch.logsumexp(logits, dim=1)


def msp(logits: Tensor) -> Tensor:
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017).

    Args:
        logits: (B, C) logits.

    Returns:
        (B,) scores in [1/C, 1], higher = ID.
    """
    return torch.softmax(logits, dim=1).amax(dim=1)


def max_logit(logits: Tensor) -> Tensor:
    """Largest logit (Hendrycks et al., ICML 2022).

    Args:
        logits: (B, C) logits.

    Returns:
        (B,) scores, higher = ID.
    """
    return logits.amax(dim=1)


def feature_norm(feature_map: Tensor) -> Tensor:
    """FeatureNorm of a block output (Yu et al., CVPR 2023).

    ``f(z) = (1/M) * sum_m || ReLU(z_m) ||_2``: the spatial L2 norm of each rectified
    channel, averaged over the M channels.

    Args:
        feature_map: (B, M, H, W) block output.

    Returns:
        (B,) non-negative norms, higher = ID.
    """
    if feature_map.dim() != 4:
        raise ValueError(f"feature_norm expects (B, M, H, W); got {tuple(feature_map.shape)}")
    # accumulated in float32 at least, also for half-precision maps under mixed precision
    dtype = torch.promote_types(feature_map.dtype, torch.float32)
    return torch.linalg.vector_norm(torch.relu(feature_map), dim=(2, 3), dtype=dtype).mean(dim=1)


def jigsaw(images: Tensor, grid: int = 3, generator: Optional[torch.Generator] = None) -> Tensor:
    """Jigsaw-shuffled copies of images, the pseudo-OOD of Yu et al. (CVPR 2023).

    Each image is cut into ``grid x grid`` tiles of ``floor(H / grid) x floor(W / grid)``
    pixels starting at the top-left corner, and the tiles are placed in a random order,
    drawn independently for every image. Pixels outside the ``grid * tile`` area (the
    bottom and right remainder border, e.g. 2 px of a 32 px CIFAR image) are **zero** in
    the output, as in the authors' reference code. Zero is taken in the space ``images``
    are in: black when applied before normalisation, the normalisation mean after it.

    Args:
        images: (B, C, H, W) batch; not modified.
        grid: tiles per side (3 in the paper).
        generator: random source of the permutations (``None``: the global one). Its
            device is used to draw them.

    Returns:
        A new tensor shaped like ``images``.
    """
    if images.dim() != 4:
        raise ValueError(f"jigsaw expects (B, C, H, W); got {tuple(images.shape)}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1; got {grid}")
    batch, channels, height, width = images.shape
    tile_h, tile_w = height // grid, width // grid
    if tile_h == 0 or tile_w == 0:
        raise ValueError(f"images of {height}x{width} px are too small for a {grid}x{grid} jigsaw")
    num_tiles = grid * grid
    device = generator.device if generator is not None else images.device
    order = torch.rand(batch, num_tiles, generator=generator, device=device, dtype=torch.float32).argsort(dim=1)
    order = order.to(images.device)

    area = images[:, :, : grid * tile_h, : grid * tile_w]
    # (B, C, gh, th, gw, tw) -> (B, gh*gw, C, th, tw): tiles in row-major grid order.
    tiles = area.reshape(batch, channels, grid, tile_h, grid, tile_w).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(batch, num_tiles, channels, tile_h, tile_w)
    shuffled = tiles.gather(1, order.view(batch, num_tiles, 1, 1, 1).expand_as(tiles))
    shuffled = shuffled.reshape(batch, grid, grid, channels, tile_h, tile_w)
    shuffled = shuffled.permute(0, 3, 1, 4, 2, 5)

    out = torch.zeros_like(images)
    out[:, :, : grid * tile_h, : grid * tile_w] = shuffled.reshape(
        batch, channels, grid * tile_h, grid * tile_w
    )
    return out
