"""Rate limits shared by every task: requests per second or minute, and tokens per minute.

Token buckets that start full at their capacity (so the first burst is never above it) and refill
continuously. Waiters are served first come, first served: each holds the limiter's FIFO lock while
it waits, so a later caller can never overtake an earlier one. A 429 from the provider slows the
limiter down (the rate halves, then recovers linearly) and holds every caller for ``Retry-After``.
Token use is estimated from the prompt before the call and settled with the real usage after.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta

from .._checks import count, real
from .._context import current_span
from .._instrument import span_event
from ..errors import UsageError
from ..providers import Model, model_id
from . import _config
from ._backoff import seconds


class Permit:
    """Returned by :meth:`RateLimiter.acquire`; settle it with the tokens really used."""

    __slots__ = ("_limiter", "estimate")

    def __init__(self, limiter: RateLimiter, estimate: int) -> None:
        self._limiter = limiter
        self.estimate: int = estimate

    def settle(self, actual_tokens: int) -> None:
        """Give back to the token bucket, or take from it, the difference between the estimate
        and ``actual_tokens``."""
        self._limiter._settle(self.estimate, actual_tokens)


class RateLimiter:
    """Args:
    name: the key it is shared under (``limit_model`` uses ``provider/model``).
    requests_per_second / requests_per_minute: request rate (give one, or neither).
    tokens_per_minute: token rate; its bucket holds one minute of tokens.
    burst: requests that may go at once (default: one second's worth, at least 1).
    slowdown: factor applied to the rate on each 429 (floor: 1/16 of the configured rate).
    recovery_time: how long the rate takes to climb back after a 429.
    max_retry_after: the longest a 429's ``Retry-After`` holds every caller (default 60 s, the
        retry policy's own default limit). A server asking for longer (an hour, a day) is not
        waited for by the retry policy either: the call that got it fails, and the callers after
        it go again after this long rather than wait with nothing said.
    """

    def __init__(
        self,
        name: str = "rate-limit",
        *,
        requests_per_second: float | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        burst: int | None = None,
        slowdown: float = 0.5,
        recovery_time: float | timedelta = 30.0,
        max_retry_after: float | timedelta = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        if requests_per_second is not None and requests_per_minute is not None:
            raise UsageError("give requests_per_second or requests_per_minute, not both")
        for what, value in (
            ("requests_per_second", requests_per_second),
            ("requests_per_minute", requests_per_minute),
            ("tokens_per_minute", tokens_per_minute),
        ):
            if value is not None and not 0 < real(value, what) < math.inf:
                raise UsageError(f"{what} must be a positive, finite number, got {value!r}")
        if burst is not None:
            count(burst, "burst", at_least=1)
        real(slowdown, "slowdown")
        rate = (
            requests_per_second
            if requests_per_second is not None
            else (requests_per_minute / 60 if requests_per_minute is not None else None)
        )
        if rate is None and tokens_per_minute is None:
            raise UsageError("a RateLimiter needs a request rate, tokens_per_minute, or both")
        if (rate is not None and rate <= 0) or (
            tokens_per_minute is not None and tokens_per_minute <= 0
        ):
            raise UsageError("rates must be positive")
        if not 0 < slowdown <= 1:
            raise UsageError(f"slowdown must be in (0, 1], got {slowdown}")
        self.name = name
        self.request_rate = rate
        self.token_rate: float | None = (
            tokens_per_minute / 60 if tokens_per_minute is not None else None
        )
        self.request_capacity: float = float(
            burst if burst is not None else max(1, math.ceil(rate or 1))
        )
        if self.request_capacity < 1:
            raise UsageError(f"burst must be at least 1, got {burst}")
        self.token_capacity: float = float(tokens_per_minute or 0)
        self.slowdown = slowdown
        self.recovery_time: float = seconds(recovery_time, "recovery_time")
        self.max_retry_after: float = seconds(max_retry_after, "max_retry_after")
        self._clock = clock
        self._sleep = sleep
        self._virtual = 0.0  # time skipped by test mode, so buckets still refill
        now = self._now()
        self._requests = self.request_capacity
        self._tokens = self.token_capacity
        self._updated = now
        self._multiplier = 1.0
        self._penalised_at = now
        self._penalty_floor = 1.0
        self._blocked_until = now
        # One FIFO lock per event loop (asyncio locks bind to a loop); dropped with the loop.
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._state_lock = threading.Lock()
        #: Requests admitted, and the seconds spent waiting, since creation.
        self.admitted: int = 0
        self.waited: float = 0.0

    def _now(self) -> float:
        return self._clock() + self._virtual

    def _fifo_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()  # wakes its waiters in FIFO order
        return lock

    def _rate_multiplier(self, now: float) -> float:
        if self._penalty_floor >= 1.0 or self.recovery_time == 0:
            return 1.0
        progress = min(1.0, (now - self._penalised_at) / self.recovery_time)
        multiplier = self._penalty_floor + (1.0 - self._penalty_floor) * progress
        if progress >= 1.0:
            self._penalty_floor = 1.0
        return multiplier

    def _refill(self, now: float) -> float:
        elapsed = max(0.0, now - self._updated)
        self._updated = now
        multiplier = self._rate_multiplier(now)
        if self.request_rate is not None:
            self._requests = min(
                self.request_capacity, self._requests + elapsed * self.request_rate * multiplier
            )
        if self.token_rate is not None:
            self._tokens = min(
                self.token_capacity, self._tokens + elapsed * self.token_rate * multiplier
            )
        return multiplier

    def _wait_needed(self, estimate: int) -> float:
        now = self._now()
        multiplier = self._refill(now)
        wait = max(0.0, self._blocked_until - now)
        if self.request_rate is not None and self._requests < 1:
            wait = max(wait, (1 - self._requests) / (self.request_rate * multiplier))
        if self.token_rate is not None:
            wanted = min(float(estimate), self.token_capacity)
            if self._tokens < wanted:
                wait = max(wait, (wanted - self._tokens) / (self.token_rate * multiplier))
        return wait

    async def acquire(self, tokens: int = 0) -> Permit:
        """Wait for a turn that sends one request using about ``tokens`` tokens."""
        waited = 0.0
        async with self._fifo_lock():
            while True:
                with self._state_lock:
                    wait = self._wait_needed(tokens)
                    if wait <= 1e-9:
                        self._requests -= 1
                        self._tokens -= tokens
                        self.admitted += 1
                        self.waited += waited
                        break
                if waited == 0.0:
                    span_event(current_span.get(), "rate_limit_wait", limiter=self.name, wait=wait)
                waited += wait
                await self._pause(wait)
        return Permit(self, tokens)

    async def _pause(self, wait: float) -> None:
        if self._sleep is not None:
            await self._sleep(wait)
        elif _config.is_testing():
            self._virtual += wait
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(wait)

    def _settle(self, estimate: int, actual: int) -> None:
        if self.token_rate is not None:
            with self._state_lock:
                self._tokens += estimate - actual

    def penalise(self, retry_after: float | None = None) -> None:
        """The provider said 429: slow down, and hold every caller for ``retry_after``."""
        with self._state_lock:
            now = self._now()
            current = self._rate_multiplier(now)
            self._penalty_floor = max(1 / 16, current * self.slowdown)
            self._penalised_at = now
            if retry_after:
                hold = min(retry_after, self.max_retry_after)
                self._blocked_until = max(self._blocked_until, now + hold)
        span_event(
            current_span.get(),
            "rate_limit_slowdown",
            limiter=self.name,
            rate_multiplier=self._penalty_floor,
            retry_after=retry_after,
        )

    @property
    def rate_multiplier(self) -> float:
        with self._state_lock:
            return self._rate_multiplier(self._now())

    def __repr__(self) -> str:
        return f"<RateLimiter {self.name!r} rps={self.request_rate} tps={self.token_rate}>"


_registry: dict[str, RateLimiter] = {}
_registry_lock = threading.Lock()


def limit_model(
    model: str | Model,
    *,
    requests_per_second: float | None = None,
    requests_per_minute: float | None = None,
    tokens_per_minute: float | None = None,
    burst: int | None = None,
) -> RateLimiter:
    """Rate-limit every agent call to ``model`` in this process. Calling it again replaces the
    limit.

    ``model`` is a :class:`~kagura.providers.Model`, or a model string as ``@agent(model=...)``
    takes it: ``"gpt-4o-mini"`` and ``"openai/gpt-4o-mini"`` limit the same model. A custom
    ``Model`` whose provider is not registered is limited by passing it. A model an agent sends
    to its own ``base_url=`` is ``"openai/<model string>"``."""
    model = _model_key(model)
    limiter = RateLimiter(
        model,
        requests_per_second=requests_per_second,
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
        burst=burst,
    )
    with _registry_lock:
        _registry[model] = limiter
    return limiter


def _model_key(model: object) -> str:
    # Kept under the model's id, which is what an agent call looks it up by, however the agent
    # named the model: a limit under another spelling would never apply.
    if isinstance(model, str):
        try:
            return model_id(model)
        except UsageError as error:
            # Refused, not kept as given: a typo ("opneai/...") would be a limit never applied.
            raise UsageError(
                f"limit_model takes a model string as @agent(model=...) does, or the Model "
                f"itself (a custom Model whose provider is not registered): {error}"
            ) from None
    if isinstance(model, Model):
        return model.id
    raise UsageError(
        f"limit_model takes a model string, such as 'openai/gpt-4o-mini', or a Model, got {model!r}"
    )


def limiter_for_model(model: str) -> RateLimiter | None:
    """The limit set with :func:`limit_model` for a model's id (``Model.id``), if any."""
    return _registry.get(model)


def model_limits() -> dict[str, RateLimiter]:
    """The limits set with :func:`limit_model`, by model id, as they are now (a copy)."""
    with _registry_lock:
        return dict(_registry)


def set_model_limits(limits: Mapping[str, RateLimiter]) -> None:
    """Set these limits by model id, each in place of any set for its model."""
    with _registry_lock:
        _registry.update(limits)


def reset_rate_limits() -> None:
    """Forget every rate limiter set with :func:`limit_model`."""
    with _registry_lock:
        _registry.clear()


def estimate_tokens(messages: list[dict[str, object]]) -> int:
    """A cheap prompt-size estimate (about 4 characters a token), settled later with real usage."""
    chars = sum(len(str(m.get("content") or "")) for m in messages)
    return chars // 4 + 4 * len(messages)
