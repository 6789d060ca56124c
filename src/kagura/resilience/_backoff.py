"""How long to wait before retry number n: fixed, exponential, and jittered exponential."""

from __future__ import annotations

import numbers
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from .._checks import real
from ..errors import UsageError

Jitter = Literal["full", "equal"] | None


def seconds(value: float | timedelta, what: str) -> float:
    """A duration as float seconds; every policy accepts floats or timedeltas."""
    if isinstance(value, timedelta):
        result = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{what} must be a number of seconds or a timedelta, got {value!r}")
    else:
        result = real(value, what)
    if result < 0:
        raise UsageError(f"{what} must not be negative, got {value!r}")
    return result


def time_limit(value: float | timedelta, what: str) -> float:
    """A timeout as float seconds. Unlike a wait, which may be 0, a limit of 0 lets nothing
    finish: every attempt would fail, and be retried, having sent nothing."""
    result = seconds(value, what)
    if result == 0:
        raise UsageError(
            f"{what} must be more than 0 seconds, got {value!r}: nothing can finish in no time "
            f"(None means no limit)"
        )
    return result


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before retry number ``n`` (1 for the first retry).

    ``base * factor ** (n - 1)``, capped at ``cap``. With ``jitter="full"`` the delay is drawn
    uniformly from ``[0, d]``; with ``"equal"`` from ``[d/2, d]`` (AWS's "Exponential Backoff And
    Jitter"): jitter spreads out clients that failed together so they don't retry together.
    """

    base: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    jitter: Jitter = None

    def __post_init__(self) -> None:
        for name in ("base", "factor", "cap"):
            real(getattr(self, name), f"backoff {name}")
        if self.base < 0 or self.cap < 0:
            raise UsageError("backoff base and cap must not be negative")
        if self.factor < 1:
            raise UsageError(f"backoff factor must be at least 1, got {self.factor}")
        if self.jitter not in (None, "full", "equal"):
            raise UsageError(f"jitter must be 'full', 'equal' or None, got {self.jitter!r}")

    def delay(self, retry_number: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry_number``, jittered with ``rng`` (default:
        the ``random`` module)."""
        try:
            raw = min(self.cap, self.base * self.factor ** max(0, retry_number - 1))
        except OverflowError:  # factor ** n past the largest float, long past the cap
            raw = self.cap
        if self.jitter is None:
            return raw
        uniform = (rng or random).uniform
        if self.jitter == "full":
            return uniform(0.0, raw)
        return raw / 2 + uniform(0.0, raw / 2)


def fixed(delay: float | timedelta) -> Backoff:
    """The same wait before every retry."""
    d = seconds(delay, "delay")
    return Backoff(base=d, factor=1.0, cap=d)


def exponential(
    base: float | timedelta = 0.5,
    *,
    factor: float = 2.0,
    cap: float | timedelta = 30.0,
    jitter: Jitter = None,
) -> Backoff:
    """``base``, ``base*factor``, ``base*factor**2``, ... up to ``cap``."""
    return Backoff(seconds(base, "base"), factor, seconds(cap, "cap"), jitter)


def jittered(
    base: float | timedelta = 0.5,
    *,
    factor: float = 2.0,
    cap: float | timedelta = 30.0,
    mode: Literal["full", "equal"] = "full",
) -> Backoff:
    """Exponential backoff with jitter (full by default)."""
    return Backoff(seconds(base, "base"), factor, seconds(cap, "cap"), mode)
