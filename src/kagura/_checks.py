"""Checks of what users give to settings: a count, a limit, a rate; a name.

Each raises :class:`~kagura.errors.UsageError` naming the setting, at the moment the setting is
given. A comparison alone does not do: ``nan < 1`` is false, so a NaN limit would pass a
``limit < 1`` check and then switch the limit off; and a string fails later, deep in a call,
with an error that names neither the setting nor the fix.
"""

from __future__ import annotations

import math
import numbers
import unicodedata
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


#: The bidirectional embeddings, overrides and isolates: they reorder the text after them, so
#: that one name can be made to read as another.
_REORDERING = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def obeyed(char: str) -> bool:
    """Is ``char`` one a terminal obeys rather than shows, or one that breaks a line: a C0 or C1
    control (ESC, newline, NUL), a bidirectional override, a line or paragraph separator? Other
    invisible characters are parts of the text that shows (the joiners of emoji sequences and
    of Persian or Hindi words, variation selectors, tag characters), and are kept."""
    return unicodedata.category(char) == "Cc" or char in _REORDERING or char in "\u2028\u2029"
