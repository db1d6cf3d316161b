"""Argument checks that fail at construction with the argument, its value and the valid range."""
from __future__ import annotations

import math
from typing import Any, Optional


def check_number(name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None, *,
                 low_open: bool = False, high_open: bool = False, integer: bool = False, optional: bool = False) -> None:
    """Raise a ValueError unless ``value`` is a finite number in the range (``low`` / ``high``
    excluded when ``low_open`` / ``high_open``; an int when ``integer``; ``None`` allowed
    when ``optional``)."""
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be {kind}{' or null' if optional else ''}, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lower = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        upper = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{name} must be {' and '.join(b for b in (lower, upper) if b)}, got {value!r}")
