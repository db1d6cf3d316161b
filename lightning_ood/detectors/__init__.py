"""Post-hoc OOD detectors: one method per file, one small interface (:class:`Detector`),
one table of names (:mod:`lightning_ood.detectors.registry`).

Importing this package imports every built-in detector module, which registers its names.
:func:`detector_names` lists them; :func:`build_detector` builds one with its published
defaults. Code outside this package uses the registry and the :class:`Detector`
interface, never a concrete class.
"""
from __future__ import annotations

from lightning_ood.detectors.base import INPUTS, Detector, FitData, ForwardOutputs, reads_block_norms
from lightning_ood.detectors.registry import (
    build_detector, canonical_name, default_detector_names, detector_classes, detector_name, detector_names, entry,
    register,
)

# built-in detectors, in the order of the default report (importing registers them)
from lightning_ood.detectors.baselines import MSP, Energy, MaxLogit, MinDistance, PenultimateNorm  # noqa: E402
from lightning_ood.detectors.ash import ASH  # noqa: E402
from lightning_ood.detectors.weiper import WeiPer  # noqa: E402
from lightning_ood.detectors.featurenorm import FeatureNorm  # noqa: E402
# breadth: standard post-hoc detectors, not in the default list (``detectors: all`` adds them)
from lightning_ood.detectors.knn import KNN  # noqa: E402
from lightning_ood.detectors.vim import VirtualLogitMatching  # noqa: E402
from lightning_ood.detectors.react import ReAct  # noqa: E402
from lightning_ood.detectors.scale import SCALE  # noqa: E402
from lightning_ood.detectors.gen import GEN  # noqa: E402
from lightning_ood.detectors.mahalanobis import Mahalanobis  # noqa: E402
from lightning_ood.detectors.rmd import RelativeMahalanobis  # noqa: E402
from lightning_ood.detectors.dice import DICE  # noqa: E402
from lightning_ood.detectors.nci import NCI  # noqa: E402
from lightning_ood.detectors.fdbd import FDBD  # noqa: E402

__all__ = [
    "ASH", "DICE", "Detector", "Energy", "FDBD", "FeatureNorm", "FitData", "ForwardOutputs", "GEN", "INPUTS", "KNN",
    "MSP", "Mahalanobis", "MaxLogit", "MinDistance", "NCI", "PenultimateNorm", "ReAct", "RelativeMahalanobis",
    "SCALE", "VirtualLogitMatching", "WeiPer", "build_detector", "canonical_name", "default_detector_names",
    "detector_classes", "detector_name", "detector_names", "entry", "reads_block_norms", "register",
]
