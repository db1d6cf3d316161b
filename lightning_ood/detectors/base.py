"""The one interface every OOD detector implements.

A detector reads what it needs from one :class:`ForwardOutputs` bundle (produced by a
single forward pass of the model) and returns one score per sample, **higher = more
in-distribution (ID)**. Fitted statistics live in registered buffers so that
``state_dict``/strict ``load_state_dict`` carry them in checkpoints; values that shape
tensors or that ``score`` reads as Python numbers (a percentile, a selected block, bin
edges) are mirrored into plain attributes by :meth:`Detector.sync_from_buffers`, so the
same ``score`` runs eagerly and under ``torch.export``.

Everything the evaluation needs to know about a detector is on its class (what it reads,
whether it needs fitting, its tuning grid, what the report shows), so the callback, the
tuning, the model file and ``.pt2`` export never special-case a detector class. Register a
detector under a name with :func:`lightning_ood.detectors.registry.register`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

#: What a detector may read: the logits, the pooled penultimate features, the per-block
#: FeatureNorms and the classification head (its weights or a call through it).
INPUTS = ("logits", "features", "block_norms", "head")


@dataclass
class ForwardOutputs:
    """Everything a detector may read, produced by one forward pass.

    Attributes:
        logits: (B, C) class logits of the model's own head (evaluation path).
        features: (B, D) pooled penultimate features, the head's input.
        block_norms: (B, n_blocks) FeatureNorm of every residual block's output, or
            ``None`` when no detector asked for them.
    """

    logits: Tensor
    features: Tensor
    block_norms: Optional[Tensor] = None

    def check_finite(self) -> "ForwardOutputs":
        """Raise ``ValueError`` naming the tensor (``logits``, ``features`` or
        ``block_norms``) when one holds NaN or infinite values; returns ``self``.

        The once-per-bundle check: score every detector afterwards inside
        :func:`~lightning_ood.detectors.functional.finite_inputs_checked`, where the
        detectors' own checks of the same tensors are skipped::

            outputs.check_finite()
            with finite_inputs_checked():
                scores = [detector(outputs) for detector in detectors]

        Eagerly it costs one host sync for all three tensors (their sums, stacked; a
        non-finite sum is followed by the exact per-tensor check that names the culprit).
        Under ``torch.export`` it becomes one runtime assertion per tensor.
        """
        from lightning_ood.detectors.functional import require_finite

        named = [(what, t) for what, t in (("logits", self.logits), ("features", self.features),
                                            ("block_norms", self.block_norms))
                 if t is not None and t.is_floating_point()]
        if not named:
            return self
        if not torch.compiler.is_exporting():
            sums = torch.stack([t.sum(dtype=torch.promote_types(t.dtype, torch.float32)).to(torch.float32)
                                for _, t in named])
            if bool(torch.isfinite(sums).all()):
                return self
        for what, tensor in named:
            require_finite(tensor, what)
        return self

    def float(self) -> "ForwardOutputs":
        """The same outputs in (at least) float32: under bf16/fp16 mixed precision the
        backbone's outputs are half precision, while detectors keep float32 statistics."""
        up = lambda t: t if t is None or t.dtype in (torch.float32, torch.float64) else t.float()
        return ForwardOutputs(up(self.logits), up(self.features), up(self.block_norms))


