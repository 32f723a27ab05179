"""Argument checks shared by the methods: a ``ValueError`` that names the argument, the value and what to write
instead, raised when the object is built (before any model is loaded or any step is taken)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def number(name: str, value: Any, rule: str, ok: Callable[[float], bool], example: str = "") -> float:
    """``value`` as a float when it is a real number (not a bool, not a string) for which ``ok`` holds.

    Args:
        name: the argument's name, as the user writes it.
        value: what was given.
        rule: the rule in words, e.g. ``"> 0"`` or ``"in [0, 1]"``.
        ok: the rule as a test.
        example: a valid value to suggest, e.g. ``"1e-3"``.
    """
    suggestion = f", e.g. {name}={example}" if example else ""
    if isinstance(value, str):
        raise ValueError(f"{name} must be a number {rule}, got the string {value!r}: write it without quotes"
                         f"{suggestion}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or not ok(value):
        raise ValueError(f"{name} must be a number {rule}, got {value!r}{suggestion}")
    return float(value)


def integer(name: str, value: Any, rule: str, ok: Callable[[int], bool], example: str = "") -> int:
    """``value`` when it is an int (not a bool, not a float, not a string) for which ``ok`` holds."""
    suggestion = f", e.g. {name}={example}" if example else ""
    if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
        quoted = ": write it without quotes" if isinstance(value, str) else ""
        raise ValueError(f"{name} must be an integer {rule}, got {value!r}{quoted}{suggestion}")
    return value
