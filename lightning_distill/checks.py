"""The one way arguments are checked: a ``ValueError`` that names the argument, the value and what to write instead,
raised when the object is built (before any model is loaded or any step is taken).

Every check in the package goes through these four functions: :func:`require` for any rule, :func:`number`,
:func:`integer` and :func:`choice` for the common ones (they also refuse a bool for a number and a quoted number,
the two mistakes a YAML file makes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any


def require(ok: bool, name: str, value: Any, expected: str, fix: str = "") -> None:
    """Raise ``ValueError("{name} must be {expected}, got {value!r}: {fix}")`` unless ``ok``.

    Args:
        ok: the rule, evaluated by the caller.
        name: the argument's name, as the user writes it (``"optimization.learning_rate"``).
        value: what was given.
        expected: the rule in words, e.g. ``"in [0, 1]"``.
        fix: what to write instead; omitted from the message when empty.
    """
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}" + (f": {fix}" if fix else ""))


def number(name: str, value: Any, rule: str, ok: Callable[[float], bool], example: str = "") -> float:
    """``value`` as a float when it is a real number (not a bool, not a string, not NaN or infinite) for which ``ok``
    holds.

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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be a number {rule}, got {value!r}{suggestion}")
    return float(value)


def integer(name: str, value: Any, rule: str, ok: Callable[[int], bool], example: str = "") -> int:
    """``value`` when it is an int (not a bool, not a float, not a string) for which ``ok`` holds."""
    suggestion = f", e.g. {name}={example}" if example else ""
    if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
        quoted = ": write it without quotes" if isinstance(value, str) else ""
        raise ValueError(f"{name} must be an integer {rule}, got {value!r}{quoted}{suggestion}")
    return value


def choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` when it is one of ``choices`` (the message lists them)."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value
