"""Cluster-wide resilience, proven by what the fault server saw: a RateLimiter, CircuitBreaker,
RetryBudget or CostBudget taken to the workers (in an agent's policies, or as the budgets of
kagura.ray.map) is one object for the whole cluster."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

import kagura.ray
from kagura import agent, workflow
from kagura.errors import BudgetExceeded, CircuitOpenError, ProviderError
from kagura.ray import _cluster
from kagura.ray._worker import ship
from kagura.resilience import (
    CircuitBreaker,
    CostBudget,
    RateLimiter,
    Retry,
    RetryBudget,
    circuit_breaker,
    fixed,
    limit_model,
    reset_breakers,
    reset_rate_limits,
)
from kagura.testing.fault_server import Fault, FaultServer


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer.run_in_thread() as server:
        yield server


def _unique(what: str) -> str:
    # Named state actors live as long as the test session's driver: a name per test.
    return f"{what}-{uuid.uuid4().hex[:8]}"


def _most_in_any_window(times: list[float], window: float) -> int:
    times = sorted(times)
    most = 0
    start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        most = max(most, end - start + 1)
    return most


async def test_a_rate_limit_holds_for_the_cluster(cluster: None, server: FaultServer) -> None:
    limiter = RateLimiter(_unique("rps"), requests_per_second=10, burst=1)

    @agent(model="vllm/test", base_url=server.base_url, rate_limit=limiter, retry=False)
    async def ask(text: str) -> str:
        """Answer: {{ text }}"""

    async def ask_and_say_where(text: str) -> tuple[int, str]:
        return os.getpid(), await ask(text)

    # A worker's first call sets the provider up (the SDK's import) after its turn was given:
    # turns given 0.1 s apart would reach the server together. One call on each worker first.
    warm_up = await kagura.ray.map(ask_and_say_where, ["hello", "hello"], progress=False)
    assert len({pid for pid, _ in warm_up.results.values()}) == 2
    items = [f"question {i}" for i in range(40)]
    partial = await kagura.ray.map(ask_and_say_where, items, progress=False)

    assert not partial.errors
    assert len({pid for pid, _ in partial.results.values()}) == 2  # both workers sent requests
    times = [request.received_at for request in server.chat_requests[2:]]
    assert len(times) == 40
    # The bucket admits at most 1 + 10 * 2 requests in any two seconds, for the cluster: a
    # limiter of each worker's own would let all 40 through. The margin (8) is for turns given
    # in one window whose requests reach the server late, in the next: up to 0.8 s late.
    assert _most_in_any_window(times, 2.0) <= 21 + 8


async def test_a_breaker_opened_on_one_worker_fails_fast_on_the_other(
    cluster: None, server: FaultServer
) -> None:
    breaker = CircuitBreaker(_unique("breaker"), failure_threshold=3, recovery_time=600)
    server.set_rules(("", "500"))

    @agent(model="vllm/test", base_url=server.base_url, breaker=breaker, retry=False)
    async def ask(text: str) -> str:
        """Answer: {{ text }}"""

    first, second = _cluster.pool().workers
    hosts = ray.get([first.ready.remote(), second.ready.remote()])
    assert hosts[0][1] != hosts[1][1]  # two processes

    function = ship(ask)
    for i in range(3):  # one after another, on the first worker: the breaker opens there
        ok, error = await first.call.remote(function, f"fails {i}", None, None, (), None)
        assert not ok and isinstance(error, ProviderError)
    assert len(server.chat_requests) == 3

    outcomes = [
        await second.call.remote(function, f"refused {i}", None, None, (), None) for i in range(5)
    ]
    assert all(not ok and isinstance(error, CircuitOpenError) for ok, error in outcomes)
    assert len(server.chat_requests) == 3  # none of the second worker's calls was sent


async def test_a_retry_budget_holds_for_the_whole_batch(cluster: None, server: FaultServer) -> None:
    server.set_rules(("", "500"))
    retry = Retry(attempts=4, backoff=fixed(0.0))

    @agent(model="vllm/test", base_url=server.base_url, retry=retry)
    async def ask(text: str) -> str:
        """Answer: {{ text }}"""

    budget = RetryBudget(2)
    partial = await kagura.ray.map(
        ask, [f"item {i}" for i in range(8)], retry_budget=budget, progress=False
    )

    assert len(partial.errors) == 8
    assert all(isinstance(error, ProviderError) for error in partial.errors.values())
    # 8 first attempts and 2 retries for the whole batch: each worker's own budget of 2 would
    # have sent 4, and no budget 24.
    assert len(server.chat_requests) == 8 + 2
    assert budget.used == 2  # the driver's budget shows what the batch spent


async def test_a_cost_budget_stops_the_batch(cluster: None, server: FaultServer) -> None:
    server.set_rules(("", Fault.ok("fine", usage=(8, 2))))

    @agent(model="vllm/test", base_url=server.base_url, retry=False)
    async def ask(text: str) -> str:
        """Answer: {{ text }}"""

    budget = CostBudget(tokens=30)
    # One item at a time, so that each is charged before the next is checked.
    partial = await kagura.ray.map(
        ask, [f"item {i}" for i in range(6)], cost_budget=budget, concurrency=1, progress=False
    )

    assert sorted(partial.results) == [0, 1, 2]
    assert sorted(partial.errors) == [3, 4, 5]
    errors: list[Any] = list(partial.errors.values())
    assert all(isinstance(error, BudgetExceeded) for error in errors)
    assert all(error.budget is budget for error in errors)  # the driver's own object again
    assert len(server.chat_requests) == 3
    assert budget.spent_tokens == 30


async def test_the_drivers_model_limits_and_named_breakers_hold_for_the_cluster(
    cluster: None, server: FaultServer
) -> None:
    # limit_model and circuit_breaker(name) fill registries of the driver's process; each task
    # takes them along, so `breaker=True` and a model's limit are one object for the cluster.
    model = f"vllm/{_unique('model')}"
    try:
        limit_model(model, requests_per_second=5, burst=1)
        circuit_breaker(model, failure_threshold=2, recovery_time=600)

        @agent(model=model, base_url=server.base_url, breaker=True, retry=False)
        async def ask(text: str) -> str:
            """Answer: {{ text }}"""

        async def ask_and_say_where(text: str) -> tuple[int, str]:
            return os.getpid(), await ask(text)

        warm_up = await kagura.ray.map(ask_and_say_where, ["hello", "hello"], progress=False)
        assert len({pid for pid, _ in warm_up.results.values()}) == 2
        batch = await kagura.ray.map(
            ask_and_say_where, [f"q {i}" for i in range(20)], progress=False
        )
        assert not batch.errors
        assert len({pid for pid, _ in batch.results.values()}) == 2
        times = [request.received_at for request in server.chat_requests[2:]]
        # At most 1 + 5 * 2 in any two seconds for the cluster (a margin of 4 for requests
        # delivered late); a limit of each worker's own would let all 20 through in two.
        assert _most_in_any_window(times, 2.0) <= 11 + 4

        sent = len(server.chat_requests)
        server.set_rules(("", "500"))
        failing = await kagura.ray.map(
            ask, [f"fails {i}" for i in range(8)], concurrency=1, progress=False
        )
        errors = [failing.errors[i] for i in range(8)]
        assert [type(e) for e in errors[:2]] == [ProviderError, ProviderError]
        assert all(isinstance(e, CircuitOpenError) for e in errors[2:])  # on both workers
        assert len(server.chat_requests) == sent + 2
    finally:
        reset_rate_limits()
        reset_breakers()


async def test_budgets_around_a_batch_hold_for_its_items(
    cluster: None, server: FaultServer
) -> None:
    server.set_rules(("", Fault.ok("fine", usage=(8, 2))))

    @agent(model="vllm/test", base_url=server.base_url, retry=False)
    async def ask(text: str) -> str:
        """Answer: {{ text }}"""

    @workflow(budget_tokens=30)
    async def batch() -> Any:
        return await kagura.ray.map(
            ask, [f"w {i}" for i in range(6)], concurrency=1, progress=False
        )

    partial = await batch()
    assert sorted(partial.results) == [0, 1, 2]
    assert all(isinstance(e, BudgetExceeded) for e in partial.errors.values())
    assert len(server.chat_requests) == 3

    budget = CostBudget(tokens=30)
    with budget:
        await kagura.ray.map(ask, [f"b {i}" for i in range(6)], concurrency=1, progress=False)
    assert len(server.chat_requests) == 3 + 3
    assert budget.spent_tokens == 30  # the driver's object shows what the batch spent


async def test_a_budget_counts_the_drivers_own_calls_between_batches(
    cluster: None, server: FaultServer
) -> None:
    # The actor was made with what the budget had counted then: the driver's own call after the
    # first batch was unknown to it, and the batch's settling wrote its count over the driver's.
    server.set_rules(("", Fault.ok("fine", usage=(8, 2))))

    @agent(model="vllm/test", base_url=server.base_url, retry=False)
    async def ask(text: str) -> str:
        """Answer: {{ text }}"""

    budget = CostBudget(tokens=30)
    with budget:
        await kagura.ray.map(ask, ["first batch"], progress=False)
        await ask("here, in the driver")
        assert budget.spent_tokens == 20
        partial = await kagura.ray.map(
            ask, [f"second batch {i}" for i in range(3)], concurrency=1, progress=False
        )
    assert sorted(partial.results) == [0]
    assert all(isinstance(e, BudgetExceeded) for e in partial.errors.values())
    assert len(server.chat_requests) == 3
    assert budget.spent_tokens == 30


async def test_batches_at_once_under_one_budget_count_each_call_once(
    cluster: None, server: FaultServer
) -> None:
    # Two batches settling the budget at once each took the other's figure, written while it
    # waited for the actor, for the driver's own spending: counted twice, it refused later
    # batches early.
    server.set_rules(("", Fault.ok("fine", usage=(8, 2))))

    @agent(model="vllm/test", base_url=server.base_url, retry=False)
    async def ask(text: str) -> str:
        """Answer: {{ text }}"""

    budget = CostBudget(tokens=100)
    with budget:
        await kagura.ray.map(ask, ["first"], progress=False)
        for _ in range(2):
            await asyncio.gather(
                *(
                    kagura.ray.map(ask, [f"{side} {i}" for i in range(2)], progress=False)
                    for side in ("left", "right")
                )
            )
        assert budget.spent_tokens == 10 * len(server.chat_requests) == 90
        last = await kagura.ray.map(ask, ["last"], progress=False)
    assert sorted(last.results) == [0]
    assert budget.spent_tokens == 100


async def _until(condition: Any, limit: float = 60.0) -> None:
    """Poll ``condition`` (in a thread: it may read files) until it holds; fail after ``limit``."""
    deadline = asyncio.get_running_loop().time() + limit
    while not await asyncio.to_thread(condition):
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def _noting(marks: Path, ask: Any) -> Any:
    def note(text: str) -> None:
        with marks.open("a") as done:
            done.write(text + "\n")

    async def ask_and_note(text: str) -> str:
        answer: str = await ask(text)
        note(text)
        return answer

    return ask_and_note


async def test_a_cancelled_batch_shows_what_it_spent(
    cluster: None, server: FaultServer, tmp_path: Path
) -> None:
    # Settled only when the batch ended well: a batch cut short by a timeout showed nothing
    # spent, and the driver's calls after it went past the cap.
    server.set_rules(("slow", "hang"), ("", Fault.ok("fine", usage=(8, 2))))

    @agent(model="vllm/test", base_url=server.base_url, retry=False)
    async def ask(text: str) -> str:
        """Answer: {{ text }}"""

    marks = tmp_path / "done"
    budget = CostBudget(tokens=30)
    with budget:
        batch = asyncio.create_task(
            kagura.ray.map(_noting(marks, ask), ["fast 0", "fast 1", "slow"], progress=False)
        )
        await _until(lambda: marks.exists() and len(marks.read_text().split()) == 4)
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch
        assert budget.spent_tokens == 20
        assert await ask("one more, in the driver") == "fine"
        with pytest.raises(BudgetExceeded):
            await ask("past the cap")
