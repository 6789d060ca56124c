"""Resilience policies: retries with backoff, timeouts, fallbacks, circuit breakers, rate limits
and budgets.

Each is usable three ways: as an argument of ``@agent(...)``, as a default for every agent call
inside a ``@workflow(...)``, and on any async function (as a decorator, a context manager or, for
retries, a context iterator). With nothing configured an agent retries transient errors (429, 5xx,
timeouts, connection errors) up to 3 times with jittered exponential backoff (0.5 s doubling,
capped at 30 s), honouring ``Retry-After``; ``@agent(retry=False)`` turns that off.

Their errors, :class:`CircuitOpenError` and :class:`BudgetExceeded`, live in :mod:`kagura.errors`
with the rest of the exception tree, and are re-exported here.
"""

from ..errors import BudgetExceeded, CircuitOpenError
from ._backoff import Backoff, exponential, fixed, jittered
from ._breaker import CircuitBreaker, circuit_breaker, reset_breakers
from ._budget import (
    CostBudget,
    RetryBudget,
    current_cost_budget,
    current_cost_budgets,
    current_retry_budget,
    current_retry_budgets,
)
from ._classify import is_transient
from ._config import no_waits, set_testing
from ._fallback import Answer, Fallback
from ._policies import UNSET, Policies, PolicyOptions, Unset
from ._ratelimit import Permit, RateLimiter, limit_model, reset_rate_limits
from ._registry import Registry, registry, use_registry
from ._retry import DEFAULT_RETRY, Attempt, Retry, RetryDetails, retry

__all__ = [
    "DEFAULT_RETRY",
    "UNSET",
    "Answer",
    "Attempt",
    "Backoff",
    "BudgetExceeded",
    "CircuitBreaker",
    "CircuitOpenError",
    "CostBudget",
    "Fallback",
    "Permit",
    "Policies",
    "PolicyOptions",
    "RateLimiter",
    "Registry",
    "Retry",
    "RetryBudget",
    "RetryDetails",
    "Unset",
    "circuit_breaker",
    "current_cost_budget",
    "current_cost_budgets",
    "current_retry_budget",
    "current_retry_budgets",
    "exponential",
    "fixed",
    "is_transient",
    "jittered",
    "limit_model",
    "no_waits",
    "registry",
    "reset_breakers",
    "reset_rate_limits",
    "retry",
    "set_testing",
    "use_registry",
]
