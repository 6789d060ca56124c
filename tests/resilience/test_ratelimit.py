"""Rate limiters on a fake clock: pacing, bursts, FIFO fairness, token budgets, 429 slowdowns."""

from __future__ import annotations

import asyncio
import math
import re

import pytest

from kagura import agent, workflow
from kagura.errors import ProviderError, UsageError
from kagura.providers import Model, ModelRequest, ModelResponse
from kagura.resilience import (
    BudgetExceeded,
    CircuitBreaker,
    CircuitOpenError,
    Permit,
    RateLimiter,
    limit_model,
    reset_rate_limits,
)
from kagura.resilience._ratelimit import limiter_for_model
from kagura.testing import FakeModel, capture_events

from .conftest import FakeClock, settle


def limiter(clock: FakeClock, **kwargs: object) -> RateLimiter:
    return RateLimiter("test", clock=clock, sleep=clock.sleep, **kwargs)  # type: ignore[arg-type]


async def admission_times(
    rl: RateLimiter, clock: FakeClock, n: int, tokens: int = 0
) -> list[float]:
    """Start ``n`` concurrent callers; the fake-clock time at which each was admitted."""
    times: list[float] = []

    async def caller() -> None:
        await rl.acquire(tokens)
        times.append(round(clock.elapsed, 6))

    await asyncio.gather(*(caller() for _ in range(n)))
    return times


# -- request pacing ------------------------------------------------------------------------


async def test_requests_per_second_paces_callers(clock: FakeClock) -> None:
    rl = limiter(clock, requests_per_second=2, burst=1)
    assert await admission_times(rl, clock, 5) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert rl.admitted == 5
    assert rl.waited == pytest.approx(2.0)


async def test_default_burst_is_one_seconds_worth(clock: FakeClock) -> None:
    rl = limiter(clock, requests_per_second=4)
    times = await admission_times(rl, clock, 6)
    assert times == [0.0, 0.0, 0.0, 0.0, 0.25, 0.5]


async def test_requests_per_minute(clock: FakeClock) -> None:
    rl = limiter(clock, requests_per_minute=30)  # one every 2 s
    assert await admission_times(rl, clock, 3) == [0.0, 2.0, 4.0]


@pytest.mark.parametrize("burst", [1, 3, 7])
async def test_the_start_burst_never_exceeds_the_capacity(clock: FakeClock, burst: int) -> None:
    rl = limiter(clock, requests_per_second=10, burst=burst)
    times = await admission_times(rl, clock, 20)
    assert times.count(0.0) == burst
    # Over any window, no more than burst + rate * window get through.
    for i, start in enumerate(times):
        in_window = [t for t in times[i:] if t <= start + 1.0]
        assert len(in_window) <= burst + 10


async def test_an_idle_limiter_refills_up_to_its_capacity_only(clock: FakeClock) -> None:
    rl = limiter(clock, requests_per_second=1, burst=2)
    await admission_times(rl, clock, 2)
    clock.advance(3600)
    start = clock.elapsed
    times = await admission_times(rl, clock, 4)
    assert [t - start for t in times] == [0.0, 0.0, 1.0, 2.0]


async def test_acquire_in_sequence_waits_between_calls(clock: FakeClock) -> None:
    rl = limiter(clock, requests_per_second=1, burst=1)
    permit = await rl.acquire()
    assert isinstance(permit, Permit)
    await rl.acquire()
    await rl.acquire()
    assert clock.sleeps and sum(clock.sleeps) == pytest.approx(2.0)
    assert clock.elapsed == pytest.approx(2.0)


async def test_a_wait_is_recorded_as_a_span_event(clock: FakeClock) -> None:
    rl = limiter(clock, requests_per_second=1, burst=1)
    with capture_events() as events:
        await rl.acquire()
        await rl.acquire()
    waits = [e.attributes for e in events.span_events if e.name == "rate_limit_wait"]
    assert len(waits) == 1
    assert waits[0]["limiter"] == "test"
    assert waits[0]["wait"] == pytest.approx(1.0)


# -- fairness ------------------------------------------------------------------------------


