"""Detector hyper-parameters chosen without OOD data: held-out ID validation images vs
their jigsaw-shuffled versions (or, when the user has one, a real OOD validation set).

Published defaults are tuned for one architecture and do not transfer. The AUROC of ID
validation images against their jigsaw versions — the pseudo-OOD that FeatureNorm's
NormRatio already uses — ranks ASH percentiles much like real OOD sets do, so each tunable
detector (one whose class declares a ``tuning_grid``) scores its grid on cached outputs
(one forward pass over the validation and jigsaw images, none per grid point) and keeps the
best value by AUROC; ties go to the published default. The test sets are never read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from lightning_ood.detectors.base import Detector, FitData, ForwardOutputs
from lightning_ood.detectors.registry import detector_name
from lightning_ood.evaluation.metrics import ood_metrics

TUNING_MODES = ("jigsaw", "ood_val", "defaults")
Grids = dict[str, dict[str, Sequence[Any]]]


@dataclass
class TuningData:
    """Cached outputs of one forward pass over the tuning images.

    Attributes:
        id_outputs: held-out ID validation images (never the test set).
        ood_outputs: their jigsaw versions (``mode="jigsaw"``) or a real OOD validation set.
        mode: ``jigsaw`` or ``ood_val``.
        split: human-readable description of the images used, for the report.
    """

    id_outputs: ForwardOutputs
    ood_outputs: ForwardOutputs
    mode: str
    split: str


def _auroc(detector: Detector, data: TuningData) -> float:
    return ood_metrics(detector.score(data.id_outputs), detector.score(data.ood_outputs))["auroc"]


def _pick(candidates: Sequence[dict[str, Any]], aurocs: Sequence[float], default: dict[str, Any]) -> dict[str, Any]:
    """Best candidate by AUROC; the published default wins ties."""
    best = max(aurocs)
    if default in candidates and aurocs[list(candidates).index(default)] >= best:
        return default
    return candidates[aurocs.index(best)]


def is_tunable(detector: Detector) -> bool:
    """Whether the detector's class declares a tuning grid."""
    return bool(detector.tuning_grid)


def tune_detector(detector: Detector, data: TuningData, fit_data: Optional[FitData] = None,
                  grid: Optional[dict[str, Sequence[Any]]] = None) -> Optional[dict[str, Any]]:
    """Choose a detector's hyper-parameters on ``data`` and leave them set (refitting on
    ``fit_data`` when a value changes the fitted statistics).

    Args:
        detector: an attached (and fitted) detector with a ``tuning_grid``.
        data: cached tuning outputs.
        fit_data: the ID training data it was fitted on (needed when a grid value makes
            the fit stale, e.g. WeiPer's ``delta``).
        grid: replacements of whole value lists of the detector's grid.

    Returns:
        ``{"parameters": chosen, "default": before, "grid": [{**values, "auroc"}]}``, or
        ``None`` for a detector that needs fitting when there is no ``fit_data``.
    """
    if detector.requires_fit and fit_data is None:
        return None  # a grid value may make the fit stale, and nothing could refit it
    default = detector.hyperparameters()
    candidates = detector.tuning_candidates(grid)
    aurocs = []
    for candidate in candidates:
        if detector.set_hyperparameters(**candidate):
            detector.fit(fit_data)
        aurocs.append(_auroc(detector, data))
    chosen = _pick(candidates, aurocs, default)
    if detector.set_hyperparameters(**chosen):
        detector.fit(fit_data)
    return {"parameters": chosen, "default": default,
            "grid": [{**c, "auroc": a} for c, a in zip(candidates, aurocs)]}


def tune_detectors(detectors: Sequence[Detector], data: TuningData, fit_data: Optional[FitData],
                   grids: Optional[Grids] = None) -> dict[str, dict[str, Any]]:
    """Tune every tunable detector in place; returns ``{name: report entry}`` with the
    mode, the split, the grid with each AUROC, the default and the choice.

    Args:
        grids: detector name -> grid overrides (see :func:`tune_detector`).
    """
    report = {}
    for detector in detectors:
        if not is_tunable(detector):
            continue
        name = detector_name(detector)
        entry = tune_detector(detector, data, fit_data, (grids or {}).get(name))
        if entry is not None:
            report[name] = {"mode": data.mode, "split": data.split, **entry}
    return report


def concat_outputs(chunks: Sequence[ForwardOutputs]) -> ForwardOutputs:
    """One ForwardOutputs from per-batch ones."""
    block_norms = [c.block_norms for c in chunks if c.block_norms is not None]
    return ForwardOutputs(
        logits=torch.cat([c.logits for c in chunks]),
        features=torch.cat([c.features for c in chunks]),
        block_norms=torch.cat(block_norms) if block_norms and len(block_norms) == len(chunks) else None,
    )


__all__ = ["TUNING_MODES", "TuningData", "concat_outputs", "is_tunable", "tune_detector", "tune_detectors"]
