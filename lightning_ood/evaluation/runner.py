"""The evaluation as plain Python: resolve -> fit pass -> tuning data -> score -> gather.

Nothing here knows about Lightning; :class:`~lightning_ood.lightning.callback.OODEvaluation`
supplies the data (batches of ``(images, labels, sample indices)``), a ``prepare`` function
(device and precision of the test pass) and a ``forward`` function (the network's one
forward pass, ``forward(images, with_block_norms) -> ForwardOutputs``), and drives these
steps from its hooks. Metrics, thresholds and the report follow in
:mod:`~lightning_ood.evaluation.metrics` and :mod:`~lightning_ood.evaluation.report`.

Multi-process: :func:`fit_pass` reads this rank's shard; detectors reduce their statistics
across ranks in ``fit`` (every rank calls it). :func:`forward_all` runs the whole (small)
tuning set on every rank, so every rank tunes identically. :meth:`ScoreCollector.gather`
is a collective (every rank calls it) and drops the duplicates a padded sampler adds.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from lightning_ood import distributed
from lightning_ood.detectors import Detector, FitData, ForwardOutputs, build_detector, detector_name, reads_block_norms
from lightning_ood.detectors.functional import jigsaw
from lightning_ood.evaluation.tuning import concat_outputs

Batches = Iterable[Sequence[Tensor]]  # (images, labels, sample indices)
Prepare = Callable[[Tensor], Tensor]
Forward = Callable[[Tensor, bool], ForwardOutputs]


@dataclass
class ResolvedDetectors:
    """Detectors to attach, by report name; those that do not apply, with the reason; and
    the names given as instances (their hyper-parameters are the user's, not the paper's)."""

    to_attach: dict[str, Detector] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    configured: set[str] = field(default_factory=set)


def resolve_detectors(specs: Sequence[Union[str, Detector]], family: str, head: nn.Module,
                      num_blocks: int) -> ResolvedDetectors:
    """Build every spec (a registered name, with ``family``'s published defaults, or an
    instance) and split them into those that apply to the model and those skipped."""
    resolved = ResolvedDetectors()
    for spec in specs:
        detector = build_detector(spec, family) if isinstance(spec, str) else spec
        name = detector_name(detector)
        if not isinstance(spec, str):
            resolved.configured.add(name)
        if name in resolved.to_attach or name in resolved.skipped:
            raise ValueError(f"detector {name!r} is configured twice")
        reason = detector.skip_reason(head, num_blocks)
        if reason is not None:
            resolved.skipped[name] = reason
        else:
            resolved.to_attach[name] = detector
    return resolved


def jigsaw_batch(images: Tensor, indices: Tensor, seed: int) -> Tensor:
    """Jigsaw versions of normalised images, each permutation seeded by the sample's index,
    so 1 or N ranks shuffle every image identically. The border left over by the tiles is
    0 in normalised space (the dataset's mean colour)."""
    shuffled = [
        jigsaw(image[None], generator=torch.Generator(device=images.device).manual_seed(seed * 1_000_003 + int(index)))
        for image, index in zip(images, indices)
    ]
    return torch.cat(shuffled)


def fit_pass(batches: Batches, prepare: Prepare, forward: Forward, detectors: Sequence[Detector], jigsaw_seed: int,
             feature_width: int, num_blocks: int, num_classes: int, device: torch.device) -> FitData:
    """One streamed pass over (this rank's shard of) the ID training subset, keeping what
    the detectors that need fitting read: features always; logits, block norms, their
    jigsaw versions and labels only when some detector asks for them."""
    need_blocks = reads_block_norms(detectors)
    need_jigsaw = any(d.requires_jigsaw for d in detectors)
    need_labels = any(d.requires_labels for d in detectors)
    need_logits = any(d.requires_fit_logits for d in detectors)
    features, block_norms, jigsaw_norms, labels, logits = [], [], [], [], []
    for images, targets, indices in batches:
        images = prepare(images)
        outputs = forward(images, need_blocks)
        features.append(outputs.features)
        if need_logits:
            logits.append(outputs.logits)
        if need_labels:
            labels.append(targets.to(device))
        if outputs.block_norms is not None:
            block_norms.append(outputs.block_norms)
        if need_jigsaw:
            jigsaw_norms.append(forward(jigsaw_batch(images, indices, jigsaw_seed), True).block_norms)

    def cat(parts: list[Tensor], shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        # clone: outside inference mode the detectors may keep (views of) these tensors
        return torch.cat(parts).clone() if parts else torch.zeros(shape, dtype=dtype, device=device)

    return FitData(
        features=cat(features, (0, feature_width)),
        block_norms=cat(block_norms, (0, num_blocks)) if need_blocks else None,
        jigsaw_block_norms=cat(jigsaw_norms, (0, num_blocks)) if need_jigsaw else None,
        labels=cat(labels, (0,), torch.long) if need_labels else None,
        logits=cat(logits, (0, num_classes)) if need_logits else None,
    )


def forward_all(batches: Batches, prepare: Prepare, forward: Forward,
                jigsaw_seed: Optional[int] = None) -> tuple[ForwardOutputs, Optional[ForwardOutputs]]:
    """The outputs of every batch (and, with ``jigsaw_seed``, of their jigsaw versions),
    concatenated: the cached outputs every tuning grid point re-scores."""
    plain, shuffled = [], []
    for images, _, indices in batches:
        images = prepare(images)
        plain.append(forward(images, False))
        if jigsaw_seed is not None:
            shuffled.append(forward(jigsaw_batch(images, indices, jigsaw_seed), False))
    return concat_outputs(plain), (concat_outputs(shuffled) if jigsaw_seed is not None else None)


class ScoreCollector:
    """Per-sample (index, label, scores, predictions) of every test set, batch by batch.

    Args:
        num_sets: test dataloaders (0 = the ID test set, then the OOD sets).
        device: where the running minimum feature lives.
    """

    def __init__(self, num_sets: int, device: torch.device) -> None:
        self._buffers: list[dict[str, list[Tensor]]] = [
            {"indices": [], "labels": [], "scores": [], "predictions": []} for _ in range(num_sets)
        ]
        self.min_feature = torch.tensor(float("inf"), device=device)

    def add(self, set_index: int, outputs: ForwardOutputs, labels: Tensor, indices: Tensor,
            detectors: Sequence[Detector]) -> None:
        """Score one batch with every detector (the one forward pass feeds them all); on
        the ID set also keep the predictions of detectors that change the logits."""
        self.min_feature = torch.minimum(self.min_feature, outputs.features.min())
        scores, predictions = [], [outputs.logits.argmax(1)]
        for detector in detectors:
            scores.append(detector(outputs).float())
            if detector.changes_logits and set_index == 0:
                predictions.append(detector.shaped_logits(outputs).argmax(1))
        buffer = self._buffers[set_index]
        buffer["indices"].append(indices)
        buffer["labels"].append(labels)
        buffer["scores"].append(torch.stack(scores, 1) if scores else outputs.logits.new_zeros(len(outputs.logits), 0))
        if set_index == 0:
            buffer["predictions"].append(torch.stack(predictions, 1))

    def gather(self) -> list[dict[str, Tensor]]:
        """Every set's samples from all ranks (a collective: every rank calls it), padded
        duplicates dropped, sorted by sample index, on the CPU."""
        return [gather_samples(buffer) for buffer in self._buffers]


def gather_samples(buffer: Mapping[str, list[Tensor]]) -> dict[str, Tensor]:
    """Concatenate, gather across ranks, drop padded duplicates, sort by index."""
    out = {}
    for key, chunks in buffer.items():
        if not chunks:
            continue
        local = torch.cat(chunks)
        out[key] = distributed.all_gather_rows(local) if distributed.is_distributed() else local
    order = torch.argsort(out["indices"], stable=True)
    sorted_indices = out["indices"][order]
    first = torch.ones_like(sorted_indices, dtype=torch.bool)
    first[1:] = sorted_indices[1:] != sorted_indices[:-1]
    return {key: value[order][first].cpu() for key, value in out.items()}


def drop_negative_feature_detectors(names: Sequence[str], detectors: Sequence[Detector], min_feature: float,
                                    skipped: dict[str, str]) -> list[int]:
    """Indices of the detectors to keep: those meant for post-ReLU features are dropped
    (with the reason in ``skipped``) when some test feature is negative."""
    keep = []
    for i, (name, detector) in enumerate(zip(names, detectors)):
        if min_feature < 0 and detector.assumes_nonnegative_features:
            skipped[name] = f"features can be negative (min {min_feature:.3g}); {name} assumes post-ReLU features"
        else:
            keep.append(i)
    return keep


def default_tuning_report(detectors: Sequence[Detector], configured: set[str], note: Optional[str] = None
                          ) -> dict[str, dict[str, Any]]:
    """The tuning entry of detectors that keep their values (``tune: defaults``, or no
    validation images): configured or published, with an optional note."""
    report = {}
    for detector in detectors:
        name = detector_name(detector)
        report[name] = ({"mode": "defaults", "note": note} if note else
                        {"mode": "defaults", "values": "configured" if name in configured else "published"})
    return report