async def test_waiters_are_admitted_first_come_first_served(clock: FakeClock) -> None:
    rl = limiter(clock, requests_per_second=5, burst=1)
    arrived: list[int] = []
    admitted: list[int] = []

    async def caller(i: int, delay_turns: int) -> None:
        for _ in range(delay_turns):  # arrive in an order unlike the creation order
            await asyncio.sleep(0)
        arrived.append(i)
        await rl.acquire()
        admitted.append(i)

    turns = [5, 0, 3, 1, 4, 2, 0]
    await asyncio.gather(*(caller(i, t) for i, t in enumerate(turns)))
    assert arrived != sorted(arrived)
    assert admitted == arrived


async def test_a_late_caller_cannot_overtake_a_waiting_one(clock: FakeClock) -> None:
    rl = limiter(clock, requests_per_second=1, burst=1)
    await rl.acquire()
    order: list[str] = []

    async def caller(name: str) -> None:
        await rl.acquire()
        order.append(name)

    early = asyncio.create_task(caller("early"))
    await asyncio.sleep(0)  # early is now waiting on the limiter
    late = asyncio.create_task(caller("late"))
    await asyncio.gather(early, late)
    assert order == ["early", "late"]


# -- tokens per minute ---------------------------------------------------------------------


async def test_token_estimates_are_taken_before_the_call(clock: FakeClock) -> None:
    rl = limiter(clock, tokens_per_minute=600)  # 10 tokens/s, a 600-token bucket
    await rl.acquire(500)
    assert clock.elapsed == 0
    await rl.acquire(200)  # 100 left: waits for 100 more at 10/s
    assert clock.elapsed == pytest.approx(10.0)


async def test_a_larger_settle_delays_the_next_caller(clock: FakeClock) -> None:
    rl = limiter(clock, tokens_per_minute=600)
    permit = await rl.acquire(100)
    permit.settle(100)  # as estimated
    await rl.acquire(400)
    assert clock.elapsed == 0  # 600 - 100 - 400 = 100 left

    over = await rl.acquire(100)
    over.settle(300)  # used 200 more than estimated: the bucket is now 200 short
    await rl.acquire(50)
    assert clock.elapsed == pytest.approx(25.0)  # (50 - (-200)) / 10


async def test_a_smaller_settle_gives_tokens_back(clock: FakeClock) -> None:
    rl = limiter(clock, tokens_per_minute=600)
    permit = await rl.acquire(600)
    permit.settle(100)
    await rl.acquire(500)
    assert clock.elapsed == 0


async def test_an_estimate_above_the_capacity_waits_for_a_full_bucket_only(
    clock: FakeClock,
) -> None:
    rl = limiter(clock, tokens_per_minute=60)  # 1 token/s
    await rl.acquire(30)
    await rl.acquire(10_000)  # could never fit: it waits for a full bucket, not forever
    assert clock.elapsed == pytest.approx(30.0)


async def test_requests_and_tokens_together(clock: FakeClock) -> None:
    rl = limiter(clock, requests_per_second=10, burst=10, tokens_per_minute=120)  # 2 tokens/s
    times = await admission_times(rl, clock, 3, tokens=60)
    assert times == [0.0, 0.0, 30.0]


# -- 429 slowdowns -------------------------------------------------------------------------


async def test_penalise_halves_the_rate_and_holds_callers(clock: FakeClock) -> None:
    rl = limiter(clock, requests_per_second=1, burst=1, recovery_time=1000)
    await rl.acquire()
    assert rl.rate_multiplier == 1.0
    with capture_events() as events:
        rl.penalise(retry_after=5)
    assert rl.rate_multiplier == 0.5
    (slowdown,) = [e.attributes for e in events.span_events if e.name == "rate_limit_slowdown"]
    assert slowdown["rate_multiplier"] == 0.5
    assert slowdown["retry_after"] == 5
    await rl.acquire()
    assert clock.elapsed == pytest.approx(5.0)  # held for Retry-After
    before = clock.elapsed
    await rl.acquire()
    # The next request comes at about half the rate: ~2 s apart instead of 1 s.
    assert clock.elapsed - before > 1.9


