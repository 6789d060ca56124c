"""The policies around every LLM attempt, and where an agent gets them from.

Order per attempt: rate limiter → cost budget → circuit breaker → (timeout) provider: the budget
and the breaker decide when the request would go, not before a wait in the limiter's queue (which
may be long, and during which the budget may be spent or the breaker open). The retry policy wraps
that whole sequence, so an open breaker or a spent budget is never retried, and every
retry is a separate recorded attempt. An agent's own settings win; what it leaves unset comes from
the innermost ``@workflow(...)`` around the call, then from the library defaults.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from typing import Any, Final, TypedDict, TypeVar

from .. import _llm
from .._context import Span, call_deadline, current_span
from .._usage import Usage
from ..errors import UsageError
from ..providers import Model, ModelRequest, ModelResponse
from ._backoff import time_limit
from ._breaker import CircuitBreaker, circuit_breaker, settle_admitted
from ._budget import CostBudget, current_cost_budgets
from ._classify import retry_after
from ._ratelimit import RateLimiter, estimate_tokens, limiter_for_model
from ._retry import DEFAULT_RETRY, Retry

T = TypeVar("T")


class Unset(enum.Enum):
    """The type of :data:`UNSET`: an agent setting left to the workflow or library default
    (``None`` means "off"). An enum of one member, so that type checkers narrow
    ``value is UNSET`` away."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Final = Unset.UNSET


class PolicyOptions(TypedDict, total=False):
    """The resilience settings an agent and a workflow take, all optional: left unset, one
    falls through to the next level (an agent's to its workflow's, a workflow's to the library
    defaults); ``None`` turns it off."""

    #: A :class:`~kagura.resilience.Retry`, ``True`` (the default policy) or ``False``/``None``.
    retry: Retry | bool | Unset | None
    #: Seconds per attempt.
    timeout: float | timedelta | Unset | None
    #: Seconds per agent call: retries, fallbacks and tools included.
    total_timeout: float | timedelta | Unset | None
    #: A :class:`~kagura.resilience.CircuitBreaker`, or ``True`` for the one shared per model.
    breaker: CircuitBreaker | bool | Unset | None
    #: A :class:`~kagura.resilience.RateLimiter`; unset or ``None``: the one set for the model
    #: with ``limit_model``, if any (its provider's quota, which no agent leaves).
    rate_limit: RateLimiter | Unset | None


@dataclass(frozen=True, slots=True)
class Policies:
    """Resilience settings for agent calls. ``UNSET`` fields fall through to the next level.

    retry: a :class:`Retry`, or ``None``/``False`` for a single attempt.
    timeout: seconds per attempt. total_timeout: seconds per agent call, retries included.
    breaker: a :class:`CircuitBreaker`, ``True`` for one shared per ``provider/model``, or off.
    rate_limit: a :class:`RateLimiter`; by default the one set with ``limit_model`` for the model.
    """

    retry: Retry | bool | Unset | None = UNSET
    timeout: float | Unset | None = UNSET
    total_timeout: float | Unset | None = UNSET
    breaker: CircuitBreaker | bool | Unset | None = UNSET
    rate_limit: RateLimiter | Unset | None = UNSET

    @classmethod
    def from_options(cls, options: PolicyOptions) -> Policies:
        """The settings given to ``@agent(...)`` or ``@workflow(...)``, checked, with durations
        in seconds."""
        retry = options.get("retry", UNSET)
        if not (retry is None or isinstance(retry, bool | Retry | Unset)):
            raise UsageError(
                f"retry must be a kagura.resilience.Retry, True, False or None, got {retry!r}"
            )
        breaker = options.get("breaker", UNSET)
        if not (breaker is None or isinstance(breaker, bool | CircuitBreaker | Unset)):
            raise UsageError(
                f"breaker must be a kagura.resilience.CircuitBreaker, True (one shared per "
                f"model), False or None, got {breaker!r}"
            )
        rate_limit = options.get("rate_limit", UNSET)
        if not (rate_limit is None or isinstance(rate_limit, RateLimiter | Unset)):
            raise UsageError(
                f"rate_limit must be a kagura.resilience.RateLimiter or None, got {rate_limit!r}"
            )
        timeout = options.get("timeout", UNSET)
        total = options.get("total_timeout", UNSET)
        if isinstance(retry, Retry):
            # Given together, the Retry's timeouts say more than a None beside them (a
            # factory's default, say): @agent(timeout=None, retry=Retry(timeout=5)) has 5.
            if timeout is None and retry.timeout is not None:
                timeout = retry.timeout
            if total is None and retry.total_timeout is not None:
                total = retry.total_timeout
        return cls(
            retry=retry,
            timeout=timeout
            if timeout is None or timeout is UNSET
            else time_limit(timeout, "timeout"),
            total_timeout=total
            if total is None or total is UNSET
            else time_limit(total, "total_timeout"),
            breaker=breaker,
            rate_limit=rate_limit,
        )

    def over(self, base: Policies) -> Policies:
        """These settings, with the unset ones taken from ``base``."""
        mine = _lifted(self)
        return replace(
            mine,
            **{name: getattr(base, name) for name in _FIELDS if getattr(mine, name) is UNSET},
        )

    def for_fallbacks(self) -> Policies:
        """These settings for an agent's fallback models. A breaker given as an object guards
        the agent's own model: were it to guard the fallbacks too, the failure that opened it
        would also refuse every fallback. Each fallback model gets the breaker shared under its
        own name instead."""
        if isinstance(self.breaker, CircuitBreaker):
            return replace(self, breaker=True)
        return self

    def call_timeout(self) -> float | None:
        """Seconds a whole call may take, retries, fallbacks and tools included, of merged
        policies (see :func:`effective`), where a retry policy's ``total_timeout`` is its
        level's own unless that level said otherwise: ``None`` is off."""
        return None if self.total_timeout is UNSET else self.total_timeout


