"""Circuit breakers on a fake clock: opening, failing fast, probing, closing, and sharing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kagura import agent
from kagura.errors import ProviderError, RunError, UsageError
from kagura.resilience import (
    CircuitBreaker,
    CircuitOpenError,
    Retry,
    circuit_breaker,
    reset_breakers,
)
from kagura.testing import FakeModel, capture_events

from .conftest import FakeClock, settle


def http(status: int) -> ProviderError:
    return ProviderError("scripted", model="fake/echo", status_code=status)


class Dependency:
    """A flaky dependency whose next outcomes are scripted; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.failing: BaseException | None = None

    async def __call__(self) -> str:
        self.calls += 1
        if self.failing is not None:
            raise self.failing
        return "ok"


async def fail(breaker: CircuitBreaker, times: int, status: int = 503) -> None:
    for _ in range(times):
        with pytest.raises(ProviderError):
            await breaker.call(_raiser(http(status)))


def _raiser(error: BaseException) -> Any:
    async def raise_it() -> None:
        raise error

    return raise_it


async def _ok() -> str:
    return "ok"


@pytest.fixture
def transitions() -> list[tuple[str, str]]:
    return []


@pytest.fixture
def breaker(clock: FakeClock, transitions: list[tuple[str, str]]) -> CircuitBreaker:
    def changed(b: CircuitBreaker, old: str, new: str) -> None:
        assert b.name == "dep"
        transitions.append((old, new))

    return CircuitBreaker(
        "dep",
        failure_threshold=3,
        recovery_time=10,
        on_state_change=changed,
        clock=clock,
    )


async def test_a_new_breaker_is_closed_and_lets_calls_through(breaker: CircuitBreaker) -> None:
    assert breaker.state == "closed"
    assert await breaker.call(_ok) == "ok"
    assert breaker.failures == 0


async def test_opens_after_failure_threshold_consecutive_failures(
    breaker: CircuitBreaker, transitions: list[tuple[str, str]]
) -> None:
    await fail(breaker, 2)
    assert breaker.state == "closed"
    assert breaker.failures == 2
    await fail(breaker, 1)
    assert breaker.state == "open"
    assert transitions == [("closed", "open")]


async def test_a_success_resets_the_consecutive_count(breaker: CircuitBreaker) -> None:
    await fail(breaker, 2)
    assert await breaker.call(_ok) == "ok"
    assert breaker.failures == 0
    await fail(breaker, 2)
    assert breaker.state == "closed"


async def test_open_fails_fast_without_calling_the_dependency(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    await fail(breaker, 3)
    dep = Dependency()
    clock.advance(4)
    with pytest.raises(CircuitOpenError) as caught:
        await breaker.call(dep)
    assert dep.calls == 0
    assert caught.value.name == "dep"
    assert caught.value.retry_in == pytest.approx(6.0)
    assert isinstance(caught.value, RunError)
    assert "dep" in str(caught.value)


async def test_half_open_after_recovery_time(breaker: CircuitBreaker, clock: FakeClock) -> None:
    await fail(breaker, 3)
    clock.advance(9.9)
    assert breaker.state == "open"
    clock.advance(0.1)
    assert breaker.state == "half_open"


async def test_a_successful_probe_closes(
    breaker: CircuitBreaker, clock: FakeClock, transitions: list[tuple[str, str]]
) -> None:
    await fail(breaker, 3)
    clock.advance(10)
    dep = Dependency()
    assert await breaker.call(dep) == "ok"
    assert dep.calls == 1
    assert breaker.state == "closed"
    assert breaker.failures == 0
    assert transitions == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


async def test_a_failed_probe_reopens_for_another_recovery_time(
    breaker: CircuitBreaker, clock: FakeClock, transitions: list[tuple[str, str]]
) -> None:
    await fail(breaker, 3)
    clock.advance(10)
    await fail(breaker, 1)  # one failed probe is enough
    assert breaker.state == "open"
    clock.advance(9)
    assert breaker.state == "open"  # the recovery time restarts from the failed probe
    with pytest.raises(CircuitOpenError):
        await breaker.call(_ok)
    clock.advance(1)
    assert breaker.state == "half_open"
    assert transitions == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
    ]


