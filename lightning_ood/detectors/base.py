"""The one interface every OOD detector implements.

A detector reads what it needs from one :class:`ForwardOutputs` bundle (produced by a
single forward pass of the model) and returns one score per sample, **higher = more
in-distribution (ID)**. Fitted statistics live in registered, pre-allocated buffers so
that ``state_dict``/strict ``load_state_dict`` carry them in checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn


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

    def float(self) -> "ForwardOutputs":
        """The same outputs in (at least) float32: under bf16/fp16 mixed precision the
        backbone's outputs are half precision, while detectors keep float32 statistics."""
        up = lambda t: t if t is None or t.dtype in (torch.float32, torch.float64) else t.float()
        return ForwardOutputs(up(self.logits), up(self.features), up(self.block_norms))


@dataclass
class FitData:
    """ID training data seen by detectors that need statistics (one streamed pass).

    On multiple processes every rank holds its own shard; detectors reduce across ranks
    with :mod:`lightning_ood.distributed` so the fitted state is identical everywhere.

    Attributes:
        features: (N, D) pooled penultimate features of ID training images.
        block_norms: (N, n_blocks) per-block FeatureNorm of the same images, or ``None``.
        jigsaw_block_norms: (N, n_blocks) per-block FeatureNorm of their jigsaw-shuffled
            versions (pseudo-OOD), or ``None``.
    """

    features: Tensor
    block_norms: Optional[Tensor] = None
    jigsaw_block_norms: Optional[Tensor] = None


class Detector(nn.Module):
    """Base class of all OOD detectors.

    Class attributes tell the evaluation what the detector needs:

    * ``requires_fit``: needs ID training statistics (:meth:`fit` must run before scoring).
    * ``requires_block_norms``: reads ``ForwardOutputs.block_norms``.
    * ``requires_jigsaw``: its fit reads ``FitData.jigsaw_block_norms``.
    * ``changes_logits``: :meth:`shaped_logits` gives logits that differ from the model's
      (e.g. ASH), so the report also shows their ID accuracy.
    """

    requires_fit: bool = False
    requires_block_norms: bool = False
    requires_jigsaw: bool = False
    changes_logits: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("fitted", torch.tensor(not self.requires_fit), persistent=True)

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

    def fit(self, data: FitData) -> None:
        """Fit statistics from ID training data; no-op for detectors without any."""
        self.fitted.fill_(True)

    def score(self, outputs: ForwardOutputs) -> Tensor:
        """(B,) scores, higher = in-distribution."""
        raise NotImplementedError

    def shaped_logits(self, outputs: ForwardOutputs) -> Tensor:
        """Logits the detector classifies with (the model's own unless overridden)."""
        return outputs.logits

    def forward(self, outputs: ForwardOutputs) -> Tensor:
        if not bool(self.fitted):
            raise RuntimeError(
                f"{type(self).__name__} needs ID training statistics: call fit() first "
                "(OODEvaluation does this when the datamodule has a training set)."
            )
        return self.score(outputs)
