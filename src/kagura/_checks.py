"""Checks of the numbers users give to settings: a count, a limit, a rate.

Each raises :class:`~kagura.errors.UsageError` naming the setting, at the moment the setting is
given. A comparison alone does not do: ``nan < 1`` is false, so a NaN limit would pass a
``limit < 1`` check and then switch the limit off; and a string fails later, deep in a call,
with an error that names neither the setting nor the fix.
"""

from __future__ import annotations

import math
import numbers
from datetime import datetime, timedelta

from .errors import UsageError


def count(value: object, what: str, *, at_least: int) -> int:
    """``value`` as an ``int`` of at least ``at_least`` (a count of attempts, tokens, rounds)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UsageError(f"{what} must be a whole number, got {value!r}")
    if value < at_least:
        raise UsageError(f"{what} must be at least {at_least}, got {value!r}")
    return int(value)


def real(value: object, what: str) -> float:
    """``value`` as a ``float``, if it is a number and not NaN (infinity is a number)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{what} must be a number, got {value!r}")
    result = float(value)
    if math.isnan(result):
        raise UsageError(f"{what} must be a number, got nan")
    return result


def cutoff(age: object, now: float) -> float:
    """The moment (seconds since the epoch) retention deletes before: ``age`` before ``now``
    (a timedelta, or seconds), or a datetime's own moment (a naive one is local time, as
    everywhere in Python). A negative age would put it in the future, and delete everything."""
    if isinstance(age, datetime):
        return age.timestamp()
    if isinstance(age, timedelta):
        seconds = age.total_seconds()
    elif isinstance(age, bool) or not isinstance(age, numbers.Real):
        raise UsageError(
            f"the age to delete before is a timedelta, seconds or a datetime, got {age!r}"
        )
    else:
        seconds = real(age, "the age to delete before")
    if seconds < 0:
        raise UsageError(
            f"the age to delete before must not be negative, got {age!r}: that would be in the "
            f"future, and delete everything"
        )
    return now - seconds
