"""Resilience policies on agents, and ``@workflow(...)`` settings as defaults for the agents
inside: retries, timeouts, cancellation, breakers, and how the levels combine."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from kagura import Agent, agent, tool, workflow
from kagura.errors import ProviderError, ProviderTimeout, UsageError
from kagura.providers import ToolCall
from kagura.resilience import (
    CircuitBreaker,
    CircuitOpenError,
    CostBudget,
    Fallback,
    Policies,
    RateLimiter,
    Retry,
    RetryBudget,
    fixed,
)
from kagura.resilience._policies import LIBRARY_DEFAULTS, UNSET, effective, guards_for
from kagura.testing import FakeModel, Reply, capture_events, override_model

from ..conftest import JumpingClock
from .conftest import FakeClock, settle, turns_until

pytestmark = pytest.mark.usefixtures("no_waits")


def down(n: int, status: int = 503) -> list[BaseException]:
    return [ProviderError("down", status_code=status) for _ in range(n)]


def hang() -> Reply:
    return Reply("too late", delay=3600)


@agent
async def ask(q: str) -> str:
    """{{ q }}"""


@pytest.fixture
def fake() -> Any:
    model = FakeModel()
    with override_model(model):
        yield model


def retry_waits(events: Any) -> list[float]:
    return [e.attributes["wait"] for e in events.span_events if e.name == "retry_wait"]


async def assert_no_other_tasks() -> None:
    await settle()
    current = asyncio.current_task()
    leftovers = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    assert leftovers == []


# -- default retries -----------------------------------------------------------------------


async def test_an_agent_retries_transient_errors_three_times_by_default(fake: FakeModel) -> None:
    fake.add(*down(10))
    with capture_events() as events, pytest.raises(ProviderError) as caught:
        await ask("x")
    assert len(fake.requests) == 4
    assert any("gave up after 4 attempts" in n for n in caught.value.__notes__)
    assert len(retry_waits(events)) == 3


async def test_an_agent_recovers_from_transient_errors(fake: FakeModel) -> None:
    fake.add(*down(2), "fine")
    assert await ask("x") == "fine"
    assert len(fake.requests) == 3


async def test_default_waits_are_jittered_exponential(
    fake: FakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.add(*down(10))
    with capture_events() as events, pytest.raises(ProviderError):
        await ask("x")
    waits = retry_waits(events)
    assert len(waits) == 3
    for n, wait in enumerate(waits):
        assert 0.0 <= wait <= 0.5 * 2**n  # full jitter under 0.5 s doubling

    # The ceilings of the draws are 0.5, 1, 2: exponential; draws span down to 0: jittered.
    for pick, expected in ((max, [0.5, 1.0, 2.0]), (min, [0.0, 0.0, 0.0])):
        monkeypatch.setattr(random, "uniform", lambda a, b, pick=pick: pick(a, b))
        fake.add(*down(4))
        with capture_events() as events, pytest.raises(ProviderError):
            await ask("x")
        assert retry_waits(events) == expected


async def test_waits_are_computed_even_when_sleeps_are_skipped(fake: FakeModel) -> None:
    fake.add(ProviderError("slow down", status_code=429, headers={"Retry-After": "30"}), "ok")
    with capture_events() as events:
        assert await ask("x") == "ok"
    assert retry_waits(events)[0] >= 30


async def test_retry_events_belong_to_the_agent_span(fake: FakeModel) -> None:
    fake.add(*down(1))
    with capture_events() as events:
        await ask("x")
    (span,) = events.spans(kind="agent")
    (wait,) = [e for e in events.span_events if e.name == "retry_wait"]
    assert wait.span_id == span.span_id
    assert wait.attributes["name"] == fake.id
    assert wait.attributes["attempt"] == 1


async def test_every_attempt_is_its_own_llm_span(fake: FakeModel) -> None:
    fake.add(*down(2), "ok")
    with capture_events() as events:
        await ask("x")
    (agent_span,) = events.spans(kind="agent")
    llm = events.spans(kind="llm")
    assert [s.status for s in llm] == ["failed", "failed", "completed"]
    assert all(s.parent_id == agent_span.span_id for s in llm)
    assert len({s.span_id for s in llm}) == 3
    assert llm[0].error_type == "ProviderError"
    assert agent_span.status == "completed"


async def test_permanent_errors_are_not_retried(fake: FakeModel) -> None:
    fake.add(*down(3, status=400))
    with pytest.raises(ProviderError):
        await ask("x")
    assert len(fake.requests) == 1


async def test_retry_false_makes_a_single_attempt(fake: FakeModel) -> None:
    @agent(retry=False)
    async def once(q: str) -> str:
        """{{ q }}"""

    fake.add(*down(3))
    with capture_events() as events, pytest.raises(ProviderError) as caught:
        await once("x")
    assert len(fake.requests) == 1
    assert not getattr(caught.value, "__notes__", [])
    assert [s.status for s in events.spans(kind="llm")] == ["failed"]


async def test_retry_none_also_makes_a_single_attempt(fake: FakeModel) -> None:
    @agent(retry=None)
    async def once(q: str) -> str:
        """{{ q }}"""

    fake.add(*down(3))
    with pytest.raises(ProviderError):
        await once("x")
    assert len(fake.requests) == 1


async def test_retry_true_is_the_default_policy(fake: FakeModel) -> None:
    @agent(retry=True)
    async def again(q: str) -> str:
        """{{ q }}"""

    fake.add(*down(10))
    with pytest.raises(ProviderError):
        await again("x")
    assert len(fake.requests) == 4


async def test_an_agents_own_retry_policy(fake: FakeModel) -> None:
    @agent(retry=Retry(attempts=2, backoff=fixed(1)))
    async def twice(q: str) -> str:
        """{{ q }}"""

    fake.add(*down(10))
    with capture_events() as events, pytest.raises(ProviderError):
        await twice("x")
    assert len(fake.requests) == 2
    assert retry_waits(events) == [1.0]


def test_retry_must_be_a_policy() -> None:
    with pytest.raises(UsageError):

        @agent(retry=3)  # type: ignore[call-overload]
        async def bad(q: str) -> str:
            """{{ q }}"""


# -- timeouts ------------------------------------------------------------------------------


async def test_a_per_attempt_timeout_turns_a_hang_into_provider_timeout(fake: FakeModel) -> None:
    @agent(retry=False, timeout=0.01)
    async def quick(q: str) -> str:
        """{{ q }}"""

    fake.add(hang())
    with capture_events() as events, pytest.raises(ProviderTimeout) as caught:
        await quick("x")
    assert isinstance(caught.value, TimeoutError)
    assert isinstance(caught.value, asyncio.TimeoutError)
    assert "0.01" in str(caught.value)
    (llm,) = events.spans(kind="llm")
    assert llm.status == "timed_out"
    assert events.spans(kind="agent")[0].status == "timed_out"


async def test_a_timed_out_attempt_is_retried(fake: FakeModel) -> None:
    @agent(timeout=0.01)
    async def quick(q: str) -> str:
        """{{ q }}"""

    fake.add(hang(), "second try")
    with capture_events() as events:
        assert await quick("x") == "second try"
    assert [s.status for s in events.spans(kind="llm")] == ["timed_out", "completed"]
    (wait,) = [e for e in events.span_events if e.name == "retry_wait"]
    assert wait.attributes["error"].startswith("ProviderTimeout")


async def test_a_retry_policys_timeout_applies_per_attempt(fake: FakeModel) -> None:
    @agent(retry=Retry(attempts=2, timeout=0.01))
    async def quick(q: str) -> str:
        """{{ q }}"""

    fake.add(hang(), hang(), "never reached")
    with capture_events() as events, pytest.raises(ProviderTimeout):
        await quick("x")
    assert len(fake.requests) == 2
    assert [s.status for s in events.spans(kind="llm")] == ["timed_out", "timed_out"]


async def test_total_timeout_bounds_the_whole_call(fake: FakeModel) -> None:
    @agent(total_timeout=0.02)
    async def bounded(q: str) -> str:
        """{{ q }}"""

    fake.add(hang())
    with capture_events() as events, pytest.raises(TimeoutError):
        await bounded("x")
    assert len(fake.requests) == 1
    assert events.spans(kind="agent")[0].status == "timed_out"
    # The attempt was cut short by the call's timeout: recorded as such, not as cancelled.
    (attempt,) = events.spans(kind="llm")
    assert (attempt.status, attempt.error) == (
        "timed_out",
        "cut short by the agent call's total_timeout",
    )
    await assert_no_other_tasks()


async def test_a_tool_cut_short_by_the_total_timeout_is_recorded_timed_out(
    fake: FakeModel, jumping_clock: JumpingClock
) -> None:
    started = asyncio.Event()

    @tool
    async def slow_lookup(key: str) -> str:
        """Look ``key`` up."""
        started.set()
        await asyncio.Event().wait()
        return key

    @agent(tools=[slow_lookup], total_timeout=60)
    async def bounded(q: str) -> str:
        """{{ q }}"""

    fake.add(Reply(tool_calls=[ToolCall("c1", "slow_lookup", '{"key": "k"}')]))
    with capture_events() as events:
        call = asyncio.create_task(bounded("x"))
        await started.wait()
        await jumping_clock.pass_time(61)
        with pytest.raises(TimeoutError):
            await call
    assert [s.status for s in events.spans(kind="tool")] == ["timed_out"]
    await assert_no_other_tasks()


async def test_attempts_cut_short_by_the_total_timeout_leave_the_breaker_alone(
    fake: FakeModel, jumping_clock: JumpingClock
) -> None:
    # The total timeout is outside the breaker: the call's time may have gone on its tools or on
    # earlier attempts. A per-attempt timeout, inside it, is what tells a provider that hangs.
    breaker = CircuitBreaker("hangs", failure_threshold=2)

    @agent(retry=False, total_timeout=60, breaker=breaker)
    async def bounded(q: str) -> str:
        """{{ q }}"""

    @agent(retry=False, timeout=30, breaker=breaker)
    async def per_attempt(q: str) -> str:
        """{{ q }}"""

    async def cut_short(call: Agent[[str], str]) -> None:
        sent = len(fake.requests)
        task = asyncio.create_task(call("x"))
        await turns_until(lambda: len(fake.requests) > sent)
        await jumping_clock.pass_time(61)
        with pytest.raises(TimeoutError):
            await task

    fake.add(hang(), hang(), hang(), hang())
    await cut_short(bounded)
    await cut_short(bounded)
    assert (breaker.state, breaker.failures) == ("closed", 0)
    await cut_short(per_attempt)
    await cut_short(per_attempt)
    assert breaker.state == "open"


async def test_a_call_cancelled_by_its_caller_is_still_recorded_cancelled(fake: FakeModel) -> None:
    @agent(total_timeout=60)
    async def bounded(q: str) -> str:
        """{{ q }}"""

    fake.add(hang())
    with capture_events() as events:
        task = asyncio.create_task(bounded("x"))
        await turns_until(lambda: len(fake.requests) == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [s.status for s in events.spans()] == ["cancelled", "cancelled"]


async def test_total_timeout_covers_retries(fake: FakeModel) -> None:
    @agent(retry=Retry(attempts=1_000_000, timeout=0.002), total_timeout=0.03)
    async def bounded(q: str) -> str:
        """{{ q }}"""

    fake.add(*(hang() for _ in range(1000)))
    with pytest.raises(TimeoutError):
        await bounded("x")
    # The attempts were cut short one by one, then the whole call was.
    assert 1 <= len(fake.requests) < 1000
    await assert_no_other_tasks()


async def test_a_retry_policys_total_timeout_bounds_the_agent_call(fake: FakeModel) -> None:
    @agent(retry=Retry(total_timeout=0.02))
    async def bounded(q: str) -> str:
        """{{ q }}"""

    fake.add(hang())
    with capture_events() as events, pytest.raises(TimeoutError):
        await bounded("x")
    assert events.spans(kind="agent")[0].status == "timed_out"


def test_negative_timeouts_are_usage_errors() -> None:
    with pytest.raises(UsageError):

        @agent(timeout=-1)
        async def bad(q: str) -> str:
            """{{ q }}"""


# -- cancellation --------------------------------------------------------------------------


async def test_cancelling_an_agent_call_leaves_no_task_running() -> None:
    model = FakeModel([hang()])

    @agent(model=model)
    async def slow(q: str) -> str:
        """{{ q }}"""

    with capture_events() as events:
        task = asyncio.create_task(slow("x"))
        await turns_until(lambda: len(model.requests) == 1)
        await settle()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert task.cancelled()
    await assert_no_other_tasks()
    assert len(model.requests) == 1  # cancellation is never retried
    assert events.spans(kind="llm")[0].status == "cancelled"
    assert events.spans(kind="agent")[0].status == "cancelled"


async def test_cancelling_during_a_retry_wait_stops_the_call() -> None:
    from kagura.resilience import set_testing

    set_testing(False)  # a real (hour-long) backoff wait; the fixture restores test mode
    model = FakeModel(down(5))
    waiting = asyncio.Event()

    @agent(model=model, retry=Retry(backoff=fixed(3600), on_retry=lambda _: waiting.set()))
    async def slow(q: str) -> str:
        """{{ q }}"""

    task = asyncio.create_task(slow("x"))
    await waiting.wait()
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(model.requests) == 1
    await assert_no_other_tasks()


async def test_cancelling_a_workflow_cancels_its_concurrent_agent_calls() -> None:
    model = FakeModel([hang() for _ in range(3)])

    @agent(model=model)
    async def slow(q: str) -> str:
        """{{ q }}"""

    @workflow
    async def fan_out() -> list[str]:
        return list(await asyncio.gather(slow("a"), slow("b"), slow("c")))

    with capture_events() as events:
        task = asyncio.create_task(fan_out())
        await turns_until(lambda: len(model.requests) == 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await assert_no_other_tasks()
    assert [s.status for s in events.spans(kind="agent")] == ["cancelled"] * 3
    assert events.spans(kind="workflow")[0].status == "cancelled"


# -- workflow defaults ---------------------------------------------------------------------


async def test_workflow_retry_is_the_default_for_agents_inside(fake: FakeModel) -> None:
    @workflow(retry=Retry(attempts=2))
    async def flow() -> str:
        return await ask("x")

    fake.add(*down(10))
    with pytest.raises(ProviderError):
        await flow()
    assert len(fake.requests) == 2
    # Outside the workflow the library default applies again.
    fake.add(*down(10))
    with pytest.raises(ProviderError):
        await ask("x")
    assert len(fake.requests) == 2 + 4


async def test_workflow_defaults_reach_agents_inside_gather(fake: FakeModel) -> None:
    @workflow(retry=Retry(attempts=2))
    async def flow() -> list[object]:
        return await asyncio.gather(ask("a"), ask("b"), ask("c"), return_exceptions=True)

    fake.add(*down(100))
    results = await flow()
    assert all(isinstance(r, ProviderError) for r in results)
    assert len(fake.requests) == 6


async def test_workflow_defaults_reach_agents_in_created_tasks(fake: FakeModel) -> None:
    @workflow(retry=False)
    async def flow() -> str:
        return await asyncio.create_task(ask("a"))

    fake.add(*down(10))
    with pytest.raises(ProviderError):
        await flow()
    assert len(fake.requests) == 1


async def test_an_agents_own_setting_wins(fake: FakeModel) -> None:
    @agent(retry=Retry(attempts=3))
    async def stubborn(q: str) -> str:
        """{{ q }}"""

    @agent(retry=False)
    async def once(q: str) -> str:
        """{{ q }}"""

    @workflow(retry=Retry(attempts=2))
    async def flow(which: Any) -> str:
        return await which("x")

    fake.add(*down(100))
    with pytest.raises(ProviderError):
        await flow(stubborn)
    assert len(fake.requests) == 3
    with pytest.raises(ProviderError):
        await flow(once)
    assert len(fake.requests) == 4


async def test_workflow_timeout_is_the_default_per_attempt_timeout(fake: FakeModel) -> None:
    @workflow(retry=False, timeout=0.01)
    async def flow() -> str:
        return await ask("x")

    fake.add(hang())
    with capture_events() as events, pytest.raises(ProviderTimeout):
        await flow()
    assert events.spans(kind="llm")[0].status == "timed_out"


async def test_an_agents_timeout_none_turns_off_the_workflows(fake: FakeModel) -> None:
    @agent(timeout=None)
    async def patient(q: str) -> str:
        """{{ q }}"""

    @workflow(timeout=0.01)
    async def flow() -> Any:
        return effective(patient.policies), effective(ask.policies)

    own, inherited = await flow()
    assert own.timeout is None
    assert inherited.timeout == 0.01


async def test_an_agents_none_turns_off_the_timeouts_of_its_workflows_retry_policy(
    fake: FakeModel,
) -> None:
    @agent(timeout=None, total_timeout=None)
    async def patient(q: str) -> str:
        """{{ q }}"""

    @workflow(retry=Retry(attempts=2, timeout=0.01, total_timeout=0.01))
    async def flow() -> Any:
        own, inherited = effective(patient.policies), effective(ask.policies)
        timeouts = [(guards_for(p, fake)[3], p.call_timeout()) for p in (own, inherited)]
        return timeouts, await patient("x")

    fake.add(Reply("done", delay=0.05))  # longer than the workflow's timeouts, which are off
    assert await flow() == ([(None, None), (0.01, 0.01)], "done")


def test_a_retry_policys_timeouts_beat_a_none_beside_them() -> None:
    # On one level the Retry says more than a timeout=None (a factory's default, say).
    policies = Policies.from_options(
        {"timeout": None, "total_timeout": None, "retry": Retry(timeout=0.05, total_timeout=2)}
    )
    merged = policies.over(LIBRARY_DEFAULTS)
    assert (guards_for(merged, FakeModel())[3], merged.call_timeout()) == (0.05, 2)


async def test_an_agents_retry_timeouts_beat_the_workflows_timeouts(fake: FakeModel) -> None:
    @agent(retry=Retry(attempts=1, timeout=0.01, total_timeout=5))
    async def quick(q: str) -> str:
        """{{ q }}"""

    @workflow(timeout=3600, total_timeout=3600)
    async def flow() -> str:
        assert effective(quick.policies).timeout == 0.01
        assert effective(quick.policies).total_timeout == 5
        return await quick("x")

    fake.add(hang())
    with pytest.raises(ProviderTimeout):
        await flow()


async def test_a_nested_workflows_retry_timeout_beats_the_outer_timeout() -> None:
    @workflow(retry=Retry(attempts=2, timeout=0.5))
    async def inner() -> float:
        return effective(ask.policies).timeout

    @workflow(timeout=60)
    async def outer() -> float:
        return await inner()

    assert await outer() == 0.5


async def test_workflow_total_timeout(fake: FakeModel) -> None:
    @workflow(total_timeout=0.02)
    async def flow() -> str:
        return await ask("x")

    fake.add(hang())
    with pytest.raises(TimeoutError):
        await flow()
    await assert_no_other_tasks()


async def test_workflow_breaker_is_the_default(fake: FakeModel, clock: FakeClock) -> None:
    breaker = CircuitBreaker("wf", failure_threshold=2, clock=clock)

    @workflow(retry=False, breaker=breaker)
    async def flow() -> list[object]:
        return await asyncio.gather(*(ask(str(i)) for i in range(4)), return_exceptions=True)

    fake.add(*down(100))
    results = await flow()
    assert breaker.state == "open"
    assert [type(r) for r in results] == [ProviderError, ProviderError] + [CircuitOpenError] * 2
    assert len(fake.requests) == 2


async def test_nested_workflows_inherit_and_override(fake: FakeModel) -> None:
    seen: dict[str, Any] = {}
    breaker = CircuitBreaker("nested", failure_threshold=100)

    @workflow(retry=Retry(attempts=3), breaker=breaker)
    async def inner_override() -> str:
        seen["override"] = effective(ask.policies)
        return await ask("x")

    @workflow(timeout=5)
    async def inner_inherit() -> str:
        seen["inherit"] = effective(ask.policies)
        return await ask("x")

    @workflow(retry=Retry(attempts=2), timeout=1)
    async def outer() -> list[object]:
        seen["outer"] = effective(ask.policies)
        return await asyncio.gather(inner_override(), inner_inherit(), return_exceptions=True)

    fake.add(*down(100))
    await outer()
    assert seen["outer"].retry.attempts == 2
    assert seen["outer"].timeout == 1
    assert seen["override"].retry.attempts == 3
    assert seen["override"].timeout == 1  # inherited from the outer workflow
    assert seen["override"].breaker is breaker
    assert seen["inherit"].retry.attempts == 2  # inherited
    assert seen["inherit"].timeout == 5  # overridden
    assert seen["inherit"].breaker is None
    assert len(fake.requests) == 3 + 2
    assert breaker.failures == 3
    # After the run, nothing leaks into the caller's context.
    assert effective(ask.policies).retry.attempts == 4


def test_policies_fall_through_unset_fields() -> None:
    base = Policies(retry=Retry(attempts=2), timeout=3.0, total_timeout=None, breaker=True)
    mine = Policies(timeout=None)
    merged = mine.over(base)
    assert merged.retry is base.retry
    assert merged.timeout is None  # None is a setting ("off"), not a gap
    assert merged.breaker is True
    assert merged.rate_limit is UNSET


NAN = float("nan")


@pytest.mark.parametrize(
    ("make", "said"),
    [
        # NaN passes a "limit < 1" check, and would then switch the limit off.
        (lambda: Retry(attempts=NAN), "attempts must be a whole number"),
        (lambda: Retry(attempts=2.5), "attempts must be a whole number"),
        (lambda: Retry(total_timeout=NAN), "total_timeout must be a number"),
        (lambda: CircuitBreaker("m", failure_threshold=NAN), "failure_threshold"),
        (lambda: CircuitBreaker("m", half_open_probes="2"), "half_open_probes"),
        (lambda: RetryBudget(NAN), "max_retries must be a whole number"),
        (lambda: CostBudget(usd=NAN), "usd must be a number"),
        (lambda: CostBudget(tokens=1.5), "tokens must be a whole number"),
        (lambda: RateLimiter(requests_per_minute=NAN), "requests_per_minute must be a number"),
        (lambda: RateLimiter(requests_per_second=float("inf")), "positive, finite number"),
        (lambda: RateLimiter(requests_per_second=1, burst=NAN), "burst must be a whole number"),
        (lambda: Fallback(5), "Fallback's options are async callables"),
    ],
)
def test_a_policy_of_no_usable_number_is_refused_when_it_is_made(make: Any, said: str) -> None:
    with pytest.raises(UsageError, match=said):
        make()
