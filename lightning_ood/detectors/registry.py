"""The detector registry: every detector name, its class, aliases and published defaults.

A detector module registers its class with :func:`register` (once per name; ASH registers
one class under three names). Everything else — the ``OODEvaluation`` callback, the CLI,
tuning, the model file's allow-list — reads this table, so adding a detector is one file
plus its tests::

    @register("my_score", aliases=("mine",), defaults={"*": {"k": 5}, "imagenet": {"k": 50}})
    class MyScore(Detector):
        ...

Dataset families: ``cifar10``, ``cifar100`` and ``imagenet``; ``defaults["*"]`` is used
for any other family (and for a family without its own entry).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, TypeVar

from lightning_ood.detectors.base import Detector

D = TypeVar("D", bound=type)

@dataclass(frozen=True)
class DetectorEntry:
    """One registered name.

    Attributes:
        name: the plain name (``ash_s``).
        cls: the detector class.
        fixed: constructor arguments that define this name (``{"variant": "s"}``).
        defaults: family -> constructor arguments (published defaults); ``"*"`` for others.
        aliases: other accepted spellings.
        default: part of ``OODEvaluation``'s default list.
    """

    name: str
    cls: type
    fixed: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    default: bool = False

    def arguments(self, family: str = "cifar10") -> dict[str, Any]:
        """Constructor arguments of this name for a dataset family."""
        chosen = self.defaults.get(family, self.defaults.get("*", {}))
        return {**chosen, **self.fixed}

    def build(self, family: str = "cifar10") -> Detector:
        return self.cls(**self.arguments(family))


_REGISTRY: dict[str, DetectorEntry] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, *, fixed: Optional[Mapping[str, Any]] = None,
             defaults: Optional[Mapping[str, Mapping[str, Any]]] = None, aliases: tuple[str, ...] = (),
             default: bool = False) -> Callable[[D], D]:
    """Class decorator adding a detector class to the registry under ``name``."""

    def decorate(cls: D) -> D:
        if not (isinstance(cls, type) and issubclass(cls, Detector)):
            raise TypeError(f"register({name!r}) decorates Detector subclasses, got {cls!r}")
        key = name.lower()
        taken = [n for n in (key, *(a.lower() for a in aliases)) if n in _REGISTRY or n in _ALIASES]
        if taken:
            raise ValueError(f"detector name(s) {taken} already registered")
        _REGISTRY[key] = DetectorEntry(key, cls, dict(fixed or {}), {k: dict(v) for k, v in (defaults or {}).items()},
                                       tuple(aliases), default)
        for alias in aliases:
            _ALIASES[alias.lower()] = key
        return cls

    return decorate


def canonical_name(name: str) -> str:
    """The registered name for ``name`` or one of its aliases (case-insensitive)."""
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown detector {name!r}; valid names: {', '.join(detector_names())}")
    return key


def entry(name: str) -> DetectorEntry:
    """The registry entry of a name or alias."""
    return _REGISTRY[canonical_name(name)]


def detector_names() -> tuple[str, ...]:
    """Every registered name, in registration order."""
    return tuple(_REGISTRY)


def default_detector_names() -> list[str]:
    """The registered defaults (``OODEvaluation`` adds the training objective's native
    score, :func:`lightning_ood.nn.objectives.native_score`)."""
    return [n for n, e in _REGISTRY.items() if e.default]


def detector_classes() -> dict[str, type]:
    """Registered detector classes by class name (the model file's allow-list)."""
    return {e.cls.__name__: e.cls for e in _REGISTRY.values()}


def build_detector(name: str, family: str = "cifar10") -> Detector:
    """A detector by plain name, with the published defaults for a dataset ``family``
    (``cifar10``, ``cifar100`` or ``imagenet``; anything else gets the generic ones)."""
    return entry(name).build(family)


def detector_name(detector: Detector) -> str:
    """The report name of a detector instance (``ash_s``, ``weiper`` ...)."""
    return str(getattr(detector, "name", type(detector).__name__.lower()))
