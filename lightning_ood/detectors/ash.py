"""ASH: activation shaping of the pooled penultimate features at test time."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from lightning_ood.detectors.base import Detector, ForwardOutputs
from lightning_ood.detectors.functional import ash_b, ash_p, ash_s, check_percentile, energy, shaped_head_logits
from lightning_ood.detectors.registry import register

_SHAPERS: dict[str, Callable[[Tensor, float], Tensor]] = {"p": ash_p, "b": ash_b, "s": ash_s}
#: Pruning percentiles tried by the tuning (the paper's own sweep spans 10-99).
PERCENTILE_GRID: tuple[float, ...] = (10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0)
#: The authors' configs: ImageNet ResNet-50 ASH-S@90, CIFAR ASH-S@95.
PUBLISHED_PERCENTILE = {"*": {"percentile": 95.0}, "imagenet": {"percentile": 90.0}}


class ASH(Detector):
    """Activation shaping, scored with the energy of the shaped logits.

    Djurisic et al., "Extremely Simple Activation Shaping for Out-of-Distribution
    Detection", ICLR 2023. The pooled features are shaped per sample
    (:func:`~lightning_ood.detectors.functional.ash_p` / ``ash_b`` / ``ash_s``), passed
    through the model's own head, and ``logsumexp`` of the result is the score. The
    shaped logits are also what the detector classifies with (``changes_logits``).

    The head is held by an unregistered reference (inside a tuple), so its parameters
    stay out of the detector's ``state_dict``. The percentile lives in the float buffer
    ``pruning_percentile`` so checkpoints carry a tuned value; the ``percentile``
    attribute reads and writes it through a Python copy (the number of kept values is a
    static shape, also under ``torch.export``).

    Args:
        variant: ``"p"``, ``"b"`` or ``"s"`` (ASH-P, ASH-B, ASH-S).
        percentile: pruning percentile on the paper's 0-100 scale (90 prunes 90 %). The
            authors use ASH-S@90 for ImageNet ResNet-50 and ASH-S@95 for CIFAR.
        allow_small_percentile: accept a percentile in (0, 1]. Refused by default: such a
            value is almost always a fraction meant as a percentage (0.9 for 90). Also
            checked when ``percentile`` is set later (e.g. by a tuning grid).
    """

    reads = ("features", "head")
    changes_logits = True
    assumes_nonnegative_features = True
    tuning_grid = {"percentile": PERCENTILE_GRID}
    reported_attributes = ("variant", "percentile")

    def __init__(self, variant: str = "s", percentile: float = 90.0, allow_small_percentile: bool = False) -> None:
        super().__init__()
        if variant not in _SHAPERS:
            raise ValueError(f"unknown ASH variant {variant!r}; valid choices: {sorted(_SHAPERS)}")
        self.allow_small_percentile = allow_small_percentile
        self._check(percentile)
        self.variant = variant
        self.register_buffer("pruning_percentile", torch.tensor(float(percentile)))
        self._percentile = float(percentile)
        self._head: tuple[nn.Module, ...] = ()

    @property
    def name(self) -> str:
        return f"ash_{self.variant}"

    @property
    def percentile(self) -> float:
        """Pruning percentile (0-100 scale), stored in the ``pruning_percentile`` buffer."""
        return self._percentile

    @percentile.setter
    def percentile(self, value: float) -> None:
        self._check(value)
        self.pruning_percentile.fill_(float(value))
        self._percentile = float(value)

    def sync_from_buffers(self) -> None:
        self._check(float(self.pruning_percentile))
        self._percentile = float(self.pruning_percentile)

    def _check(self, percentile: float) -> None:
        """The 0-100 scale, and no fraction mistaken for a percentage (0.9 prunes 0.9 %, not
        90 %) unless ``allow_small_percentile``; also applied to every value set later (a
        tuning grid, a user)."""
        check_percentile(percentile)
        if 0 < float(percentile) <= 1 and not self.allow_small_percentile:
            raise ValueError(
                f"ASH percentile {percentile} is on the 0-100 scale, so it prunes only {percentile} % of the "
                f"activations; did you mean {float(percentile) * 100:g}? Pass allow_small_percentile=True to keep it"
            )

    def skip_reason(self, head: nn.Module, num_blocks: int = 0) -> Optional[str]:
        width = getattr(head, "in_features", None)
        if width is not None and width - round(width * self.percentile / 100.0) < 1:
            return (f"percentile {self.percentile} keeps none of the {width} features per sample; "
                    "use a smaller percentile")
        return None

    def attach(self, head: nn.Module, num_blocks: int = 0) -> None:
        self._head = (head,)

    def shaped_logits(self, outputs: ForwardOutputs) -> Tensor:
        if not self._head:
            raise RuntimeError(f"{self.name} has no classification head: call attach(head) first")
        shaper, percentile = _SHAPERS[self.variant], self.percentile
        return shaped_head_logits(self._head[0], outputs.features, lambda rows: shaper(rows, percentile))

    def score(self, outputs: ForwardOutputs) -> Tensor:
        return energy(self.shaped_logits(outputs))

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, percentile={self.percentile}"


for _variant in _SHAPERS:
    register(f"ash_{_variant}", fixed={"variant": _variant}, defaults=PUBLISHED_PERCENTILE, default=True)(ASH)
