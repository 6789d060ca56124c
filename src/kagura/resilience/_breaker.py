"""Circuit breakers: stop calling a dependency that keeps failing, then probe it carefully.

closed ──(failure_threshold consecutive failures)──▶ open ──(recovery_time passes)──▶ half-open
half-open ──(a probe succeeds)──▶ closed;  half-open ──(a probe fails)──▶ open

While open, calls fail fast with :class:`CircuitOpenError` without touching the dependency. In
half-open at most ``half_open_probes`` calls are let through at once; the others fail fast.
Breakers are shared by name across every task of the process (``circuit_breaker("name")``).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import timedelta
from typing import Any, Literal, ParamSpec, TypeVar

from .._checks import count
from .._context import current_span
from .._instrument import span_event
from ..errors import CircuitOpenError, UsageError
from ._backoff import seconds
from ._classify import is_transient

P = ParamSpec("P")
T = TypeVar("T")

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Args:
    name: the key it is shared under (an agent's default is its ``provider/model``).
    failure_threshold: consecutive failures that open the circuit.
    recovery_time: how long it stays open before letting probes through.
    half_open_probes: calls let through at once while half-open.
    failure_on: which errors count (default: transient ones; a 400 says nothing of health).
    on_state_change: called with ``(breaker, old_state, new_state)``.
    clock: a monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        recovery_time: float | timedelta = 30.0,
        half_open_probes: int = 1,
        failure_on: Callable[[BaseException], bool] = is_transient,
        on_state_change: Callable[[CircuitBreaker, BreakerState, BreakerState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        count(failure_threshold, "failure_threshold", at_least=1)
        count(half_open_probes, "half_open_probes", at_least=1)
        # Checked here: called only at a failure or a change of state, a wrong one would raise
        # its TypeError then, in place of the failure.
        if not callable(failure_on) or isinstance(failure_on, type):
            # A class is callable too, and its instances true: every error would count.
            raise UsageError(
                f"failure_on must be a predicate taking an exception, such as "
                f"kagura.resilience.is_transient or lambda e: isinstance(e, ProviderError), "
                f"got {failure_on!r}"
            )
        if on_state_change is not None and not callable(on_state_change):
            raise UsageError(
                f"on_state_change must be a function taking (breaker, old_state, new_state), "
                f"or None, got {on_state_change!r}"
            )
        self.name = name
        self.failure_threshold = failure_threshold
        self.recovery_time: float = seconds(recovery_time, "recovery_time")
        self.half_open_probes = half_open_probes
        self.failure_on = failure_on
        self.on_state_change = on_state_change
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probes = 0
        # Counts changes of state: what a call's admission returned tells a probe of this
        # half-open period from a late call admitted while the circuit was still closed.
        self._period = 0
        # Breakers are shared across event loops and threads (the local model's workers), so
        # state changes take a lock; it is never held across an await.
        self._lock = threading.RLock()  # reentrant: on_state_change may read .state
        # What admit() returned to each task in an ``async with`` block of this breaker, for its
        # exit to settle with (innermost last): a task's blocks nest, and tasks run at once.
        # Weakly: a block left in another task (an async generator closed later) leaves its
        # entering task's entry behind, which goes with the task.
        self._blocks: weakref.WeakKeyDictionary[asyncio.Task[Any], list[int | None]] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def state(self) -> BreakerState:
        with self._lock:
            self._advance()
            return self._state

    @property
    def failures(self) -> int:
        return self._failures

    def _advance(self) -> None:
        if self._state == "open" and self._clock() - self._opened_at >= self.recovery_time:
            self._set("half_open")

    def _set(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if old != new:
            self._period += 1
        if new == "open":
            self._opened_at = self._clock()
        if new != "half_open":
            self._probes = 0
        if old != new:
            span_event(current_span.get(), "breaker_state", breaker=self.name, old=old, new=new)
            if self.on_state_change is not None:
                self.on_state_change(self, old, new)

    def before_call(self) -> int:
        """Admit a call or raise :class:`CircuitOpenError`. Pair with ``record_*`` after, given
        what this returned as ``admitted=``: a call admitted before the circuit went half-open
        then neither takes a probe's place when it fails late, nor closes or reopens it."""
        with self._lock:
            self._advance()
            if self._state == "closed":
                return self._period
            if self._state == "half_open" and self._probes < self.half_open_probes:
                self._probes += 1
                return self._period
            probing = self._state == "half_open"
            retry_in = max(0.0, self.recovery_time - (self._clock() - self._opened_at))
        raise CircuitOpenError(self.name, retry_in, probing=probing)

    def record_success(self, *, admitted: int | None = None) -> None:
        """Count a call that succeeded (``admitted``: what :meth:`before_call` returned): a
        half-open circuit closes; a late answer from before the circuit opened is ignored."""
        with self._lock:
            if self._state == "open" or self._late(admitted):
                # A call admitted before the circuit opened answered late: one stale success
                # says little about health now, and must not close the circuit (flapping).
                return
            self._failures = 0
            if self._state == "half_open":
                self._set("closed")

    def record_failure(self, error: BaseException, *, admitted: int | None = None) -> None:
        """Count a call that failed with ``error``: one that ``failure_on`` accepts counts towards
        opening the circuit, and a probe's failure reopens it."""
        with self._lock:
            # Half-open if its time has come, as it would be had anyone looked meanwhile.
            self._advance()
            if self._state == "open" or self._late(admitted):
                # A call admitted before the circuit opened failed late: the circuit is open
                # already, until recovery_time after it opened (were it to reopen at every late
                # failure, calls slower than the recovery time would keep it open for ever).
                # Before its probes, and not a probe: its place is not freed either.
                return
            if self._state == "half_open":
                self._probes = max(0, self._probes - 1)
            if not self.failure_on(error):
                # Not a health signal (a bad request, a cancellation): a probe slot is freed, and
                # the failure count is left as it was.
                return
            self._failures += 1
            if self._state == "half_open" or self._failures >= self.failure_threshold:
                self._set("open")

    def _late(self, admitted: int | None) -> bool:
        """A half-open circuit hears of a call admitted before its probes (``None``: unknown, as
        from a caller that did not keep what :meth:`before_call` returned)."""
        return self._state == "half_open" and admitted is not None and admitted != self._period

    def reset(self) -> None:
        """Close the circuit and forget the failures counted."""
        with self._lock:
            self._failures = 0
            self._set("closed")

    # The awaited seams of the guarded paths (an agent's attempts, ``call``, ``async with``):
    # here they only call the methods above, while a breaker whose state lives elsewhere (one
    # shared by a Ray cluster, kagura.ray) asks for it there without blocking the event loop.

    async def admit(self) -> int | None:
        """:meth:`before_call`, awaited."""
        return self.before_call()

    async def settle(self, error: BaseException | None, admitted: int | None = None) -> None:
        """:meth:`record_success` (``error`` is ``None``) or :meth:`record_failure`, awaited;
        ``admitted`` is what :meth:`admit` returned."""
        if error is None:
            self.record_success(admitted=admitted)
        else:
            self.record_failure(error, admitted=admitted)

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` if the breaker admits it (else raise :class:`CircuitOpenError`), and record
        how it ended."""
        admitted = await self.admit()
        try:
            result = await fn()
        except BaseException as error:
            await settle_admitted(self, error, admitted)
            raise
        await settle_admitted(self, None, admitted)
        return result

    # Typed as what the wrapper (an ``async def``) returns, a coroutine: ``asyncio.run`` and
    # ``create_task`` refuse other awaitables. (``object``, not ``Any``: see Agent.__call__.)
    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[object, object, T]]:
        """Use the breaker as a decorator on any async function."""

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self.call(lambda: fn(*args, **kwargs))

        return wrapper

    async def __aenter__(self) -> CircuitBreaker:
        admitted = await self.admit()
        task = asyncio.current_task()
        if task is not None:
            with self._lock:
                self._blocks.setdefault(task, []).append(admitted)
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        task = asyncio.current_task()
        admitted = None  # unknown, for a block left in another task than it was entered in
        with self._lock:
            entered = self._blocks.get(task) if task is not None else None
            if task is not None and entered:
                admitted = entered.pop()
                if not entered:
                    del self._blocks[task]
        await settle_admitted(self, exc, admitted)

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self._state} failures={self._failures}>"


async def settle_admitted(
    breaker: CircuitBreaker, error: BaseException | None, admitted: int | None
) -> None:
    """``breaker.settle``, given what its admission returned when it returned something: seams
    of a breaker's own (a subclass's, kagura.ray's) that return nothing may take the outcome
    alone."""
    if admitted is None:
        await breaker.settle(error)
    else:
        await breaker.settle(error, admitted)


_registry: dict[str, CircuitBreaker] = {}
_registry_lock = threading.Lock()


def circuit_breaker(
    name: str,
    *,
    failure_threshold: int = 5,
    recovery_time: float | timedelta = 30.0,
    half_open_probes: int = 1,
    failure_on: Callable[[BaseException], bool] = is_transient,
    on_state_change: Callable[[CircuitBreaker, BreakerState, BreakerState], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> CircuitBreaker:
    """The process-wide breaker called ``name``, created with these settings on first use
    (later calls return it as it is, whatever settings they pass)."""
    with _registry_lock:
        breaker = _registry.get(name)
        if breaker is None:
            breaker = _registry[name] = CircuitBreaker(
                name,
                failure_threshold=failure_threshold,
                recovery_time=recovery_time,
                half_open_probes=half_open_probes,
                failure_on=failure_on,
                on_state_change=on_state_change,
                clock=clock,
            )
        return breaker


def shared_breakers() -> dict[str, CircuitBreaker]:
    """The breakers :func:`circuit_breaker` shares, by name, as they are now (a copy)."""
    with _registry_lock:
        return dict(_registry)


def share_breakers(breakers: Mapping[str, CircuitBreaker]) -> None:
    """Share these breakers by their names, each in place of any shared under its name."""
    with _registry_lock:
        _registry.update(breakers)


def reset_breakers() -> None:
    """Forget every shared breaker (tests)."""
    with _registry_lock:
        _registry.clear()
