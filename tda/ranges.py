"""The range of a numeric setting, declared once and checked before anything runs.

Every number in a config is checked to be finite and within float32 (:func:`magnitude_problem`:
NaN, inf or 1e300 is never a setting) and inside its range: the typed sections check theirs
(tda.sections.Checks), a `_target_` node's arguments are checked against the rules that hold for
an argument name wherever it appears (tda.config.ARGUMENT_RULES), against the :class:`Range` a
constructor declares next to the parameter, `crop_padding: Annotated[int, CROP_PADDING] = 0`
(tda.config.target_problems reads it), and by a class's `argument_problems` where the range
depends on other arguments. Counts are bounded by COUNT_MAX, seeds by SEED_MAX; a bound that
follows from memory is said with its estimate (:func:`memory_problem`). docs/scale_out.md lists
the ranges and the fault sweep that checks them (benchmarks/settings_faults.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

# numpy's legacy seeding, scikit-learn's random_state and Lightning's seed_everything take
# seeds in [0, 2³²−1]; every seed of tda is held to that range.
SEED_MAX = 2**32 - 1


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def non_finite(value: Any) -> bool:
    """A float that is NaN or ±inf (anywhere in a list)."""
    if isinstance(value, (list, tuple)):
        return any(non_finite(v) for v in value)
    return isinstance(value, float) and not math.isfinite(value)


# The largest float32: a setting beyond it overflows the models' float32 arithmetic (torch
# raises "value cannot be converted to type float without overflow", or the run turns to inf).
FLOAT32_MAX = 3.4028234663852886e38


def beyond_float32(value: Any) -> bool:
    """A number (anywhere in a list) whose magnitude float32 cannot hold."""
    if isinstance(value, (list, tuple)):
        return any(beyond_float32(v) for v in value)
    return is_number(value) and math.isfinite(value) and abs(value) > FLOAT32_MAX


def magnitude_problem(path: str, value: Any) -> str | None:
    """The message for a number that is NaN, ±inf or beyond float32 (anywhere in a list), or None."""
    if non_finite(value):
        return f"{path}={value} is not a finite number"
    if beyond_float32(value):
        return (f"{path}={value} is beyond float32's largest number (3.4e38), which the models compute in; "
                f"use a finite setting of a sensible size")
    return None


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: [low, high] (either end open, either end
    unbounded); `why` says what the bound means, `example` a valid value. Declared next to a
    constructor's parameter as `Annotated[int, Range(...)]`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""
    example: Any = None

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        """E.g. "in [0, 4294967295]", "positive", "in (0, 1]"."""
        if self.high is None:
            if self.low == 0:
                return "positive" if self.low_open else "≥ 0"
            return f"{'>' if self.low_open else '≥'} {_num(self.low)}" if self.low is not None else "a number"
        if self.low is None:
            return f"{'<' if self.high_open else '≤'} {_num(self.high)}"
        return (f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
                f"{')' if self.high_open else ']'}")

    def problem(self, path: str, value: Any) -> str | None:
        """The message for a value outside the range (NaN and inf included), or None; a value
        that is not a number is left to the type check."""
        if not is_number(value):
            return None
        example = f"; e.g. {path}={self.example}" if self.example is not None else ""
        if not math.isfinite(value):
            return f"{path}={value} is not a finite number{example}"
        if self.contains(value):
            return None
        return f"{path}={value} must be {self.describe()}{self.why}{example}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


SEED = Range(0, SEED_MAX, why=" (numpy, scikit-learn and Lightning take seeds in [0, 2³²−1])", example=0)

# The largest count (of epochs, seeds, rows, iterations, ...) a setting may ask for: a 32-bit
# index. Nothing tda runs in a job comes near it; a larger value is a typo (1e12 for 1e2) that
# would otherwise run for days or fail deep inside torch.
COUNT_MAX = 2**31 - 1
COUNT_WHY = " (a count beyond 2³¹ − 1 is more than any job of tda can hold or finish)"


def count(what: str = "", example: Any = None) -> Range:
    """A positive whole count bounded by COUNT_MAX; `what` says what it counts."""
    return Range(1, COUNT_MAX, why=f" ({what}; more than 2³¹ − 1 is more than any job can hold or finish)"
                 if what else COUNT_WHY, example=example)


# ------------------------------------------------------------------------------ memory
def physical_memory_bytes() -> int:
    """This machine's physical memory (what a job can hold at most), in bytes."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 2**63 - 1


def format_bytes(n: float) -> str:
    """E.g. "3.8 GiB", "2.2e+07 GiB"."""
    gib = n / 2**30
    if gib >= 1e6:
        return f"{gib:.2g} GiB"
    if gib >= 1:
        return f"{gib:.1f} GiB"
    return f"{n / 2**20:.1f} MiB"


def memory_problem(setting: str, nbytes: float, what: str, fix: str) -> str | None:
    """The message for a setting whose memory (`nbytes`: what it implies, described by `what`)
    exceeds this machine's physical memory, or None."""
    total = physical_memory_bytes()
    if nbytes <= total:
        return None
    return (f"{setting} implies {what}: about {format_bytes(nbytes)}, more than this machine's "
            f"{format_bytes(total)} of memory; {fix}")