async def test_penalise_without_retry_after_only_slows_down(clock: FakeClock) -> None:
    rl = limiter(clock, requests_per_second=1, burst=1, recovery_time=1000)
    await rl.acquire()
    rl.penalise()
    await rl.acquire()
    assert 1.9 < clock.elapsed < 2.1


async def test_repeated_429s_slow_down_further_to_a_floor(clock: FakeClock) -> None:
    rl = limiter(clock, requests_per_second=1, recovery_time=1000)
    rl.penalise()
    assert rl.rate_multiplier == 0.5
    rl.penalise()
    assert rl.rate_multiplier == 0.25
    for _ in range(10):
        rl.penalise()
    assert rl.rate_multiplier == 1 / 16


async def test_the_rate_recovers_after_recovery_time(clock: FakeClock) -> None:
    rl = limiter(clock, requests_per_second=1, recovery_time=30)
    rl.penalise()
    clock.advance(15)
    assert rl.rate_multiplier == pytest.approx(0.75)
    clock.advance(15)
    assert rl.rate_multiplier == 1.0
    clock.advance(100)
    assert rl.rate_multiplier == 1.0


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"requests_per_second": 1, "requests_per_minute": 60},
        {"requests_per_second": 0},
        {"requests_per_second": -1},
        {"tokens_per_minute": 0},
        {"requests_per_second": 1, "burst": 0},
        {"requests_per_second": 1, "slowdown": 0},
        {"requests_per_second": 1, "slowdown": 1.5},
        {"requests_per_second": 1, "recovery_time": -1},
    ],
    ids=repr,
)
def test_invalid_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        RateLimiter("bad", **kwargs)  # type: ignore[arg-type]


def test_limit_model_registers_and_replaces() -> None:
    first = limit_model("fake/limited", requests_per_second=1)
    assert limiter_for_model("fake/limited") is first
    second = limit_model("fake/limited", requests_per_minute=10)
    assert limiter_for_model("fake/limited") is second
    assert first.name == "fake/limited"
    reset_rate_limits()
    assert limiter_for_model("fake/limited") is None


@pytest.mark.parametrize(
    ("spelling", "model"),
    [
        ("gpt-4o-mini", "openai/gpt-4o-mini"),
        ("openai/gpt-4o-mini ", "openai/gpt-4o-mini"),
        ("fake", "fake/echo"),
    ],
)
def test_limit_model_keeps_the_limit_under_the_models_id(spelling: str, model: str) -> None:
    # An agent call looks its limit up by its model's id, whatever string named the model:
    # under any other spelling the limit would never apply.
    limiter_ = limit_model(spelling, requests_per_second=1)
    assert limiter_for_model(model) is limiter_
    assert limiter_.name == model


class AcmeModel(Model):
    """A custom model, of a provider Kagura does not know."""

    provider = "acme"

    def __init__(self) -> None:
        self.model_name = "big"
        self.calls = 0

    async def request(self, request: ModelRequest) -> ModelResponse:
        self.calls += 1
        return ModelResponse(text="hi")


async def test_limit_model_limits_a_custom_model_of_an_unknown_provider(no_waits: None) -> None:
    # No model string resolves to a custom Model whose provider is not registered: it is
    # limited by itself, under its id.
    model = AcmeModel()
    limiter_ = limit_model(model, requests_per_second=1)
    assert limiter_.name == "acme/big"
    assert limiter_for_model(model.id) is limiter_

    @agent(model=model)
    async def ask(q: str) -> str:
        """{{ q }}"""

    assert await ask("x") == "hi"
    assert limiter_.admitted == 1


def test_limit_model_takes_a_model_by_its_id() -> None:
    model = FakeModel(name="limited")
    limiter_ = limit_model(model, requests_per_second=1)
    assert limiter_for_model("fake/limited") is limiter_


