"""Validation of numbers a user passes: one rule, one wording, the allowed range in every message."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

from loopus_core.errors import LoopusError

MAX_LOOPS = 1024  # the most loop passes a command accepts (memory and time grow linearly with K)
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit; torch and random take these too


def check_int(value: int, flag: str, low: int = 1, high: int | None = None, *, why: str | None = None) -> int:
    """``value`` if it is an integer in ``[low, high]`` (``high`` None: no upper bound), else a LoopusError
    naming ``flag``, the value and the allowed range (``why``: where the range comes from)."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    allowed += f" ({why})" if why else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise LoopusError(f"{flag} {value!r} is not an integer: it must be {allowed}")
    if value < low or (high is not None and value > high):
        raise LoopusError(f"{flag} {value!r} is out of range: it must be {allowed}")
    return value


def check_float(
    value: float,
    flag: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` if it is a finite number within the bounds (open or closed), else a LoopusError with the
    range. NaN and infinities are always rejected."""
    allowed = _range_text(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise LoopusError(f"{flag} {value!r} is not a number: it must be {allowed}")
    number = float(value)
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if not math.isfinite(number) or below or above:
        raise LoopusError(f"{flag} {value!r} is out of range: it must be {allowed}")
    return number


def check_ints(values: Iterable[int], flag: str, low: int = 1, high: int | None = None) -> tuple[int, ...]:
    """Every value of a non-empty list through :func:`check_int`."""
    values = tuple(values)
    if not values:
        raise LoopusError(f"{flag} lists no value; give at least one (e.g. 1,2,4,8)")
    return tuple(check_int(v, flag, low, high) for v in values)


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return "a finite number"
