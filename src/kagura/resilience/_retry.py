"""Retries: a policy object usable as an agent argument, a decorator, or a context iterator.

Shaped like stamina's: keyword-only arguments, durations as ``float | timedelta``, and when the
attempts run out the last error passes through unwrapped (with a note saying how many attempts were
made). Cancellation is never retried and never counted as a failure.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import ParamSpec, TypeVar, TypeVarTuple

from .._checks import count
from .._context import Span, current_span
from .._instrument import span_event
from .._redact import str_of
from .._tool import awaits_when_called
from ..errors import UsageError
from . import _config
from ._backoff import Backoff, exponential, fixed, jittered, seconds, time_limit
from ._budget import current_retry_budgets
from ._classify import exception_types, is_transient, retry_after

P = ParamSpec("P")
T = TypeVar("T")
Ts = TypeVarTuple("Ts")

RetryOn = Callable[[BaseException], bool] | type[BaseException] | tuple[type[BaseException], ...]


@dataclass(frozen=True, slots=True)
class RetryDetails:
    """What the recorder and ``on_retry`` hooks learn about each retry."""

    name: str
    attempt: int  # the attempt that failed, from 1
    max_attempts: int
    error: BaseException
    wait: float  # seconds before the next attempt
    retry_after: float | None  # what the server asked for, if anything


class Retry:
    """Retry a failing call with backoff.

    Args:
        attempts: total attempts, the first included (``attempts=1`` never retries).
        backoff: delays between attempts (default: jittered exponential, 0.5 s doubling, 30 s cap).
        retry_on: a predicate, or exception types, deciding what is retried (default: transient
            provider errors: 429, 5xx, timeouts and connection errors).
        timeout: limit on each attempt; an attempt that runs over is cancelled and retried.
        total_timeout: limit on the whole call, waits included; raises ``TimeoutError``.
        respect_retry_after: wait at least what a ``Retry-After`` header asks.
        max_retry_after: a ``Retry-After`` longer than this is not waited for: the error is raised.
        on_retry: called with a :class:`RetryDetails` before each wait.
    """

    __slots__ = (
        "attempts",
        "backoff",
        "max_retry_after",
        "on_retry",
        "respect_retry_after",
        "retry_on",
        "timeout",
        "total_timeout",
    )

    def __init__(
        self,
        *,
        attempts: int = 4,
        backoff: Backoff | None = None,
        retry_on: RetryOn = is_transient,
        timeout: float | timedelta | None = None,
        total_timeout: float | timedelta | None = None,
        respect_retry_after: bool = True,
        max_retry_after: float | timedelta = 60.0,
        on_retry: Callable[[RetryDetails], None] | None = None,
    ) -> None:
        # Each setting is checked here: a wrong one would otherwise fail at the first failure,
        # its error taking the place of the provider's.
        count(attempts, "attempts", at_least=1)
        self.attempts: int = attempts
        self.backoff: Backoff = _backoff(backoff)
        self.retry_on: Callable[[BaseException], bool] = _predicate(retry_on)
        self.timeout: float | None = None if timeout is None else time_limit(timeout, "timeout")
        self.total_timeout: float | None = (
            None if total_timeout is None else time_limit(total_timeout, "total_timeout")
        )
        if not isinstance(respect_retry_after, bool):
            raise UsageError(
                f"respect_retry_after must be True or False, got {respect_retry_after!r}"
            )
        self.respect_retry_after: bool = respect_retry_after
        self.max_retry_after: float = seconds(max_retry_after, "max_retry_after")
        if on_retry is not None and not callable(on_retry):
            raise UsageError(
                f"on_retry must be a function taking a RetryDetails, or None, got {on_retry!r}"
            )
        self.on_retry: Callable[[RetryDetails], None] | None = on_retry

    def __repr__(self) -> str:
        return f"Retry(attempts={self.attempts}, backoff={self.backoff!r}, timeout={self.timeout})"

    async def call(self, fn: Callable[[], Awaitable[T]], *, name: str = "call") -> T:
        """Run ``fn()`` (a fresh awaitable per attempt) under this policy, its ``timeout`` per
        attempt and its ``total_timeout`` included."""
        total = self.total_timeout
        if total is None:
            return await self.run_attempts(fn, name, timeout=self.timeout)
        attempts = self.run_attempts(
            fn, name, deadline=time.monotonic() + total, timeout=self.timeout
        )
        return await _within(total, attempts, f"{name}: no result within {total:g}s in all")

    async def run_attempts(
        self,
        fn: Callable[[*Ts], Awaitable[T]],
        name: str,
        *args: *Ts,
        deadline: float | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - a per-attempt limit, not the call's
        span: Span | None = None,
    ) -> T:
        """Every attempt of ``fn(*args)``, the first included, until one succeeds or the policy
        gives up (then the last error is raised, with a note saying why). ``timeout`` bounds
        each attempt; no wait is begun that would pass ``deadline`` (``time.monotonic()``).
        Retries are recorded on ``span`` (by default the current span).

        The policy's own ``timeout`` and ``total_timeout`` are not applied here but by
        :meth:`call`: an agent call applies them itself (as the attempt's timeout, recorded on
        its span, and as the call's deadline, which covers its fallbacks and tools too)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                if timeout is None:
                    return await fn(*args)
                said = f"{name}: attempt {attempt} took longer than its {timeout:g}s"
                return await _within(timeout, fn(*args), said)
            except Exception as error:
                wait = await self._wait_before_retry(error, attempt, name, deadline, span)
                if wait is None:
                    raise
            await _config.sleep(wait)

    async def _wait_before_retry(
        self,
        error: Exception,
        attempt: int,
        name: str,
        deadline: float | None,
        span: Span | None = None,
    ) -> float | None:
        """Seconds to wait before the next attempt, or ``None`` to give up and re-raise.

        A coroutine for the retry budget, whose :meth:`~RetryBudget.spend` is awaited (one
        shared by a Ray cluster asks its actor); it runs only after a failed attempt, so a call
        that succeeds at once does not pay for it."""
        if span is None:
            span = current_span.get()
        if not self.retry_on(error):
            return None
        if attempt >= self.attempts:
            error.add_note(f"kagura: gave up after {attempt} attempts")
            return None
        asked = retry_after(error) if self.respect_retry_after else None
        if asked is not None and asked > self.max_retry_after:
            error.add_note(
                f"kagura: not retried: Retry-After {asked:g}s exceeds max_retry_after "
                f"{self.max_retry_after:g}s"
            )
            return None
        wait = self.backoff.delay(attempt)
        if asked is not None:
            wait = max(wait, asked)
        if deadline is not None and time.monotonic() + wait >= deadline:
            error.add_note("kagura: not retried: the wait would pass the total timeout")
            return None
        # Innermost first: a retry a child's own budget refuses leaves its parent's untouched.
        # One an outer budget refuses has been counted by the inner ones; it errs on the side of
        # the limit.
        for budget in current_retry_budgets():
            if not await budget.spend():
                error.add_note(f"kagura: not retried: {budget.describe()}")
                span_event(span, "retry_budget_exhausted", name=name)
                return None
        details = RetryDetails(name, attempt, self.attempts, error, wait, asked)
        span_event(
            span,
            "retry_wait",
            name=name,
            attempt=attempt,
            error=f"{type(error).__name__}: {str_of(error)}",
            wait=wait,
            retry_after=asked,
        )
        if self.on_retry is not None:
            self.on_retry(details)
        return wait

    # -- decorator ----------------------------------------------------------------------------

    # Typed as what the wrapper (an ``async def``) returns, a coroutine: ``asyncio.run`` and
    # ``create_task`` refuse other awaitables. (``object``, not ``Any``: see Agent.__call__.)
    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[object, object, T]]:
        """Use the policy as a decorator on any async callable (an agent included)."""
        if not callable(fn) or inspect.isclass(fn):
            raise UsageError(f"Retry(...) decorates async callables, got {fn!r}")
        if not awaits_when_called(fn):
            raise UsageError(
                f"Retry(...) decorates async callables; {fn!r} is not (wrap a sync function "
                f"in an async def, or retry it with `async for attempt in policy`)"
            )
        name = str(getattr(fn, "__qualname__", None) or getattr(fn, "name", None) or fn)

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self.call(lambda: fn(*args, **kwargs), name=name)

        return wrapper

    # -- context iterator ---------------------------------------------------------------------

    async def __aiter__(self) -> AsyncIterator[Attempt]:
        """``async for attempt in policy: with attempt: ...`` retries the block.

        A block cannot be interrupted from outside, so here ``timeout`` does not apply and
        ``total_timeout`` is checked between attempts; put ``async with asyncio.timeout(...)``
        inside the block to bound a single attempt.
        """
        deadline = None if self.total_timeout is None else time.monotonic() + self.total_timeout
        number = 0
        while True:
            number += 1
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"gave up: total_timeout of {self.total_timeout:g}s passed")
            block = Attempt(number)
            yield block
            if block.error is None:
                return
            wait = await self._wait_before_retry(block.error, number, "block", deadline)
            if wait is None:
                raise block.error
            await _config.sleep(wait)


