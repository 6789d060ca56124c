"""The policies around a streamed model call: those of :func:`call_model`, around its opening.

A streamed call can be retried only until its reader has been shown something: a new attempt
would show the same beginning again. So the retry policy wraps opening the stream and reading
it up to its first item (what counts as one is the caller's, see :func:`open_stream`), each
attempt guarded as in :func:`call_model`: rate limiter, cost budgets, circuit breaker. What comes
after is read outside the retries, and settles the guards when the stream ends: the breaker
learns the outcome, the rate limiter the tokens really used, the budget the cost.

Timeouts: ``timeout`` bounds each wait for a chunk, the first included (so a stalled stream
fails, while a long answer that keeps coming does not); the call's total timeout is a deadline
for all of it, the reader's own time between items included.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .._context import Span
from .._llm import StreamedAttempt, is_free, usage_and_cost
from .._usage import Usage
from ..providers import Model, ModelRequest, ModelResponse, StreamChunk
from ._breaker import CircuitBreaker, settle_admitted
from ._budget import CostBudget
from ._classify import retry_after
from ._policies import Policies, guards_for
from ._ratelimit import Permit, RateLimiter, estimate_tokens

T = TypeVar("T")


class GuardedStream:
    """A streamed attempt that opened under the policies. Read it with :meth:`next`; its end,
    its failure or :meth:`close` settles the guards it passed, once."""

    __slots__ = (
        "_admitted",
        "_breaker",
        "_budgets",
        "_limiter",
        "_permit",
        "_settled",
        "attempt",
    )

    def __init__(
        self,
        attempt: StreamedAttempt,
        breaker: CircuitBreaker | None,
        limiter: RateLimiter | None,
        permit: Permit | None,
        budgets: tuple[CostBudget, ...] | None,
        admitted: int | None = None,
    ) -> None:
        self.attempt = attempt
        self._breaker = breaker
        self._admitted = admitted  # what the breaker's admission returned
        self._limiter = limiter
        self._permit = permit
        self._budgets = budgets
        self._settled = False

    @property
    def text(self) -> str:
        """The answer as far as it has arrived."""
        return "".join(self.attempt.text)

    async def next(self) -> StreamChunk:
        """The next text delta, or the final answer."""
        try:
            chunk = await self.attempt.next()
        except BaseException as error:
            self.failed(error)
            raise
        if isinstance(chunk, ModelResponse):
            self._succeeded(chunk)
        return chunk

    async def close(self, reason: BaseException | None = None) -> None:
        """Stop reading: the provider's stream is closed, and the attempt counts as ended by
        ``reason`` (by default, the reader stopping: no sign of the provider's health)."""
        try:
            await self.attempt.close(reason)
        finally:
            self.failed(reason if reason is not None else asyncio.CancelledError())

    def failed(self, error: BaseException) -> None:
        if self._settled:
            return
        self._settled = True
        if self._breaker is not None:
            self._breaker.record_failure(error, admitted=self._admitted)
        if self._limiter is not None and getattr(error, "status_code", None) == 429:
            self._limiter.penalise(retry_after(error))
        if self._budgets is not None and self.attempt.text:
            # Tokens were generated, and their number is unknown: counted as a call of unknown
            # price (so a report can say the spend is a floor), or as free on a free model.
            cost = 0.0 if is_free(self.attempt.model) else None
            for budget in self._budgets:
                budget.charge(Usage(), cost)

    def _succeeded(self, response: ModelResponse) -> None:
        if self._settled:
            return
        self._settled = True
        if self._breaker is not None:
            self._breaker.record_success(admitted=self._admitted)
        usage, cost = usage_and_cost(self.attempt.model, response.usage)
        if self._permit is not None and usage is not None:
            self._permit.settle(usage.total_tokens)
        if self._budgets is not None:
            for budget in self._budgets:
                budget.charge(usage or Usage(), cost)


async def open_stream(
    model: Model,
    request: ModelRequest,
    parent: Span,
    policies: Policies,
    first: Callable[[GuardedStream], Awaitable[T]],
    *,
    deadline: float | None = None,
) -> tuple[GuardedStream, T]:
    """Open a stream of ``model`` under ``policies``, and read it with ``first`` until it has
    something to show the reader; returns the open stream and what ``first`` returned.

    An attempt fails when opening it or ``first`` raises; it is then closed and, under the retry
    policy, made again (each attempt its own ``llm`` span). ``deadline`` (``time.monotonic()``)
    is when the whole call must be over: no retry wait goes past it, and every read stops at it.
    The caller sets the current span (where retries and breaker changes are recorded).
    """
    breaker, limiter, retry, timeout, budgets = guards_for(policies, model)
    loop_deadline = None
    if deadline is not None:
        loop_deadline = asyncio.get_running_loop().time() + (deadline - time.monotonic())

    async def one_attempt() -> tuple[GuardedStream, T]:
        # In call_model's order, for its reasons (see _policies._guarded_attempt).
        permit = None
        if limiter is not None:
            permit = await limiter.acquire(estimate_tokens(request.messages))
        if budgets is not None:
            free = is_free(model)
            for budget in budgets:
                await budget.admit(free=free)
        admitted = None
        if breaker is not None:
            admitted = await breaker.admit()
        stream: GuardedStream | None = None
        try:
            attempt = StreamedAttempt(
                model, request, parent, timeout=timeout, deadline=loop_deadline
            )
            stream = GuardedStream(attempt, breaker, limiter, permit, budgets, admitted)
            await attempt.start()
            return stream, await first(stream)
        except BaseException as error:
            if stream is None:
                if breaker is not None:
                    await settle_admitted(breaker, error, admitted)
                if limiter is not None and getattr(error, "status_code", None) == 429:
                    limiter.penalise(retry_after(error))
            else:
                # The attempt's own error is the one to report, should closing fail too.
                with contextlib.suppress(Exception):
                    await stream.close(error)
            raise

    if retry is None:
        return await one_attempt()
    # The policy's timeouts are applied here, per chunk and as the deadline: not by the policy.
    return await retry.run_attempts(one_attempt, model.id, deadline=deadline)
