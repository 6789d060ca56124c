"""Budgets shared by every call in a workflow run or a batch: retries, and cost (USD, tokens).

A budget applies to the code inside ``with budget:`` (or each run of ``@workflow(retry_budget=...,
budget_usd=...)``) and to every task started there, through a context variable. Budgets are
counters shared by the concurrent tasks of one event loop; they need no lock because the loop runs
one task at a time.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from types import TracebackType

from .._usage import Usage
from ..errors import RunError, UsageError

__all__ = ["BudgetExceeded", "CostBudget", "RetryBudget"]


class BudgetExceeded(RunError):
    """A cost or token budget is spent: the call was not sent."""

    def __init__(self, message: str, *, budget: CostBudget) -> None:
        self.budget = budget
        super().__init__(message)


class RetryBudget:
    """At most ``max_retries`` retries in total, across every call that shares the budget.

    When it is spent, failures pass through unretried (with a note saying so), so one bad
    dependency cannot multiply the load of a whole batch.
    """

    def __init__(self, max_retries: int) -> None:
        if max_retries < 0:
            raise UsageError(f"max_retries must be 0 or more, got {max_retries}")
        self.max_retries = max_retries
        self.used = 0
        self._tokens: list[Token[RetryBudget | None]] = []

    @property
    def remaining(self) -> int:
        return self.max_retries - self.used

    def try_spend(self) -> bool:
        if self.used >= self.max_retries:
            return False
        self.used += 1
        return True

    def describe(self) -> str:
        return f"retry budget spent ({self.used} of {self.max_retries} retries used)"

    def __enter__(self) -> RetryBudget:
        self._tokens.append(_retry_budget.set(self))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _retry_budget.reset(self._tokens.pop())

    def __repr__(self) -> str:
        return f"RetryBudget(used={self.used}, max_retries={self.max_retries})"


class CostBudget:
    """A ceiling on USD and/or tokens spent by LLM calls. Calls once it is spent raise
    :class:`BudgetExceeded` before reaching the provider; calls to models known to be free
    (the local model) still pass a USD budget, which is what makes a cheap fallback useful.

    The check happens before each call and the charge after it, so calls already in flight when
    the budget runs out may overspend it by their own cost; bound that with a concurrency limit.
    """

    def __init__(self, *, usd: float | None = None, tokens: int | None = None) -> None:
        if usd is None and tokens is None:
            raise UsageError("CostBudget needs usd=, tokens= or both")
        if (usd is not None and usd < 0) or (tokens is not None and tokens < 0):
            raise UsageError("budget limits must not be negative")
        self.usd = usd
        self.tokens = tokens
        self.spent_usd = 0.0
        self.spent_tokens = 0
        self.unpriced_calls = 0
        self._tokens: list[Token[CostBudget | None]] = []

    def check(self, *, free: bool) -> None:
        """Raise :class:`BudgetExceeded` if the next call may not be sent."""
        if self.tokens is not None and self.spent_tokens >= self.tokens:
            raise BudgetExceeded(
                f"token budget spent: {self.spent_tokens} of {self.tokens} tokens used", budget=self
            )
        if not free and self.usd is not None and self.spent_usd >= self.usd:
            raise BudgetExceeded(
                f"cost budget spent: ${self.spent_usd:.6f} of ${self.usd:.6f} used", budget=self
            )

    def charge(self, usage: Usage, cost: float | None) -> None:
        self.spent_tokens += usage.total_tokens
        if cost is None:
            self.unpriced_calls += 1  # counted, so a report can say the USD figure is a floor
        else:
            self.spent_usd += cost

    def __enter__(self) -> CostBudget:
        self._tokens.append(_cost_budget.set(self))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _cost_budget.reset(self._tokens.pop())

    def __repr__(self) -> str:
        return (
            f"CostBudget(spent_usd={self.spent_usd:.6f}, usd={self.usd}, "
            f"spent_tokens={self.spent_tokens}, tokens={self.tokens})"
        )


_retry_budget: ContextVar[RetryBudget | None] = ContextVar("kagura_retry_budget", default=None)
_cost_budget: ContextVar[CostBudget | None] = ContextVar("kagura_cost_budget", default=None)


def current_retry_budget() -> RetryBudget | None:
    return _retry_budget.get()


def current_cost_budget() -> CostBudget | None:
    return _cost_budget.get()