async def _within(seconds: float, awaitable: Awaitable[T], said: str) -> T:
    """``awaitable``, cancelled after ``seconds``: then a ``TimeoutError`` that says so (``said``),
    where asyncio's has no message."""
    scope = asyncio.timeout(seconds)
    try:
        async with scope:
            return await awaitable
    except TimeoutError as exc:
        if not scope.expired():  # the awaitable's own
            raise
        raise TimeoutError(said) from exc


class Attempt:
    """One try of a retried block. Errors inside are held for the policy to judge."""

    __slots__ = ("error", "number")

    def __init__(self, number: int) -> None:
        self.number: int = number
        self.error: Exception | None = None

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if isinstance(exc, Exception):
            self.error = exc
            return True
        return False


def _backoff(backoff: object) -> Backoff:
    if backoff is None:
        return jittered(0.5, cap=30.0)
    if isinstance(backoff, Backoff):
        return backoff
    said = "backoff must be a Backoff such as exponential() or fixed(1.0)"
    if any(backoff is factory for factory in (exponential, fixed, jittered)):
        name = getattr(backoff, "__name__", "")
        raise UsageError(f"{said}; got the function {name}: call it, as in {name}(...)")
    raise UsageError(f"{said}, got {backoff!r}")


def _predicate(retry_on: RetryOn) -> Callable[[BaseException], bool]:
    if isinstance(retry_on, type | tuple):
        types = exception_types(
            retry_on, "retry_on", takes="a predicate, an exception type or a tuple of them"
        )

        def matches(error: BaseException) -> bool:
            return isinstance(error, types)

        return matches
    if callable(retry_on):
        return retry_on
    raise UsageError(
        f"retry_on must be a predicate, an exception type or a tuple of them, got {retry_on!r}"
    )


#: The lowercase spelling, for decorator use (``@retry(attempts=3)``): the same class.
retry = Retry


#: What an agent uses when nothing else is configured: 3 retries of transient errors with jittered
#: exponential backoff (0.5 s doubling, capped at 30 s), honouring Retry-After.
DEFAULT_RETRY = Retry(attempts=4)
