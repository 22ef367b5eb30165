"""Argument checks shared by the config and the schedule: each raises ``ValueError`` naming the argument."""

from __future__ import annotations

import math


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values are {list(allowed)}.")


def check_fraction(name: str, value, *, upper_inclusive: bool = False) -> None:
    """A finite number in [0, 1) (or [0, 1])."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok:
        interval = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"{name}={value!r} is outside {interval}.")


def check_int(name: str, value, minimum: int) -> None:
    """An integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
