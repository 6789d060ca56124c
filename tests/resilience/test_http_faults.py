"""Every resilience policy over real HTTP, against the fault server on 127.0.0.1.

The unit tests next to this file drive the policies with a fake model; here the requests go through
the real ``openai`` SDK to :class:`kagura.testing.fault_server.FaultServer`, and what the policies
promise is checked where it matters: at the server. How many requests arrived, whether a cancelled
request's connection was really closed, how many were in flight at once. Backoff waits are skipped
with ``set_testing(True)`` (they are still computed and recorded); clocks that a policy reads are
fake wherever the test inspects time.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp  # noqa: F401 - imported here so that the first request does not pay for it
import pytest

import kagura.pricing
from kagura import Agent, agent, workflow
from kagura._events import Event, SpanStarted
from kagura._instrument import add_sink, remove_sink
from kagura.errors import ProviderConnectionError, ProviderError, ProviderTimeout
from kagura.parallel import gather, gather_partial
from kagura.providers.openai import OpenAIChatModel
from kagura.resilience import (
    BudgetExceeded,
    CircuitBreaker,
    CircuitOpenError,
    Fallback,
    RateLimiter,
    Retry,
    fixed,
    limit_model,
    reset_breakers,
    reset_rate_limits,
    set_testing,
)
from kagura.resilience._config import is_testing
from kagura.testing import CapturedEvents, capture_events
from kagura.testing.fault_server import Fault, FaultServer

pytestmark = pytest.mark.timeout(60)

API_KEY = "sk-test"
MODEL = "openai/test-model"
LIMIT = 15  # seconds: the bound put on every network interaction below


# -- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _skip_waits() -> Iterator[None]:
    """Backoff and rate-limit waits are computed and recorded, but not slept."""
    previous = is_testing()
    set_testing(True)
    reset_breakers()
    reset_rate_limits()
    yield
    set_testing(previous)
    reset_breakers()
    reset_rate_limits()


@pytest.fixture
async def server() -> AsyncIterator[FaultServer]:
    async with FaultServer() as srv:
        yield srv


@pytest.fixture
async def backup() -> AsyncIterator[FaultServer]:
    """A second server, for fallbacks and for parts that must fail differently."""
    async with FaultServer() as srv:
        yield srv


@pytest.fixture
async def third() -> AsyncIterator[FaultServer]:
    async with FaultServer() as srv:
        yield srv


class FakeClock:
    """A monotonic clock that moves only when told to; its ``sleep`` advances it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.start = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # other tasks run, as they would during a real sleep


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def asker(srv: FaultServer, *, model: str = MODEL, **settings: Any) -> Agent[[str], str]:
    """An agent that sends ``text`` as its whole prompt to ``srv`` (which echoes it back)."""

    @agent(model=model, base_url=srv.base_url, api_key=API_KEY, **settings)
    async def ask(text: str) -> str:
        """{{ text }}"""

    return ask


def retry_waits(events: CapturedEvents) -> list[dict[str, Any]]:
    return [e.attributes for e in events.span_events if e.name == "retry_wait"]


def client_tasks() -> list[asyncio.Task[Any]]:
    """Tasks of this loop other than the test itself and the fault servers' side of connections:
    their handlers, and asyncio's own task accepting a connection. (A client that gives up just
    as it connects leaves the server a connection to accept in a later loop iteration, after the
    client's tasks are gone.)"""
    current = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t is not current and not _server_side(t)]


def _server_side(task: asyncio.Task[Any]) -> bool:
    name = getattr(task.get_coro(), "__qualname__", "")
    return name.startswith("FaultServer.") or name.endswith("._accept_connection2")


# -- retries ---------------------------------------------------------------------------------------


async def test_429_is_retried_after_at_least_its_retry_after(server: FaultServer) -> None:
    ask = asker(server)
    server.script(Fault("429", retry_after=1), "ok")

    with capture_events() as events:
        async with asyncio.timeout(LIMIT):
            assert await ask("hello") == "hello"

    assert [r.fault for r in server.chat_requests] == ["429", "ok"]
    (wait,) = retry_waits(events)
    assert wait["retry_after"] == 1.0
    assert wait["wait"] >= 1.0  # never sooner than the server asked
    assert wait["attempt"] == 1
    assert "HTTP 429" in wait["error"]
    assert [s.status for s in events.spans("llm")] == ["failed", "completed"]


