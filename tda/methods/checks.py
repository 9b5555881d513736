"""Constructor checks of method settings: a degenerate value (zero iterations, an empty or
negative batch, negative damping, ...) is refused when the method is built — before any
gradient is computed — with one message naming the setting and a valid value. The choices
of the influence-function methods (curvature, dtype) are checked in :mod:`tda.methods.influence`."""

from __future__ import annotations

import math
from typing import Any

from tda.config import ConfigError


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def positive_int(key: str, value: Any, what: str, example: int) -> int:
    """`value` as an int ≥ 1, else ValueError: method.<key>=<value> must be a positive number
    of <what>; e.g. method.<key>=<example>."""
    v = _number(value)
    if v is None or not math.isfinite(v) or v != int(v) or v < 1:
        raise ConfigError(f"method.{key}={value} must be a positive number of {what}; e.g. method.{key}={example}")
    return int(v)


def optional_positive_int(key: str, value: Any, what: str, example: int) -> int | None:
    """None (the method's automatic choice) or :func:`positive_int`."""
    if value is None:
        return None
    try:
        return positive_int(key, value, what, example)
    except ValueError:
        raise ConfigError(f"method.{key}={value} must be a positive number of {what} or null (automatic); "
                         f"e.g. method.{key}={example}") from None


def positive(key: str, value: Any, what: str, example: float) -> float:
    """`value` as a finite float > 0, else ValueError naming the setting and `example`."""
    v = _number(value)
    if v is None or not (math.isfinite(v) and v > 0):
        raise ConfigError(f"method.{key}={value} must be a positive number ({what}); e.g. method.{key}={example}")
    return v


def non_negative(key: str, value: Any, what: str, example: float) -> float:
    """`value` as a finite float ≥ 0, else ValueError naming the setting and `example`."""
    v = _number(value)
    if v is None or not (math.isfinite(v) and v >= 0):
        raise ConfigError(f"method.{key}={value} must be a number ≥ 0 ({what}); e.g. method.{key}={example}")
    return v


def check_factored(factored: Any) -> str | bool:
    """`factored` if it is auto, true or false (per-example gradients from linear-layer factors:
    when possible, always, never), else ValueError."""
    if factored not in ("auto", True, False):
        raise ConfigError(f"method.factored={factored!r} must be auto, true or false")
    return factored
