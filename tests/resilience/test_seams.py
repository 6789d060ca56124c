"""The awaited seams of the guarded paths (``admit``, ``settle``, ``spend``): what an agent's
attempts and the retry policy use, so that a breaker or budget whose state is elsewhere (one
shared by a Ray cluster, kagura.ray) can answer without blocking the event loop. Here they are
overridden without Ray: the sync methods must then not be called on those paths."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kagura import agent
from kagura._usage import Usage
from kagura.errors import BudgetExceeded, CircuitOpenError, ProviderError
from kagura.resilience import (
    CircuitBreaker,
    CostBudget,
    Retry,
    RetryBudget,
    current_retry_budget,
    fixed,
)
from kagura.testing import FakeModel


def http(status: int) -> ProviderError:
    return ProviderError("scripted", model="fake/seams", status_code=status)


class ElsewhereBreaker(CircuitBreaker):
    """Answers through its seams only, from a breaker of its own (the state kept elsewhere)."""

    def __init__(self) -> None:
        super().__init__("elsewhere", failure_threshold=2)
        self.inner = CircuitBreaker("inner", failure_threshold=2)
        self.seen: list[str] = []

    def before_call(self) -> None:
        raise AssertionError("the sync before_call was used")

    def record_success(self) -> None:
        raise AssertionError("the sync record_success was used")

    def record_failure(self, error: BaseException) -> None:
        raise AssertionError("the sync record_failure was used")

    async def admit(self) -> None:
        self.seen.append("admit")
        self.inner.before_call()

    async def settle(self, error: BaseException | None) -> None:
        self.seen.append("ok" if error is None else "failed")
        await self.inner.settle(error)


async def test_an_agent_guards_its_attempts_through_the_breaker_seams() -> None:
    breaker = ElsewhereBreaker()
    model = FakeModel(["fine", http(500), http(500), "never sent"], name="seams")

    @agent(model=model, retry=False, breaker=breaker)
    async def ask(q: str) -> str:
        """{{ q }}"""

    assert await ask("a") == "fine"
    for _ in range(2):
        with pytest.raises(ProviderError):
            await ask("b")
    with pytest.raises(CircuitOpenError):
        await ask("c")
    assert breaker.seen == ["admit", "ok", "admit", "failed", "admit", "failed", "admit"]
    assert len(model.requests) == 3


async def test_call_and_async_with_use_the_breaker_seams() -> None:
    breaker = ElsewhereBreaker()

    async def works() -> int:
        return 1

    assert await breaker.call(works) == 1
    async with breaker:
        pass
    assert breaker.seen == ["admit", "ok", "admit", "ok"]


class ElsewhereRetryBudget(RetryBudget):
    def __init__(self, allowed: int) -> None:
        super().__init__(100, name="elsewhere")
        self.allowed = allowed
        self.asked = 0

    def try_spend(self) -> bool:
        raise AssertionError("the sync try_spend was used")

    async def spend(self) -> bool:
        self.asked += 1
        return self.asked <= self.allowed


async def test_the_retry_policy_spends_the_budget_through_its_seam() -> None:
    model = FakeModel([http(500)] * 10, name="seams-retry")

    @agent(model=model, retry=Retry(attempts=5, backoff=fixed(0.0)))
    async def ask(q: str) -> str:
        """{{ q }}"""

    budget = ElsewhereRetryBudget(allowed=1)
    with budget, pytest.raises(ProviderError) as raised:
        await ask("a")
    assert len(model.requests) == 2  # one retry allowed, the second refused
    assert budget.asked == 2
    assert any("retry budget spent" in note for note in raised.value.__notes__)


class ElsewhereCostBudget(CostBudget):
    def __init__(self) -> None:
        super().__init__(tokens=1, name="elsewhere")
        self.charged: list[int] = []
        self.refuse = False

    def check(self, *, free: bool) -> None:
        raise AssertionError("the sync check was used")

    def charge(self, usage: Usage, cost: float | None) -> None:
        raise AssertionError("the sync charge was used")

    async def admit(self, *, free: bool) -> None:
        if self.refuse:
            raise BudgetExceeded("spent elsewhere", budget=self)

    async def settle(self, usage: Usage, cost: float | None) -> None:
        self.charged.append(usage.total_tokens)


async def test_an_agent_checks_and_charges_the_cost_budget_through_its_seams() -> None:
    model = FakeModel(["fine", "never sent"], name="seams-cost")

    @agent(model=model, retry=False)
    async def ask(q: str) -> str:
        """{{ q }}"""

    budget = ElsewhereCostBudget()
    with budget:
        assert await ask("a") == "fine"
        budget.refuse = True
        with pytest.raises(BudgetExceeded):
            await ask("b")
    assert len(budget.charged) == 1 and budget.charged[0] > 0
    assert len(model.requests) == 1


def test_budgets_take_a_name() -> None:
    budgets: list[Any] = [RetryBudget(2, name="batch"), CostBudget(usd=1.0, name="batch")]
    assert [budget.name for budget in budgets] == ["batch", "batch"]
    assert RetryBudget(2).name is None and CostBudget(tokens=5).name is None


async def test_tasks_may_enter_one_budget_at_once() -> None:
    # A batch's items enter the batch's budget each in their own task, overlapping.
    budget = RetryBudget(3)
    inside = asyncio.Event()
    entered = 0

    async def item() -> None:
        nonlocal entered
        with budget:
            entered += 1
            if entered == 2:
                inside.set()
            await inside.wait()
            assert current_retry_budget() is budget
        assert current_retry_budget() is None

    await asyncio.gather(item(), item())
    assert current_retry_budget() is None