async def test_5xx_are_retried_until_an_answer(server: FaultServer) -> None:
    ask = asker(server)
    server.script("500", "503", "ok")

    with capture_events() as events:
        async with asyncio.timeout(LIMIT):
            assert await ask("hello") == "hello"

    assert server.request_count == 3
    assert [w["attempt"] for w in retry_waits(events)] == [1, 2]
    assert [s.status for s in events.spans("agent")] == ["completed"]


@pytest.mark.parametrize("fault", ["reset", "truncated", "malformed"])
async def test_broken_answers_are_transient(server: FaultServer, fault: str) -> None:
    ask = asker(server)
    server.script(fault, "ok")

    with capture_events() as events:
        async with asyncio.timeout(LIMIT):
            assert await ask("hello") == "hello"

    assert [r.fault for r in server.chat_requests] == [fault, "ok"]
    (wait,) = retry_waits(events)
    expected = ProviderError if fault == "malformed" else ProviderConnectionError
    assert wait["error"].startswith(expected.__name__ + ":")


@pytest.mark.parametrize("status", [401, 400])
async def test_client_errors_are_raised_at_once(server: FaultServer, status: int) -> None:
    ask = asker(server)
    server.script(str(status), "ok")

    with capture_events() as events:
        async with asyncio.timeout(LIMIT):
            with pytest.raises(ProviderError) as caught:
                await ask("hello")

    assert caught.value.status_code == status
    assert server.request_count == 1
    assert retry_waits(events) == []
    assert [f.kind for f in server.pending_script] == ["ok"]  # nothing more was sent


async def test_default_retry_gives_up_after_four_attempts(server: FaultServer) -> None:
    ask = asker(server)
    server.script("503", "503", "503", "503", "ok")

    async with asyncio.timeout(LIMIT):
        with pytest.raises(ProviderError) as caught:
            await ask("hello")

    assert caught.value.status_code == 503
    assert "kagura: gave up after 4 attempts" in caught.value.__notes__
    assert server.request_count == 4
    assert [f.kind for f in server.pending_script] == ["ok"]


async def test_a_retry_after_beyond_max_retry_after_is_not_waited_for(server: FaultServer) -> None:
    ask = asker(server, retry=Retry(max_retry_after=10))
    server.script(Fault("429", retry_after=120), "ok")

    async with asyncio.timeout(LIMIT):
        with pytest.raises(ProviderError) as caught:
            await ask("hello")

    assert caught.value.status_code == 429
    assert any("exceeds max_retry_after" in note for note in caught.value.__notes__)
    assert server.request_count == 1


async def test_a_retry_after_beyond_the_total_timeout_is_not_waited_for(
    server: FaultServer,
) -> None:
    # Waiting 30 s could only end in the call's own TimeoutError at 5 s: the 429 is raised now.
    ask = asker(server, total_timeout=5)
    server.script(Fault("429", retry_after=30), "ok")

    async with asyncio.timeout(LIMIT):
        with pytest.raises(ProviderError) as caught:
            await ask("hello")

    assert caught.value.status_code == 429
    assert "kagura: not retried: the wait would pass the total timeout" in caught.value.__notes__
    assert server.request_count == 1


async def test_workflow_retry_setting_reaches_agents_and_the_agents_own_wins(
    server: FaultServer,
) -> None:
    plain = asker(server)
    own = asker(server, retry=Retry(attempts=2))

    @workflow(retry=False)
    async def run() -> str:
        with pytest.raises(ProviderError):
            await plain("first")  # the workflow's setting: one attempt
        return await own("second")  # the agent's own policy: retried once

    server.script("503", "503", "ok")
    async with asyncio.timeout(LIMIT):
        assert await run() == "second"
    assert server.request_count == 3


# -- timeouts and cancellation ---------------------------------------------------------------------