@pytest.mark.parametrize(
    ("model", "said"),
    [
        (5, "limit_model takes a model string, such as 'openai/gpt-4o-mini', or a Model, got 5"),
        (AcmeModel, "limit_model takes a model string, such as 'openai/gpt-4o-mini', or a Model"),
        ("", "names a model"),
        ("  ", "names a model"),
        ("acme/", "names no model after 'acme/'"),
        # Not kept as given: a typo would be a limit no call ever looks up.
        ("acme/big", "or the Model itself"),
        ("opneai/gpt-4o-mini", "unknown model provider 'opneai'"),
        ("OpenAI/gpt-4o-mini", "unknown model provider 'OpenAI'"),
        # A provider Kagura knows still refuses a name it does not serve.
        ("local/no-such-model", "unknown local model 'no-such-model'"),
    ],
    ids=repr,
)
def test_limit_model_refuses_what_names_no_model(model: object, said: str) -> None:
    with pytest.raises(UsageError, match=re.escape(said)):
        limit_model(model, requests_per_second=1)  # type: ignore[arg-type]


# -- agents --------------------------------------------------------------------------------


async def test_a_limit_set_by_the_agents_model_string_applies_to_it(no_waits: None) -> None:
    limiter_ = limit_model(" fake ", requests_per_second=1)

    @agent(model="fake")
    async def ask(q: str) -> str:
        """{{ q }}"""

    await ask("x")
    assert limiter_.admitted == 1


async def test_an_agent_waits_on_its_models_limiter(no_waits: None) -> None:
    model = FakeModel(name="limited")
    limiter_ = limit_model(model.id, requests_per_second=1, burst=1)

    @agent(model=model)
    async def ask(q: str) -> str:
        """{{ q }}"""

    with capture_events() as events:
        results = await asyncio.gather(*(ask(str(i)) for i in range(4)))
    assert results == ["0", "1", "2", "3"]
    assert limiter_.admitted == 4
    # Three callers had to wait about a second each (computed, not slept, in test mode).
    assert limiter_.waited == pytest.approx(3.0, abs=0.1)
    waits = [e for e in events.span_events if e.name == "rate_limit_wait"]
    assert len(waits) == 3
    agent_spans = {s.span_id for s in events.spans(kind="agent")}
    assert {e.span_id for e in waits} <= agent_spans


async def test_an_agent_with_its_own_limiter(clock: FakeClock) -> None:
    rl = limiter(clock, requests_per_second=2, burst=1)
    model = FakeModel(name="own-limit")

    @agent(model=model, rate_limit=rl)
    async def ask(q: str) -> str:
        """{{ q }}"""

    await asyncio.gather(*(ask("x") for _ in range(3)))
    assert rl.admitted == 3
    assert clock.elapsed == pytest.approx(1.0)
    assert limiter_for_model(model.id) is None


async def test_an_agent_estimates_and_settles_tokens(clock: FakeClock) -> None:
    rl = limiter(clock, tokens_per_minute=6000)
    model = FakeModel(name="tokens")

    @agent(model=model, rate_limit=rl)
    async def ask(q: str) -> str:
        """{{ q }}"""

    await ask("one two three")
    assert clock.elapsed == 0
    # The call used 6 tokens (3 prompt words, 3 echoed): a full bucket is 6 tokens away, and
    # the bucket refills at 100 tokens/s.
    await rl.acquire(6000)
    assert clock.elapsed == pytest.approx(0.06)


async def test_a_429_through_an_agent_penalises_the_models_limiter(no_waits: None) -> None:
    model = FakeModel(
        [ProviderError("slow down", status_code=429, headers={"Retry-After": "2"}), "done"],
        name="throttled",
    )
    limiter_ = limit_model(model.id, requests_per_second=100)

    @agent(model=model)
    async def ask(q: str) -> str:
        """{{ q }}"""

    with capture_events() as events:
        assert await ask("x") == "done"
    assert limiter_.rate_multiplier < 1.0
    assert limiter_.admitted == 2
    (slowdown,) = [e.attributes for e in events.span_events if e.name == "rate_limit_slowdown"]
    assert slowdown["retry_after"] == 2.0
    assert slowdown["limiter"] == model.id
    (wait,) = [e.attributes for e in events.span_events if e.name == "retry_wait"]
    assert wait["wait"] >= 2.0