async def test_half_open_admits_one_probe_at_a_time(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    await fail(breaker, 3)
    clock.advance(10)
    release = asyncio.Event()
    probe_calls = 0

    async def slow_probe() -> str:
        nonlocal probe_calls
        probe_calls += 1
        await release.wait()
        return "probed"

    probe = asyncio.create_task(breaker.call(slow_probe))
    await settle()
    assert probe_calls == 1
    dep = Dependency()
    for _ in range(3):
        with pytest.raises(CircuitOpenError) as refused:
            await breaker.call(dep)
        # Not "the next probe is allowed in 0.0s": one is under way.
        assert "is half-open: failing fast while its probe calls are under way" in str(
            refused.value
        )
    assert dep.calls == 0
    release.set()
    assert await probe == "probed"
    assert breaker.state == "closed"
    assert await breaker.call(dep) == "ok"


async def test_half_open_probes_limits_concurrent_probes(clock: FakeClock) -> None:
    breaker = CircuitBreaker(
        "dep", failure_threshold=1, recovery_time=5, half_open_probes=2, clock=clock
    )
    await fail(breaker, 1)
    clock.advance(5)
    release = asyncio.Event()
    running = 0

    async def probe() -> str:
        nonlocal running
        running += 1
        await release.wait()
        return "ok"

    tasks = [asyncio.create_task(breaker.call(probe)) for _ in range(5)]
    await settle()
    assert running == 2
    refused = [t for t in tasks if t.done()]
    assert len(refused) == 3
    assert all(isinstance(t.exception(), CircuitOpenError) for t in refused)
    release.set()
    await asyncio.gather(*(t for t in tasks if t not in refused))
    assert breaker.state == "closed"


async def test_calls_admitted_before_the_probes_say_nothing_of_them(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    # Three calls let through while closed answer only once the circuit is half-open.
    answers = [asyncio.Event() for _ in range(3)]
    outcomes: list[BaseException | None] = [http(400), http(503), None]

    async def late(n: int) -> str:
        await answers[n].wait()
        if outcomes[n] is not None:
            raise outcomes[n]  # type: ignore[misc]
        return "late"

    stragglers = [asyncio.create_task(breaker.call(lambda n=n: late(n))) for n in range(3)]
    await settle()
    await fail(breaker, 3)
    clock.advance(10)
    probe_answer = asyncio.Event()

    async def probed() -> str:
        await probe_answer.wait()
        return "probed"

    probe = asyncio.create_task(breaker.call(probed))
    await settle()
    assert breaker.state == "half_open"
    # A late 400 frees no probe's place: a second probe is still refused.
    answers[0].set()
    with pytest.raises(ProviderError):
        await stragglers[0]
    with pytest.raises(CircuitOpenError):
        await breaker.call(_ok)
    # A late 503 does not reopen the circuit, and a late success does not close it.
    answers[1].set()
    with pytest.raises(ProviderError):
        await stragglers[1]
    answers[2].set()
    assert await stragglers[2] == "late"
    assert breaker.state == "half_open"
    # The probe decides.
    probe_answer.set()
    assert await probe == "probed"
    assert breaker.state == "closed"


async def test_late_failures_of_an_open_circuit_leave_its_recovery_time_as_it_was(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    # Calls slower than the recovery time, admitted while closed, fail one after another: the
    # circuit is half-open recovery_time after it opened, whether or not anyone looked.
    admitted = [breaker.before_call() for _ in range(6)]
    for n in range(3):
        breaker.record_failure(http(503), admitted=admitted[n])
    assert breaker.state == "open"
    clock.advance(6)
    breaker.record_failure(http(503), admitted=admitted[3])  # open: it was open already
    clock.advance(6)
    breaker.record_failure(http(503), admitted=admitted[4])  # half-open: not a probe
    assert breaker.state == "half_open"
    assert await breaker.call(_ok) == "ok"  # the probe decides
    assert breaker.state == "closed"
    breaker.record_failure(http(503), admitted=admitted[5])  # closed: counted again
    assert breaker.failures == 1


async def test_a_block_admitted_before_the_probes_says_nothing_of_them(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    # As through call(): async with keeps what its admission returned.
    answers = [asyncio.Event() for _ in range(2)]
    outcomes: list[BaseException | None] = [http(503), None]

    async def late(n: int) -> None:
        async with breaker:
            await answers[n].wait()
            if outcomes[n] is not None:
                raise outcomes[n]  # type: ignore[misc]

    stragglers = [asyncio.create_task(late(n)) for n in range(2)]
    await settle()
    await fail(breaker, 3)
    clock.advance(10)
    probe_answer = asyncio.Event()

    async def probed() -> str:
        async with breaker:
            await probe_answer.wait()
        return "probed"

    probe = asyncio.create_task(probed())
    await settle()
    assert breaker.state == "half_open"
    answers[0].set()  # a late failure frees no probe's place
    with pytest.raises(ProviderError):
        await stragglers[0]
    with pytest.raises(CircuitOpenError):
        await breaker.call(_ok)
    answers[1].set()  # a late success does not close the circuit
    await stragglers[1]
    assert breaker.state == "half_open"
    probe_answer.set()
    assert await probe == "probed"
    assert breaker.state == "closed"
    assert len(breaker._blocks) == 0  # nothing kept of the blocks that ended


async def test_a_block_left_in_another_task_frees_its_probes_place(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    # An async generator that probes in its block, abandoned by its reader, is closed in a task
    # of its own: the exit has no admission to settle with, and settles without one.
    await fail(breaker, 3)
    clock.advance(10)

    async def probing() -> AsyncIterator[str]:
        async with breaker:
            yield "probing"

    items = probing()
    assert await anext(items) == "probing"
    with pytest.raises(CircuitOpenError):  # the probe's place is taken
        await breaker.call(_ok)
    await asyncio.create_task(items.aclose())  # as the loop closes an abandoned generator
    assert await breaker.call(_ok) == "ok"
    assert breaker.state == "closed"


async def test_a_cancelled_probe_frees_its_slot(breaker: CircuitBreaker, clock: FakeClock) -> None:
    await fail(breaker, 3)
    clock.advance(10)

    async def hang() -> None:
        await asyncio.Event().wait()

    probe = asyncio.create_task(breaker.call(hang))
    await settle()
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    # Cancellation says nothing about the dependency: still half-open, and the slot is free.
    assert breaker.state == "half_open"
    assert await breaker.call(_ok) == "ok"
    assert breaker.state == "closed"


async def test_non_transient_errors_do_not_count(breaker: CircuitBreaker) -> None:
    await fail(breaker, 10, status=400)
    await fail(breaker, 5, status=401)
    assert breaker.state == "closed"
    assert breaker.failures == 0
    # ... and they don't break a run of transient failures either.
    await fail(breaker, 2)
    await fail(breaker, 1, status=400)
    assert breaker.failures == 2


async def test_a_bad_request_probe_neither_closes_nor_reopens(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    await fail(breaker, 3)
    clock.advance(10)
    await fail(breaker, 1, status=400)
    assert breaker.state == "half_open"
    assert await breaker.call(_ok) == "ok"
    assert breaker.state == "closed"


async def test_failure_on_chooses_what_counts(clock: FakeClock) -> None:
    breaker = CircuitBreaker(
        "dep", failure_threshold=2, failure_on=lambda e: isinstance(e, KeyError), clock=clock
    )
    for _ in range(3):
        with pytest.raises(ProviderError):
            await breaker.call(_raiser(http(503)))
    assert breaker.state == "closed"
    for _ in range(2):
        with pytest.raises(KeyError):
            await breaker.call(_raiser(KeyError("x")))
    assert breaker.state == "open"


async def test_state_changes_are_recorded_as_span_events(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    with capture_events() as events:
        await fail(breaker, 3)
        clock.advance(10)
        await breaker.call(_ok)
    changes = [e.attributes for e in events.span_events if e.name == "breaker_state"]
    assert changes == [
        {"breaker": "dep", "old": "closed", "new": "open"},
        {"breaker": "dep", "old": "open", "new": "half_open"},
        {"breaker": "dep", "old": "half_open", "new": "closed"},
    ]


async def test_reset_closes(breaker: CircuitBreaker) -> None:
    await fail(breaker, 3)
    breaker.reset()
    assert breaker.state == "closed"
    assert breaker.failures == 0
    assert await breaker.call(_ok) == "ok"


@pytest.mark.parametrize(
    "kwargs", [{"failure_threshold": 0}, {"half_open_probes": 0}, {"recovery_time": -1}]
)
def test_invalid_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        CircuitBreaker("x", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "said"),
    [
        ({"failure_on": 5}, "failure_on must be a predicate taking an exception"),
        # A class is callable, and its instances are true: every error would count.
        ({"failure_on": ProviderError}, "failure_on must be a predicate taking an exception"),
        ({"on_state_change": 5}, "on_state_change must be a function"),
    ],
    ids=repr,
)
def test_a_hook_that_cannot_be_called_is_refused_when_the_breaker_is_made(
    kwargs: dict[str, Any], said: str
) -> None:
    # Not at the first failure or change of state, where its TypeError would take the place
    # of the error the breaker saw.
    with pytest.raises(UsageError, match=said):
        CircuitBreaker("x", **kwargs)


# -- decorator and context manager ----------------------------------------------------------


async def test_as_a_decorator(clock: FakeClock) -> None:
    breaker = CircuitBreaker("dep", failure_threshold=2, clock=clock)
    calls: list[int] = []

    @breaker
    async def fetch(n: int) -> int:
        """Fetches."""
        calls.append(n)
        if n < 0:
            raise http(502)
        return n * 2

    assert await fetch(2) == 4
    for _ in range(2):
        with pytest.raises(ProviderError):
            await fetch(-1)
    with pytest.raises(CircuitOpenError):
        await fetch(3)
    assert calls == [2, -1, -1]
    assert fetch.__name__ == "fetch"


async def test_as_an_async_context_manager(clock: FakeClock) -> None:
    breaker = CircuitBreaker("dep", failure_threshold=2, recovery_time=1, clock=clock)
    entered = 0
    for _ in range(2):
        with pytest.raises(ProviderError):
            async with breaker as b:
                assert b is breaker
                entered += 1
                raise http(503)
    with pytest.raises(CircuitOpenError):
        async with breaker:
            entered += 1
    assert entered == 2
    clock.advance(1)
    async with breaker:
        entered += 1
    assert breaker.state == "closed"
    assert entered == 3


# -- shared breakers ------------------------------------------------------------------------


async def test_circuit_breaker_is_shared_by_name() -> None:
    a = circuit_breaker("payments", failure_threshold=2)
    assert circuit_breaker("payments") is a
    assert circuit_breaker("search") is not a
    # Settings apply on first use only.
    assert circuit_breaker("payments", failure_threshold=9).failure_threshold == 2
    reset_breakers()
    assert circuit_breaker("payments") is not a


async def test_a_shared_breaker_counts_failures_from_every_task() -> None:
    gate = asyncio.Event()
    calls = 0

    async def worker() -> str:
        breaker = circuit_breaker("shared", failure_threshold=3, recovery_time=60)

        async def down() -> str:
            nonlocal calls
            calls += 1
            await gate.wait()
            raise http(503)

        return await breaker.call(down)

    first_wave = [asyncio.create_task(worker()) for _ in range(3)]
    await settle()
    gate.set()
    results = await asyncio.gather(*first_wave, return_exceptions=True)
    assert all(isinstance(r, ProviderError) for r in results)
    assert circuit_breaker("shared").state == "open"
    # Every later task, wherever it runs, fails fast.
    second_wave = await asyncio.gather(*(worker() for _ in range(4)), return_exceptions=True)
    assert all(isinstance(r, CircuitOpenError) for r in second_wave)
    assert calls == 3


# -- agents --------------------------------------------------------------------------------


def failing_model(name: str, count: int = 50) -> FakeModel:
    return FakeModel([http(503) for _ in range(count)], name=name)


async def test_agent_breaker_true_uses_one_breaker_per_model() -> None:
    model = failing_model("breaker-demo")

    @agent(model=model, retry=False, breaker=True)
    async def ask(q: str) -> str:
        """{{ q }}"""

    for _ in range(5):  # the shared breaker's default threshold
        with pytest.raises(ProviderError):
            await ask("hi")
    breaker = circuit_breaker(model.id)
    assert breaker.name == "fake/breaker-demo"
    assert breaker.state == "open"
    with pytest.raises(CircuitOpenError):
        await ask("hi")
    assert len(model.requests) == 5

    # Another agent on the same model shares the breaker; another model does not.
    @agent(model=model, retry=False, breaker=True)
    async def other(q: str) -> str:
        """{{ q }}"""

    with pytest.raises(CircuitOpenError):
        await other("hi")
    assert len(model.requests) == 5
    assert circuit_breaker("fake/elsewhere").state == "closed"


async def test_circuit_open_error_is_not_retried_by_the_default_policy(no_waits: None) -> None:
    model = failing_model("breaker-retry")

    @agent(model=model, breaker=True)  # default retry: 4 attempts
    async def ask(q: str) -> str:
        """{{ q }}"""

    with pytest.raises(ProviderError):
        await ask("a")
    assert len(model.requests) == 4
    with capture_events() as events, pytest.raises(CircuitOpenError):
        await ask("b")  # fails once (5th failure: opens), then fails fast
    assert len(model.requests) == 5
    # The 503 that opened the breaker was retried; the CircuitOpenError that followed was not.
    waits = [e.attributes["error"] for e in events.span_events if e.name == "retry_wait"]
    assert len(waits) == 1
    assert waits[0].startswith("ProviderError")
    assert [e.attributes["new"] for e in events.span_events if e.name == "breaker_state"] == [
        "open"
    ]


async def test_circuit_open_error_is_not_retried_around_a_plain_call(
    no_waits: None, clock: FakeClock
) -> None:
    breaker = CircuitBreaker("dep", failure_threshold=1, clock=clock)
    dep = Dependency()
    dep.failing = http(503)
    with pytest.raises(CircuitOpenError):
        await Retry(attempts=5).call(lambda: breaker.call(dep))
    assert dep.calls == 1


async def test_an_agent_probe_closes_the_breaker(clock: FakeClock) -> None:
    breaker = CircuitBreaker("custom", failure_threshold=2, recovery_time=30, clock=clock)
    model = FakeModel([http(500), http(500), "recovered"], name="probe")

    @agent(model=model, retry=False, breaker=breaker)
    async def ask(q: str) -> str:
        """{{ q }}"""

    for _ in range(2):
        with pytest.raises(ProviderError):
            await ask("x")
    with pytest.raises(CircuitOpenError):
        await ask("x")
    clock.advance(30)
    assert await ask("x") == "recovered"
    assert breaker.state == "closed"
    assert len(model.requests) == 3