async def test_per_attempt_timeout_closes_the_hung_request_and_retries(
    server: FaultServer,
) -> None:
    ask = asker(server, timeout=0.5)
    server.script("hang", "ok")

    with capture_events() as events:
        async with asyncio.timeout(LIMIT):
            assert await ask("hello") == "hello"
        await server.wait_disconnects(1, timeout=LIMIT)

    first, second = server.chat_requests
    assert first.fault == "hang" and first.client_gone  # the timeout closed the connection
    assert second.fault == "ok" and not second.client_gone
    assert [s.status for s in events.spans("llm")] == ["timed_out", "completed"]
    (wait,) = retry_waits(events)
    assert wait["error"].startswith(ProviderTimeout.__name__ + ":")


async def test_total_timeout_stops_repeated_hangs_and_leaves_nothing_running(
    server: FaultServer,
) -> None:
    # Each attempt gives up after 0.3 s and is retried at once; the whole call is limited to 1 s,
    # long before the 10 attempts allowed could run out.
    policy = Retry(attempts=10, backoff=fixed(0))
    ask = asker(server, timeout=0.3, total_timeout=1.0, retry=policy)
    server.script(*["hang"] * 10)

    with capture_events() as events:
        async with asyncio.timeout(LIMIT):
            with pytest.raises(TimeoutError):
                await ask("hello")
        # Every hung request that reached the server saw its client go away.
        await server.wait(lambda s: 0 < s.request_count == s.disconnects, timeout=LIMIT)

    assert client_tasks() == []
    assert server.chat_requests[0].client_gone
    assert [s.status for s in events.spans("agent")] == ["timed_out"]
    assert events.spans("llm")[-1].status in ("cancelled", "timed_out")


async def test_cancelling_an_agent_closes_its_request_and_sends_no_retry(
    server: FaultServer,
) -> None:
    ask = asker(server)
    server.script("hang", "ok")  # a retry, if one were sent, would get an answer

    with capture_events() as events:
        task = asyncio.create_task(ask("hello"))
        await server.wait_requests(1, timeout=LIMIT)
        task.cancel()
        async with asyncio.timeout(LIMIT):
            with pytest.raises(asyncio.CancelledError):
                await task
        await server.wait_disconnects(1, timeout=LIMIT)

    assert client_tasks() == []  # nothing is left that could still send a request
    assert server.request_count == 1
    assert server.chat_requests[0].client_gone
    assert [f.kind for f in server.pending_script] == ["ok"]
    assert retry_waits(events) == []
    assert [s.status for s in events.spans("llm")] == ["cancelled"]
    assert [s.status for s in events.spans("agent")] == ["cancelled"]


# -- fallbacks -------------------------------------------------------------------------------------


async def test_agent_falls_back_to_the_backup_model(
    server: FaultServer, backup: FaultServer
) -> None:
    backup_model = OpenAIChatModel("backup-model", base_url=backup.base_url, api_key=API_KEY)
    ask = asker(server, model="openai/primary-model", fallback=[backup_model])
    server.script("503", "503", "503", "503")

    with capture_events() as events:
        async with asyncio.timeout(LIMIT):
            assert await ask("hello") == "hello"

    assert server.request_count == 4  # the primary got its full retry policy first
    assert [r.body["model"] for r in server.chat_requests] == ["primary-model"] * 4
    assert [r.body["model"] for r in backup.chat_requests] == ["backup-model"]
    (finished,) = events.spans("agent")
    assert finished.attributes["answered_by"] == "openai/backup-model"
    (fell_back,) = [e for e in events.span_events if e.name == "fallback"]
    assert fell_back.attributes["failed"] == "openai/primary-model"
    assert fell_back.attributes["next"] == "openai/backup-model"