async def test_other_errors_do_not_penalise(no_waits: None) -> None:
    model = FakeModel([ProviderError("down", status_code=503), "done"], name="flaky")
    limiter_ = limit_model(model.id, requests_per_second=100)

    @agent(model=model)
    async def ask(q: str) -> str:
        """{{ q }}"""

    assert await ask("x") == "done"
    assert limiter_.rate_multiplier == 1.0


async def test_cancelling_a_waiting_caller_lets_the_next_one_through(clock: FakeClock) -> None:
    release = asyncio.Event()

    async def gated_sleep(seconds: float) -> None:
        await release.wait()
        clock.advance(seconds)

    rl = RateLimiter("gated", requests_per_second=1, burst=1, clock=clock, sleep=gated_sleep)
    await rl.acquire()
    stuck = asyncio.create_task(rl.acquire())
    await settle()
    nxt = asyncio.create_task(rl.acquire())
    await settle()
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck
    release.set()
    await nxt
    assert rl.admitted == 2


async def test_a_workflow_rate_limit_is_shared_by_the_agents_inside(clock: FakeClock) -> None:
    rl = limiter(clock, requests_per_second=1, burst=1)
    model = FakeModel(name="wf-limited")

    @agent(model=model)
    async def ask(q: str) -> str:
        """{{ q }}"""

    @workflow(rate_limit=rl)
    async def flow() -> list[str]:
        return list(await asyncio.gather(*(ask(str(i)) for i in range(3))))

    assert await flow() == ["0", "1", "2"]
    assert rl.admitted == 3
    assert clock.elapsed == pytest.approx(2.0)
    await ask("outside")  # outside the run, the workflow's limiter does not apply
    assert rl.admitted == 3


@pytest.mark.parametrize("asked", [3600.0, math.inf])
async def test_a_retry_after_past_max_retry_after_holds_callers_that_long_only(
    clock: FakeClock, asked: float
) -> None:
    # The retry policy does not wait an hour for the call that got it: neither do the others.
    rl = limiter(clock, requests_per_second=1, burst=1, recovery_time=0, max_retry_after=60)
    await rl.acquire()
    rl.penalise(retry_after=asked)
    await rl.acquire()
    assert clock.elapsed == pytest.approx(60.0)


# -- the guards after the wait ---------------------------------------------------------------


@pytest.mark.parametrize("guard", ["budget", "breaker"])
async def test_calls_that_waited_their_turn_are_checked_against_the_budget_and_breaker_then(
    clock: FakeClock, guard: str
) -> None:
    # Checked before the wait, calls queued behind the limiter all went out once their turn
    # came, however far the budget was spent or the breaker open meanwhile.
    queued = asyncio.Event()
    first_answered = asyncio.Event()

    async def turn_after_the_first(seconds: float) -> None:
        clock.advance(seconds)
        queued.set()
        await first_answered.wait()

    class Held(FakeModel):
        """Answers once the calls after the first are queued behind the limiter."""

        async def request(self, request: ModelRequest) -> ModelResponse:
            await queued.wait()
            return await super().request(request)

    rl = RateLimiter(
        "paced", requests_per_second=1, burst=1, clock=clock, sleep=turn_after_the_first
    )
    if guard == "budget":
        fake = Held(["a"] * 5)
        fake.cost = lambda usage: 1.0  # type: ignore[method-assign]  # $1 a call
        options: dict[str, object] = {}
    else:
        fake = Held([ProviderError("down", status_code=503)] * 5)
        options = {"breaker": CircuitBreaker("paced", failure_threshold=1, recovery_time=60)}

    @agent(model=fake, rate_limit=rl, retry=False, **options)  # type: ignore[call-overload]
    async def paced(q: str) -> str:
        """{{ q }}"""

    @workflow(budget_usd=0.5)
    async def burst() -> list[object]:
        first = asyncio.create_task(paced("first"))
        rest = [asyncio.create_task(paced(str(i))) for i in range(4)]
        await asyncio.wait([first])
        first_answered.set()
        return await asyncio.gather(*rest, return_exceptions=True)

    refusals = await burst()
    assert len(fake.requests) == 1, guard
    expected = BudgetExceeded if guard == "budget" else CircuitOpenError
    assert all(isinstance(r, expected) for r in refusals), (guard, refusals)