def _lifted(p: Policies) -> Policies:
    """A level's ``Retry(timeout=..., total_timeout=...)`` counts as that level's own timeouts,
    so it beats the timeouts of an outer level (an agent's policy over its workflow's)."""
    retry = p.retry
    if not isinstance(retry, Retry):
        return p
    if p.timeout is UNSET and retry.timeout is not None:
        p = replace(p, timeout=retry.timeout)
    if p.total_timeout is UNSET and retry.total_timeout is not None:
        p = replace(p, total_timeout=retry.total_timeout)
    return p


_FIELDS = tuple(field.name for field in fields(Policies))

LIBRARY_DEFAULTS = Policies(
    retry=DEFAULT_RETRY, timeout=None, total_timeout=None, breaker=None, rate_limit=None
)

_workflow_policies: ContextVar[Policies | None] = ContextVar("kagura_policies", default=None)


def set_workflow_policies(policies: Policies) -> Any:
    """Install ``policies`` as the defaults for the current context (returns the reset token)."""
    outer = _workflow_policies.get()
    return _workflow_policies.set(policies.over(outer if outer is not None else Policies()))


def reset_workflow_policies(token: Any) -> None:
    _workflow_policies.reset(token)


# Policies objects are immutable, so each (agent, workflow) pair is merged once; keyed by identity
# (cheaper than hashing the dataclasses), holding the pair so the ids stay theirs.
_merged: dict[tuple[int, int], tuple[Policies, Policies | None, Policies]] = {}


def effective(agent_policies: Policies) -> Policies:
    outer = _workflow_policies.get()
    key = (id(agent_policies), id(outer))
    hit = _merged.get(key)
    if hit is not None and hit[0] is agent_policies and hit[1] is outer:
        return hit[2]
    merged = agent_policies.over(outer) if outer is not None else agent_policies
    result = merged.over(LIBRARY_DEFAULTS)
    if len(_merged) > 4096:
        _merged.clear()
    _merged[key] = (agent_policies, outer, result)
    return result


#: The policies as they apply to the attempts of one model: breaker, rate limiter, retry
#: policy, per-attempt timeout and cost budget. A plain tuple, not a NamedTuple, whose
#: constructor is a Python function: it is made for every model call.
Guards = tuple[
    CircuitBreaker | None,
    RateLimiter | None,
    Retry | None,
    float | None,
    tuple[CostBudget, ...] | None,
]


def guards_for(policies: Policies, model: Model) -> Guards:
    """What guards each attempt of ``model`` under ``policies`` (awaited or streamed). Merged
    policies (see :func:`effective`) have every setting; one left unset counts as off."""
    retry = policies.retry
    if retry is True:
        retry = DEFAULT_RETRY
    elif retry is False or retry is UNSET:
        retry = None
    # A retry policy's timeout is its level's own unless that level set one (see _lifted): a
    # None here is a level's "off", which an agent says over its workflow's Retry(timeout=...).
    timeout = None if policies.timeout is UNSET else policies.timeout
    breaker = policies.breaker
    if breaker is True:
        breaker = circuit_breaker(model.id)
    elif breaker is False or breaker is UNSET:
        breaker = None
    limiter = policies.rate_limit
    if limiter is None or limiter is UNSET:
        limiter = limiter_for_model(model.id)
    return breaker, limiter, retry, timeout, current_cost_budgets() or None


