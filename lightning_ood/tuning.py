"""Detector hyper-parameters chosen without OOD data: held-out ID validation images vs
their jigsaw-shuffled versions (or, when the user has one, a real OOD validation set).

Published defaults are tuned for one architecture and do not transfer (METHODS.md, issue
7). The AUROC of ID validation images against their jigsaw versions — the pseudo-OOD that
FeatureNorm's NormRatio already uses — ranks ASH percentiles much like real OOD sets do, so
each tunable detector scores a small grid on cached features (one forward pass over the
validation and jigsaw images, none per grid point) and keeps the best value by AUROC; ties
go to the published default. The test sets are never read.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from lightning_ood.detectors import ASH, WeiPer, detector_name
from lightning_ood.detectors.base import Detector, FitData, ForwardOutputs
from lightning_ood.metrics import ood_metrics

#: ASH pruning percentiles tried (the paper's own sweep spans 10-99).
ASH_PERCENTILES: tuple[float, ...] = (10, 20, 30, 40, 50, 60, 65, 70, 75, 80, 85, 90, 95)
#: WeiPer grid: brackets the authors' three presets (CIFAR-10, CIFAR-100, ImageNet).
WEIPER_GRID: dict[str, tuple[float, ...]] = {
    "delta": (1.8, 2.4),
    "lambda1": (0.1, 1.0, 2.5),
    "lambda2": (0.1, 0.25, 1.0),
    "smoothing": (4, 40),
    "smoothing_perturbed": (15, 40),
}
TUNING_MODES = ("jigsaw", "ood_val", "defaults")


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


def _pick(grid: Sequence[Any], aurocs: Sequence[float], default: Any) -> Any:
    """Best value by AUROC; the published default wins ties."""
    best = max(aurocs)
    if default in grid and aurocs[list(grid).index(default)] >= best:
        return default
    return grid[aurocs.index(best)]


def tune_ash(detector: ASH, data: TuningData, percentiles: Sequence[float] = ASH_PERCENTILES) -> dict[str, Any]:
    """Choose the pruning percentile of ``detector`` (its variant fixed); writes it into
    the detector's ``pruning_percentile`` buffer and returns the report entry."""
    default = detector.percentile
    grid = sorted(set(percentiles) | {default})
    aurocs = []
    for p in grid:
        detector.percentile = p
        aurocs.append(_auroc(detector, data))
    chosen = _pick(grid, aurocs, default)
    detector.percentile = chosen
    return {"parameters": {"percentile": chosen}, "default": {"percentile": default},
            "grid": [{"percentile": p, "auroc": a} for p, a in zip(grid, aurocs)]}


def tune_weiper(detector: WeiPer, data: TuningData, fit_data: FitData,
                grid: Optional[dict[str, Sequence[float]]] = None) -> dict[str, Any]:
    """Choose WeiPer's delta, lambdas and smoothing widths. W~ is redrawn (same seed) and
    the training statistics refitted once per delta; the other values only re-score."""
    grid = {**WEIPER_GRID, **(grid or {})}
    names = list(grid)
    default = {name: getattr(detector, name) for name in names}
    candidates = [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]
    if default not in candidates:
        candidates.append(default)
    candidates.sort(key=lambda c: c["delta"])  # one refit per delta
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
                   ash_percentiles: Sequence[float] = ASH_PERCENTILES,
                   weiper_grid: Optional[dict[str, Sequence[float]]] = None) -> dict[str, dict[str, Any]]:
    """Tune every tunable detector in place; returns ``{name: report entry}`` with the
    mode, the split, the grid with each AUROC, the default and the choice."""
    report = {}
    for detector in detectors:
        if isinstance(detector, ASH):
            entry = tune_ash(detector, data, ash_percentiles)
        elif isinstance(detector, WeiPer) and fit_data is not None:
            entry = tune_weiper(detector, data, fit_data, weiper_grid)
        else:
            continue
        report[detector_name(detector)] = {"mode": data.mode, "split": data.split, **entry}
    return report


def concat_outputs(chunks: Sequence[ForwardOutputs]) -> ForwardOutputs:
    """One ForwardOutputs from per-batch ones."""
    block_norms = [c.block_norms for c in chunks if c.block_norms is not None]
    return ForwardOutputs(
        logits=torch.cat([c.logits for c in chunks]),
        features=torch.cat([c.features for c in chunks]),
        block_norms=torch.cat(block_norms) if block_norms and len(block_norms) == len(chunks) else None,
    )


def is_tunable(detector: Detector) -> bool:
    """Whether :func:`tune_detectors` has a grid for this detector."""
    return isinstance(detector, (ASH, WeiPer))


__all__ = ["ASH_PERCENTILES", "TUNING_MODES", "TuningData", "WEIPER_GRID", "concat_outputs", "is_tunable",
           "tune_ash", "tune_detectors", "tune_weiper"]
