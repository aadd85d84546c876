"""The one exception type users see, and the one check of a numeric setting against its range."""

from __future__ import annotations

import math


class OlmoIVError(Exception):
    """A user-facing error. The CLI prints its message without a traceback."""


def check_range(name: str, value: float, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Refuse a setting outside [low, high] (or the open ends asked for), a NaN, or a non-number, naming it:
    `alpha=2: give a value in (0, 1)`. None for a bound means unbounded on that side."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise OlmoIVError(f"{name}={value!r}: give a number")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{left}, {right}{')' if high_open or high is None else ']'}"
        raise OlmoIVError(f"{name}={value!r}: give a value in {interval}")