def call_model(
    model: Model, request: ModelRequest, parent: Span, policies: Policies
) -> Awaitable[ModelResponse]:
    """One logical model call of the agent call ``parent``, to await: every attempt, the first
    included, made by the retry policy, and each guarded by the others (cost budget, breaker,
    rate limiter, per-attempt timeout). What the policies do is recorded on ``parent``.

    A function returning the awaitable rather than a coroutine of its own, and the attempt's
    arguments handed to the policy rather than bound in a ``functools.partial``: each would be
    one more object kept per call in flight, and a fan-out has thousands in flight."""
    breaker, limiter, retry, timeout, budgets = guards_for(policies, model)
    # The attempt applies the per-attempt timeout, and the agent the total one, which still
    # bounds the retries: a wait that would pass the call's deadline is not begun.
    if breaker is None and limiter is None and budgets is None:
        # Nothing to guard (the default): each attempt is the provider's request itself.
        if retry is None:
            return _llm.attempt(model, request, parent, timeout)
        return retry.run_attempts(
            _llm.attempt,
            model.id,
            model,
            request,
            parent,
            timeout,
            deadline=call_deadline.get(),
            span=parent,
        )
    attempt = _guarded(model, request, parent, timeout, breaker, limiter, budgets)
    if retry is None:
        return attempt()
    return retry.run_attempts(attempt, model.id, deadline=call_deadline.get(), span=parent)


# A function of its own, not a closure inside call_model: every variable a nested function uses
# is made a cell at each call of the function that holds it, nested function made or not: seven
# objects more per model call in flight for the garbage collector, on the unguarded path too.
def _guarded(
    model: Model,
    request: ModelRequest,
    parent: Span,
    timeout: float | None,
    breaker: CircuitBreaker | None,
    limiter: RateLimiter | None,
    budgets: tuple[CostBudget, ...] | None,
) -> Callable[[], Awaitable[ModelResponse]]:
    """Each attempt of a guarded model call."""

    async def attempt() -> ModelResponse:
        # The breaker and the limiter record on the current span: the call's, here.
        token = current_span.set(parent)
        try:
            return await _guarded_attempt(
                model, request, parent, timeout, breaker, limiter, budgets
            )
        finally:
            current_span.reset(token)

    return attempt


async def _guarded_attempt(
    model: Model,
    request: ModelRequest,
    parent: Span,
    timeout: float | None,  # noqa: ASYNC109 - the per-attempt limit, applied by _llm.attempt
    breaker: CircuitBreaker | None,
    limiter: RateLimiter | None,
    budgets: tuple[CostBudget, ...] | None,
) -> ModelResponse:
    """One attempt, through the rate limiter, the cost budgets and the breaker."""
    # The turn first: a call refused after it has used a turn that sent nothing, which errs on
    # the side of the limit. The awaited seams (admit, settle) rather than the sync methods: a
    # breaker or budget shared by a Ray cluster answers from its actor.
    if limiter is not None:
        permit = await limiter.acquire(estimate_tokens(request.messages))
    if budgets is not None:
        free = _llm.is_free(model)
        for budget in budgets:
            await budget.admit(free=free)
    admitted = None
    if breaker is not None:
        admitted = await breaker.admit()
    try:
        response = await _llm.attempt(model, request, parent, timeout=timeout)
    except BaseException as error:
        if breaker is not None:
            # An attempt the call's total_timeout cut short is a cancellation here, not a
            # failure of the provider: the call's time may have gone on its tools or earlier
            # attempts, and the timeout is outside the breaker (the per-attempt one is inside).
            await settle_admitted(breaker, error, admitted)
        if limiter is not None and getattr(error, "status_code", None) == 429:
            limiter.penalise(retry_after(error))
        raise
    if breaker is not None:
        await settle_admitted(breaker, None, admitted)
    usage, cost = _llm.usage_and_cost(model, response.usage)
    if limiter is not None and usage is not None:
        permit.settle(usage.total_tokens)
    if budgets is not None:
        for budget in budgets:
            await budget.settle(usage or Usage(), cost)
    return response


async def with_total_timeout(total: float | None, coro: Awaitable[T]) -> T:
    # A provider's set-up (Model.prepare: an SDK import, loading weights) counts here, unlike
    # against a per-attempt timeout: this bounds how long the caller waits, whatever for, while
    # the other exists to catch a slow provider. A call that gives up leaves the set-up running
    # for the next one; a program can await model.prepare() at start-up to keep it out of calls.
    if total is None:
        return await coro
    deadline = time.monotonic() + total
    outer = call_deadline.get()
    token = call_deadline.set(deadline if outer is None else min(outer, deadline))
    try:
        async with asyncio.timeout(total):
            return await coro
    except TimeoutError as exc:
        if str(exc):
            raise
        raise TimeoutError(f"no answer within the total timeout of {total:g}s") from exc
    finally:
        call_deadline.reset(token)
