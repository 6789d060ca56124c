"""Budgets shared by every call in a workflow run or a batch: retries, and cost (USD, tokens).

A budget applies to the code inside ``with budget:`` (or each run of ``@workflow(retry_budget=...,
budget_usd=...)``) and to every task started there, through a context variable. Budgets nest: a
call is checked against, and charged to, every budget around it, so a child workflow's own budget
does not free it from its parent's. Budgets are counters shared by the concurrent tasks of one
event loop; they need no lock because the loop runs one task at a time. Under kagura.ray a budget
taken to the workers is one for the whole cluster (its counters in a Ray actor); ``name=`` shares
one by name there.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, ClassVar, Self

from .._checks import count, real
from .._usage import Usage
from ..errors import BudgetExceeded, UsageError

__all__ = ["BudgetExceeded", "CostBudget", "RetryBudget"]

_log = logging.getLogger("kagura.resilience")

# The budgets around the running code, innermost first.
_retry_budgets: ContextVar[tuple[RetryBudget, ...]] = ContextVar("kagura_retry_budgets", default=())
_cost_budgets: ContextVar[tuple[CostBudget, ...]] = ContextVar("kagura_cost_budgets", default=())


# The reset tokens of the ``with budget:`` blocks open in the running context, innermost last.
# Kept per context rather than on the budget: tasks entering one budget at once (a batch's items)
# would otherwise each reset the others' tokens.
_entered: ContextVar[tuple[Token[Any], ...]] = ContextVar("kagura_budget_scopes", default=())


class _Scope:
    """``with budget:`` makes the budget current, through the context variable ``_current``, for
    the code inside and every task started there, within the budgets already around it; on exit
    those alone are current again (entering the same budget again, nested or from several tasks
    at once, is fine: it is counted once)."""

    _current: ClassVar[ContextVar[tuple[Any, ...]]]

    def __init__(self) -> None:
        pass

    def __enter__(self) -> Self:
        around = tuple(budget for budget in self._current.get() if budget is not self)
        _entered.set((*_entered.get(), self._current.set((self, *around))))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        *outer, token = _entered.get()
        _entered.set(tuple(outer))
        self._current.reset(token)


class RetryBudget(_Scope):
    """At most ``max_retries`` retries in total, across every call that shares the budget.

    When it is spent, failures pass through unretried (with a note saying so), so one bad
    dependency cannot multiply the load of a whole batch.
    """

    _current = _retry_budgets

    def __init__(self, max_retries: int, *, name: str | None = None) -> None:
        count(max_retries, "max_retries", at_least=0)
        self.max_retries = max_retries
        self.name = name
        self.used: int = 0
        super().__init__()

    @property
    def remaining(self) -> int:
        return self.max_retries - self.used

    def try_spend(self) -> bool:
        """Take one retry from the budget; ``False`` when it is spent."""
        if self.used >= self.max_retries:
            return False
        self.used += 1
        return True

    async def spend(self) -> bool:
        """:meth:`try_spend`, awaited: the seam the retry policy uses, which a budget shared
        by a Ray cluster (kagura.ray) overrides to ask its actor without blocking the loop."""
        return self.try_spend()

    def describe(self) -> str:
        """Why a retry was refused, for the note added to the error."""
        return f"retry budget spent ({self.used} of {self.max_retries} retries used)"

    def __repr__(self) -> str:
        return f"RetryBudget(used={self.used}, max_retries={self.max_retries})"


class CostBudget(_Scope):
    """A ceiling on USD and/or tokens spent by LLM calls. Calls once it is spent raise
    :class:`BudgetExceeded` before reaching the provider; calls to models known to be free
    (the local model) still pass a USD budget, which is what makes a cheap fallback useful.

    The check happens before each call and the charge after it, so calls already in flight when
    the budget runs out may overspend it by their own cost; bound that with a concurrency limit.
    """

    _current = _cost_budgets

    def __init__(
        self, *, usd: float | None = None, tokens: int | None = None, name: str | None = None
    ) -> None:
        if usd is None and tokens is None:
            raise UsageError("CostBudget needs usd=, tokens= or both")
        if usd is not None:
            real(usd, "usd")
        if tokens is not None:
            count(tokens, "tokens", at_least=0)
        if (usd is not None and usd < 0) or (tokens is not None and tokens < 0):
            raise UsageError("budget limits must not be negative")
        self.usd = usd
        self.tokens = tokens
        self.name = name
        self.spent_usd: float = 0.0
        self.spent_tokens: int = 0
        self.unpriced_calls: int = 0
        super().__init__()

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
        """Add a call's tokens and its cost (``None``: unknown, counted as an unpriced call)."""
        self.spent_tokens += usage.total_tokens
        if cost is None:
            if self.usd is not None and not self.unpriced_calls:
                # Said once a budget: a USD limit that cannot count a model's calls would
                # otherwise let them all through with nothing said.
                _log.warning(
                    "a call of unknown price was made under a budget of $%s: it is counted but "
                    "cannot be charged, so the budget's spend is a floor. Its model has no known "
                    "price (give it one: kagura.pricing.register_price), or its answer reported "
                    "no usage.",
                    self.usd,
                )
            self.unpriced_calls += 1  # counted, so a report can say the USD figure is a floor
        else:
            self.spent_usd += cost

    # The awaited seams of a guarded attempt: a budget shared by a Ray cluster (kagura.ray)
    # overrides them to ask its actor without blocking the event loop.

    async def admit(self, *, free: bool) -> None:
        """:meth:`check`, awaited."""
        self.check(free=free)

    async def settle(self, usage: Usage, cost: float | None) -> None:
        """:meth:`charge`, awaited."""
        self.charge(usage, cost)

    def __repr__(self) -> str:
        return (
            f"CostBudget(spent_usd={self.spent_usd:.6f}, usd={self.usd}, "
            f"spent_tokens={self.spent_tokens}, tokens={self.tokens})"
        )


def current_retry_budget() -> RetryBudget | None:
    """The innermost retry budget around the running code."""
    budgets = _retry_budgets.get()
    return budgets[0] if budgets else None


def current_cost_budget() -> CostBudget | None:
    """The innermost cost budget around the running code."""
    budgets = _cost_budgets.get()
    return budgets[0] if budgets else None


def current_retry_budgets() -> tuple[RetryBudget, ...]:
    """Every retry budget around the running code, innermost first."""
    return _retry_budgets.get()


def current_cost_budgets() -> tuple[CostBudget, ...]:
    """Every cost budget around the running code, innermost first."""
    return _cost_budgets.get()