async def test_fallback_answer_says_which_option_answered(
    server: FaultServer, backup: FaultServer
) -> None:
    primary = asker(server, model="openai/primary-model")
    secondary = asker(backup, model="openai/backup-model")
    chain = Fallback(primary, secondary, default="n/a")

    server.script("401", "503", "503", "503", "503")
    async with asyncio.timeout(LIMIT):
        answer = await chain("first")
    assert (answer.value, answer.source) == ("first", secondary.name)
    assert answer.degraded
    ((failed_name, error),) = answer.errors
    assert failed_name == primary.name
    assert isinstance(error, ProviderError) and error.status_code == 401
    assert server.request_count == 1  # a 401 is not retried: straight to the backup
    assert backup.request_count == 1

    # The primary is down for good (retried 4 times), and so is the backup: the default answers.
    backup.script("400")
    async with asyncio.timeout(LIMIT):
        answer = await chain("second")
    assert (answer.value, answer.source) == ("n/a", "default")
    assert [name for name, _ in answer.errors] == [primary.name, secondary.name]
    assert server.request_count == 1 + 4
    assert backup.request_count == 1 + 1


# -- circuit breakers ------------------------------------------------------------------------------


async def test_breaker_fails_fast_then_probes_and_closes(
    server: FaultServer, clock: FakeClock
) -> None:
    changes: list[tuple[str, str]] = []
    breaker = CircuitBreaker(
        "http",
        failure_threshold=2,
        recovery_time=30,
        clock=clock,
        on_state_change=lambda _b, old, new: changes.append((old, new)),
    )
    ask = asker(server, breaker=breaker, retry=False)
    server.script("503", "503")

    async with asyncio.timeout(LIMIT):
        for _ in range(2):
            with pytest.raises(ProviderError):
                await ask("hello")
        assert breaker.state == "open"
        for _ in range(3):
            with pytest.raises(CircuitOpenError) as caught:
                await ask("hello")
        assert caught.value.name == "http"
        assert server.request_count == 2  # failing fast: nothing reached the server

        # After the recovery time one probe goes through; it fails, and the circuit reopens.
        clock.advance(30)
        server.script("503")
        with pytest.raises(ProviderError):
            await ask("probe 1")
        assert server.request_count == 3
        assert breaker.state == "open"
        with pytest.raises(CircuitOpenError):
            await ask("hello")
        assert server.request_count == 3

        # The next probe succeeds and closes it.
        clock.advance(30)
        assert await ask("probe 2") == "probe 2"
        assert breaker.state == "closed"
        assert await ask("again") == "again"
    assert server.request_count == 5
    assert changes == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


async def test_retries_stop_when_the_breaker_opens(server: FaultServer, clock: FakeClock) -> None:
    breaker = CircuitBreaker("http", failure_threshold=2, recovery_time=30, clock=clock)
    ask = asker(server, breaker=breaker)  # the default retry policy: up to 4 attempts
    server.script("503", "503", "503", "503")

    async with asyncio.timeout(LIMIT):
        with pytest.raises(CircuitOpenError):
            await ask("hello")
    assert server.request_count == 2
    assert len(server.pending_script) == 2


async def test_half_open_breaker_lets_one_probe_through(
    server: FaultServer, clock: FakeClock
) -> None:
    breaker = CircuitBreaker("http", failure_threshold=1, recovery_time=30, clock=clock)
    ask = asker(server, breaker=breaker, retry=False)
    server.script("503")
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ProviderError):
            await ask("hello")
    assert breaker.state == "open"

    clock.advance(30)
    server.script(Fault("ok", delay=0.3))  # the probe is held at the server for a moment
    probe = asyncio.create_task(ask("probe"))
    try:
        await server.wait_requests(2, timeout=LIMIT)
        async with asyncio.timeout(LIMIT):
            with pytest.raises(CircuitOpenError):
                await ask("second")  # while the probe is out, other calls fail fast
            assert await probe == "probe"
    finally:
        probe.cancel()
    assert server.request_count == 2
    assert breaker.state == "closed"


async def test_an_open_breaker_sends_calls_straight_to_the_fallback(
    server: FaultServer, backup: FaultServer, clock: FakeClock
) -> None:
    breaker = CircuitBreaker("primary", failure_threshold=1, recovery_time=30, clock=clock)
    backup_model = OpenAIChatModel("backup-model", base_url=backup.base_url, api_key=API_KEY)
    ask = asker(
        server, model="openai/primary-model", breaker=breaker, retry=False, fallback=[backup_model]
    )
    server.script("503")

    async with asyncio.timeout(LIMIT):
        assert await ask("first") == "first"  # the failure opens the breaker; the backup answers
        assert breaker.state == "open"
        assert await ask("second") == "second"  # the primary is not even tried
    assert server.request_count == 1
    assert backup.request_count == 2
    assert breaker.state == "open"  # the backup's answers say nothing of the primary's health


