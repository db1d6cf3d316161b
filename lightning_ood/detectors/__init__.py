"""Post-hoc OOD detectors: one method per file, one small interface (:class:`Detector`).

Plain names accepted by :func:`build_detector` and the ``OODEvaluation`` callback:
``msp``, ``max_logit``, ``energy``, ``min_distance`` (IsoMax+ MDS), ``penultimate_norm``,
``ash_p``, ``ash_b``, ``ash_s``, ``weiper``, ``featurenorm``.
"""
from __future__ import annotations

from typing import Callable

from lightning_ood.detectors.ash import ASH
from lightning_ood.detectors.base import Detector, FitData, ForwardOutputs
from lightning_ood.detectors.baselines import MSP, Energy, MaxLogit, MinDistance, PenultimateNorm
from lightning_ood.detectors.featurenorm import FeatureNorm
from lightning_ood.detectors.weiper import WeiPer

#: ASH percentile of the authors' configs: ImageNet ResNet-50 ASH-S@90, CIFAR ASH-S@95.
ASH_PERCENTILE = {"imagenet": 90.0, "cifar": 95.0}


def _ash(variant: str) -> Callable[[str], Detector]:
    return lambda family: ASH(variant, ASH_PERCENTILE["imagenet" if family == "imagenet" else "cifar"])


_BUILDERS: dict[str, Callable[[str], Detector]] = {
    "msp": lambda family: MSP(),
    "max_logit": lambda family: MaxLogit(),
    "energy": lambda family: Energy(),
    "min_distance": lambda family: MinDistance(),
    "penultimate_norm": lambda family: PenultimateNorm(),
    "ash_p": _ash("p"),
    "ash_b": _ash("b"),
    "ash_s": _ash("s"),
    "weiper": lambda family: WeiPer.from_preset(family if family in ("cifar10", "cifar100", "imagenet") else "cifar10"),
    "featurenorm": lambda family: FeatureNorm(),
}
_ALIASES = {"maxlogit": "max_logit", "mds": "min_distance", "feature_norm": "featurenorm"}
DETECTOR_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_detector(name: str, family: str = "cifar10") -> Detector:
    """A detector by plain name, with the published defaults for a dataset ``family``
    (``cifar10``, ``cifar100`` or ``imagenet``; anything else gets the CIFAR-10 ones)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _BUILDERS:
        raise ValueError(f"unknown detector {name!r}; valid names: {', '.join(DETECTOR_NAMES)}")
    return _BUILDERS[key](family)


def detector_name(detector: Detector) -> str:
    """The report name of a detector instance (``ash_s``, ``weiper`` ...)."""
    return str(getattr(detector, "name", type(detector).__name__.lower()))


__all__ = [
    "ASH", "DETECTOR_NAMES", "Detector", "Energy", "FeatureNorm", "FitData", "ForwardOutputs",
    "MSP", "MaxLogit", "MinDistance", "PenultimateNorm", "WeiPer", "build_detector", "detector_name",
]