@dataclass
class FitData:
    """ID training data seen by detectors that need statistics (one pass over at most
    ``fit_samples`` images, cached as the small per-image outputs below).

    On multiple processes every rank holds its own shard; detectors reduce across ranks
    with :mod:`lightning_ood.distributed` so the fitted state is identical everywhere.
    Detectors read it in row chunks (:meth:`chunks`), so their working memory does not grow
    with N.

    Attributes:
        features: (N, D) pooled penultimate features of ID training images.
        block_norms: (N, n_blocks) per-block FeatureNorm of the same images, or ``None``.
        jigsaw_block_norms: (N, n_blocks) per-block FeatureNorm of their jigsaw-shuffled
            versions (pseudo-OOD), or ``None``.
        labels: (N,) class labels of the same images, or ``None``.
        logits: (N, C) logits of the same images, or ``None`` (kept only when a detector
            sets ``requires_fit_logits``).
    """

    features: Tensor
    block_norms: Optional[Tensor] = None
    jigsaw_block_norms: Optional[Tensor] = None
    labels: Optional[Tensor] = None
    logits: Optional[Tensor] = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def chunks(self, rows: int = 4096) -> Iterator["FitData"]:
        """The same data in consecutive row chunks of at most ``rows`` images (views)."""
        cut = lambda t, i: None if t is None else t[i:i + rows]
        for start in range(0, len(self), rows):
            yield FitData(*(cut(getattr(self, field), start) for field in
                            ("features", "block_norms", "jigsaw_block_norms", "labels", "logits")))


def _sync_after_load(module: "Detector", incompatible_keys: Any) -> None:
    module.sync_from_buffers()