# -- rate limits -----------------------------------------------------------------------------------


class AdmissionTimes:
    """Reads the fake clock whenever an LLM attempt starts, i.e. right after its admission."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.times: list[float] = []

    def handle(self, event: Event) -> None:
        if isinstance(event, SpanStarted) and event.kind == "llm":
            self.times.append(self.clock())


async def test_rate_limiter_spaces_concurrent_calls(server: FaultServer, clock: FakeClock) -> None:
    limiter = RateLimiter("http", requests_per_second=2, burst=1, clock=clock, sleep=clock.sleep)
    ask = asker(server, rate_limit=limiter)
    admissions = AdmissionTimes(clock)

    add_sink(admissions)
    try:
        async with asyncio.timeout(LIMIT):
            answers = await asyncio.gather(*(ask(f"q{n}") for n in range(6)))
    finally:
        remove_sink(admissions)

    assert answers == [f"q{n}" for n in range(6)]
    assert server.request_count == 6
    assert limiter.admitted == 6
    times = admissions.times
    assert times[0] == clock.start  # the burst of one goes at once
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(gap >= 0.5 - 1e-9 for gap in gaps)  # never faster than 2 per second
    assert clock.now - clock.start == pytest.approx(2.5)  # and no slower than needed


async def test_limit_model_applies_to_every_agent_on_that_model(
    server: FaultServer, backup: FaultServer
) -> None:
    limiter = limit_model(MODEL, requests_per_second=5)
    limited = asker(server)
    other = asker(backup, model="openai/other-model")

    async with asyncio.timeout(LIMIT):
        answers = await asyncio.gather(*(limited(f"q{n}") for n in range(10)))
        assert await other("free") == "free"

    assert answers == [f"q{n}" for n in range(10)]
    assert server.request_count == 10
    assert limiter.admitted == 10  # the other model's call did not go through it
    assert limiter.waited > 0  # past the burst of 5, calls waited their turn
    assert backup.request_count == 1


async def test_429_slows_the_rate_limiter_down(server: FaultServer, clock: FakeClock) -> None:
    limiter = RateLimiter("http", requests_per_second=10, clock=clock, sleep=clock.sleep)
    ask = asker(server, rate_limit=limiter)
    server.script(Fault("429", retry_after=1), "ok")

    with capture_events() as events:
        async with asyncio.timeout(LIMIT):
            assert await ask("hello") == "hello"

    assert server.request_count == 2
    assert limiter.rate_multiplier < 1
    assert max(clock.sleeps) >= 1.0  # the retry was held at the limiter for Retry-After
    (slowdown,) = [e for e in events.span_events if e.name == "rate_limit_slowdown"]
    assert slowdown.attributes["retry_after"] == 1.0
    assert slowdown.attributes["rate_multiplier"] < 1


# -- budgets ---------------------------------------------------------------------------------------


async def test_retry_budget_caps_retries_across_concurrent_calls(server: FaultServer) -> None:
    ask = asker(server)

    @workflow(retry_budget=2)
    async def batch() -> list[Any]:
        return await asyncio.gather(*(ask(f"q{n}") for n in range(4)), return_exceptions=True)

    server.script(*["503"] * 20)
    async with asyncio.timeout(LIMIT):
        outcomes = await batch()

    assert server.request_count == 4 + 2
    assert all(isinstance(o, ProviderError) and o.status_code == 503 for o in outcomes)
    for outcome in outcomes:
        assert any("retry budget spent" in note for note in outcome.__notes__)


@pytest.fixture
def priced_model(monkeypatch: pytest.MonkeyPatch) -> str:
    """A model priced at $1000 per million tokens either way; forgotten after the test."""
    monkeypatch.setattr(kagura.pricing, "_user_prices", dict(kagura.pricing._user_prices))
    kagura.pricing.register_price("budget-model", input_per_mtok=1000, output_per_mtok=1000)
    return "openai/budget-model"


async def test_cost_budget_stops_calls_before_they_are_sent(
    server: FaultServer, priced_model: str
) -> None:
    ask = asker(server, model=priced_model)

    @workflow(budget_usd=0.01)
    async def run() -> str:
        first = await ask("first")  # 20 tokens at $1000/Mtok: $0.02, the whole budget
        with pytest.raises(BudgetExceeded) as caught:
            await ask("second")
        assert caught.value.budget.spent_usd == pytest.approx(0.02)
        return first

    server.script(Fault("ok", usage=(10, 10)), Fault("ok", usage=(10, 10)))
    async with asyncio.timeout(LIMIT):
        assert await run() == "first"
    assert server.request_count == 1  # the refused call never reached the server

    # Every run of the workflow gets a fresh budget.
    async with asyncio.timeout(LIMIT):
        assert await run() == "first"
    assert server.request_count == 2


# -- parallel helpers ------------------------------------------------------------------------------


async def test_gather_partial_keeps_what_finished_and_closes_what_did_not(
    server: FaultServer, backup: FaultServer, third: FaultServer
) -> None:
    hung, failing, fine = asker(server), asker(backup), asker(third)
    server.script("hang", "ok")
    backup.script("400")

    async with asyncio.timeout(LIMIT):
        partial = await gather_partial(
            {"slow": hung("slow"), "bad": failing("bad"), "good": fine("good")}, deadline=1.5
        )
        await server.wait_disconnects(1, timeout=LIMIT)

    assert partial.results == {"good": "good"}
    assert list(partial.errors) == ["bad"]
    error = partial.errors["bad"]
    assert isinstance(error, ProviderError) and error.status_code == 400
    assert partial.cancelled == ["slow"]
    assert not partial.complete
    assert client_tasks() == []
    assert server.request_count == 1  # the cancelled part sent no retry
    assert server.chat_requests[0].client_gone
    assert backup.request_count == 1


async def test_gather_cancels_hung_siblings_on_the_first_error(
    server: FaultServer, backup: FaultServer
) -> None:
    hung, failing = asker(server), asker(backup)
    server.script("hang", "hang")
    backup.script("400")

    async def after_the_hangs_arrived() -> str:
        await server.wait_requests(2, timeout=LIMIT)
        return await failing("bad")

    async with asyncio.timeout(LIMIT):
        with pytest.raises(ProviderError) as caught:
            await gather(hung("a"), hung("b"), after_the_hangs_arrived())
        await server.wait_disconnects(2, timeout=LIMIT)

    assert caught.value.status_code == 400
    assert client_tasks() == []
    assert server.request_count == 2
    assert all(r.client_gone for r in server.chat_requests)


async def test_gather_limit_bounds_the_requests_in_flight(server: FaultServer) -> None:
    ask = asker(server)
    # Each answer is held back a moment, so that the calls let through overlap at the server.
    server.script(*[Fault("ok", delay=0.25)] * 10)

    async with asyncio.timeout(LIMIT):
        answers = await gather(*(ask(f"q{n}") for n in range(10)), limit=3)

    assert answers == [f"q{n}" for n in range(10)]
    assert server.request_count == 10
    # Never above the limit; and the calls did overlap (the limit is not a serialisation).
    assert 2 <= server.max_in_flight <= 3
    assert server.in_flight == 0


async def test_gather_limit_with_retries_still_bounds_the_requests_in_flight(
    server: FaultServer,
) -> None:
    ask = asker(server)
    # Failures among delayed answers: a call's retries stay inside its slot.
    server.script("503", Fault("429", retry_after=0), *[Fault("ok", delay=0.1)] * 8)

    async with asyncio.timeout(LIMIT):
        answers = await gather(*(ask(f"q{n}") for n in range(8)), limit=2)

    assert answers == [f"q{n}" for n in range(8)]
    assert server.request_count == 8 + 2
    assert server.max_in_flight <= 2