class Detector(nn.Module):
    """Base class of all OOD detectors.

    Class attributes tell the evaluation what the detector needs and how it is shown:

    * ``name``: the report name (instances may refine it, e.g. ``ash_s``).
    * ``reads``: which of :data:`INPUTS` its score uses.
    * ``requires_fit``: needs ID training statistics (:meth:`fit` must run before scoring).
    * ``requires_jigsaw``: its fit reads ``FitData.jigsaw_block_norms``.
    * ``requires_labels``: its fit reads ``FitData.labels``.
    * ``requires_fit_logits``: its fit reads ``FitData.logits`` (kept only when asked for:
      N x C floats).
    * ``changes_logits``: :meth:`shaped_logits` gives logits that differ from the model's
      (e.g. ASH), so the report also shows their ID accuracy.
    * ``assumes_nonnegative_features``: meant for post-ReLU pooled features; the
      evaluation drops it (with the reason) when the features can be negative.
    * ``tuning_grid``: hyper-parameter name -> values tried by
      :mod:`lightning_ood.evaluation.tuning` (empty: not tunable); the current values come from
      :meth:`hyperparameters` and change through :meth:`set_hyperparameters`.
    * ``reported_attributes`` / ``reported_buffers``: what :meth:`describe` puts in the
      report.
    """

    name: ClassVar[str] = "detector"
    reads: ClassVar[tuple[str, ...]] = ("logits",)
    requires_fit: ClassVar[bool] = False
    requires_jigsaw: ClassVar[bool] = False
    requires_labels: ClassVar[bool] = False
    requires_fit_logits: ClassVar[bool] = False
    changes_logits: ClassVar[bool] = False
    assumes_nonnegative_features: ClassVar[bool] = False
    tuning_grid: ClassVar[dict[str, tuple[Any, ...]]] = {}
    reported_attributes: ClassVar[tuple[str, ...]] = ()
    reported_buffers: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:  # a user's detector without a name: its class name
            cls.name = cls.__name__.lower()
        unknown = set(cls.reads) - set(INPUTS)
        if unknown:
            raise TypeError(f"{cls.__name__}.reads has {sorted(unknown)}; valid inputs: {INPUTS}")

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("fitted", torch.tensor(not self.requires_fit), persistent=True)
        self.register_load_state_dict_post_hook(_sync_after_load)

    # ----------------------------------------------------------- what it reads
    @property
    def requires_block_norms(self) -> bool:
        """Whether the score reads ``ForwardOutputs.block_norms``."""
        return "block_norms" in self.reads

    def attach(self, head: nn.Module, num_blocks: int = 0) -> None:
        """Bind the detector to the model: its classification head (a module mapping
        (B, D) features to (B, C) logits) and the number of residual blocks whose
        FeatureNorms appear in ``ForwardOutputs.block_norms``. Detectors allocate their
        shape-dependent buffers here. Keep only an *unregistered* reference to ``head``
        (its parameters belong to the model, not to the detector's state_dict)."""

    def skip_reason(self, head: nn.Module, num_blocks: int = 0) -> Optional[str]:
        """One-line reason why this detector does not apply to such a model,
        or ``None`` when it applies."""
        return None

    # ------------------------------------------------------------ fit / score
    def fit(self, data: FitData) -> None:
        """Fit statistics from ID training data; no-op for detectors without any.
        Every rank calls it (detectors reduce their sums across ranks)."""
        self.fitted.fill_(True)

    def score(self, outputs: ForwardOutputs) -> Tensor:
        """(B,) scores, higher = in-distribution. Must trace with ``torch.export``: no
        Python branch on tensor values (read Python mirrors of buffers instead)."""
        raise NotImplementedError

    def shaped_logits(self, outputs: ForwardOutputs) -> Tensor:
        """Logits the detector classifies with (the model's own unless overridden)."""
        return outputs.logits

    def forward(self, outputs: ForwardOutputs) -> Tensor:
        # under torch.export the fitted check ran before tracing (a buffer cannot be read)
        if not torch.compiler.is_exporting() and not bool(self.fitted):
            raise RuntimeError(
                f"{type(self).__name__} needs ID training statistics: call fit() first "
                "(OODEvaluation does this when the datamodule has a training set)."
            )
        return self.score(outputs)

    def sync_from_buffers(self) -> None:
        """Refresh the plain-Python copies of buffer values that ``score`` reads (called
        after ``load_state_dict`` and by detectors after fitting). No-op by default."""

    def regenerable_buffers(self, head: nn.Module) -> dict[str, Tensor]:
        """Buffers that :meth:`attach` re-draws bit for bit from ``head`` and the
        constructor arguments, so a model file may leave them out (WeiPer's perturbed head).
        Returns what attach would draw; empty for most detectors."""
        return {}

    # ------------------------------------------------------------------ tuning
    def hyperparameters(self) -> dict[str, Any]:
        """Current values of the hyper-parameters in :attr:`tuning_grid`."""
        return {key: getattr(self, key) for key in self.tuning_grid}

    def set_hyperparameters(self, **values: Any) -> bool:
        """Set hyper-parameters in place; returns ``True`` when the fitted statistics are
        now stale and :meth:`fit` must run again."""
        self.check_grid({key: [value] for key, value in values.items()})
        for key, value in values.items():
            setattr(self, key, value)
        return False

    def check_grid(self, grid: dict[str, Sequence[Any]]) -> None:
        """Raise ``ValueError`` for grid keys this detector does not tune."""
        unknown = set(grid) - set(self.tuning_grid)
        if unknown:
            raise ValueError(f"{self.name} has no tunable hyper-parameters {sorted(unknown)}; "
                             f"valid: {sorted(self.tuning_grid) or 'none'}")

    def tuning_candidates(self, overrides: Optional[dict[str, Sequence[Any]]] = None) -> list[dict[str, Any]]:
        """Every combination of the grid (``overrides`` replace whole value lists) plus the
        current values, deduplicated and sorted (so candidates that need the same refit
        are adjacent)."""
        grid = {**self.tuning_grid, **(overrides or {})}
        self.check_grid(grid)
        names = list(grid)
        candidates = [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]
        current = self.hyperparameters()
        candidates.append(current)
        unique = {tuple(c[n] for n in names): c for c in candidates}
        return [unique[key] for key in sorted(unique)]

    # ------------------------------------------------------------------ report
    def describe(self) -> dict[str, Any]:
        """What the detector chose or learned, for the report (plain Python values)."""
        info: dict[str, Any] = {"class": type(self).__name__}
        for attr in self.reported_attributes:
            info[attr] = getattr(self, attr)
        for buffer in self.reported_buffers:
            value = getattr(self, buffer, None)
            if isinstance(value, Tensor):
                info[buffer] = value.tolist()
        return info


def reads_block_norms(detectors: Iterable[Detector]) -> bool:
    """Whether a forward pass for these detectors must compute the per-block FeatureNorms."""
    return any(detector.requires_block_norms for detector in detectors)
