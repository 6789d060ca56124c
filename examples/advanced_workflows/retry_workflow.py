"""Retries, backoff, fallbacks, circuit breakers, budgets, timeouts and rate limits, with real
failures, all done by the library's policies (``kagura.resilience``) instead of hand-written loops.

The failures are injected: ``FlakyModel`` wraps the default model and, on a fixed script, fails
with ``ProviderError(status_code=503)``, answers 429 with a ``Retry-After`` header, or never
answers at all: exactly what a provider outage, a rate limit and a hung connection look like.
Every answer that does come back comes from the real (default) model.

Each policy is used one of three ways, and the sections show all of them:

- as an agent argument: ``@agent(retry=Retry(...), timeout=..., breaker=..., fallback=[...])``;
- as a default for every agent call in a workflow: ``@workflow(retry=..., retry_budget=N)``;
- on any async function: ``@retry(...)``, ``async for attempt in Retry(...)``, ``Fallback(...)``.

With nothing configured an agent already retries transient errors (429, 5xx, timeouts) 3 times
with jittered exponential backoff, honouring ``Retry-After``; ``retry=False`` turns that off.

Sections:

1. Basic retry with max attempts
2. Exponential backoff (and jittered, and fixed)
3. Fallback strategies (a Fallback chain, model fallback, a default value)
4. Partial retry (only the failed steps are retried)
5. Circuit breaker (open, fail fast, half-open probe, close)
6. Graceful degradation (partial results by a deadline; levels of answer)
7. Retry budgets (one budget shared by the concurrent calls of a workflow run)
8. Timeouts and cancellation
9. Rate limiting
10. Hand-written vs library

Run it (no API key needed: the wrapped default model is the embedded SmolLM2-135M model):

    python examples/advanced_workflows/retry_workflow.py

Do not set KAGURA_MODEL_OVERRIDE for this one: it replaces every model, the FlakyModel wrappers
included, so no fault would be injected. Use KAGURA_MODEL to choose the wrapped model instead.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from kagura import ProviderError, Usage, agent, workflow
from kagura.parallel import gather, gather_partial
from kagura.providers import Model, ModelRequest, ModelResponse, resolve_model
from kagura.resilience import (
    DEFAULT_RETRY,
    CircuitBreaker,
    CircuitOpenError,
    Fallback,
    RateLimiter,
    Retry,
    RetryDetails,
    exponential,
    fixed,
    jittered,
    retry,
)
from kagura.testing import capture_events


def short(text: object, limit: int = 70) -> str:
    """One line, at most ``limit`` characters: small models can ramble."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def header(title: str) -> None:
    print(f"\n=== {title} ===")


def log(message: str) -> None:
    print(f"    {message}")


def notes(error: BaseException) -> str:
    """The notes a policy adds to an error it stops retrying ("gave up after 3 attempts", ...)."""
    return "; ".join(getattr(error, "__notes__", [])) or "(no notes)"


def show_retry(details: RetryDetails) -> None:
    """The ``on_retry`` hook: called before every wait with the failed attempt and the wait."""
    asked = "" if details.retry_after is None else f", Retry-After {details.retry_after:g} s"
    log(
        f"attempt {details.attempt} failed ({short(details.error, 60)}{asked}) "
        f"-> waiting {details.wait:.3f} s before attempt {details.attempt + 1}"
    )


# ---------------------------------------------------------------------------------------------
# Fault injection: a model that wraps the default model and fails on a script
# ---------------------------------------------------------------------------------------------


class FlakyModel(Model):
    """Fails on a script, otherwise passes the request to the default model.

    The wrapped model is looked up at every call (``resolve_model(None)``), so it follows
    ``KAGURA_MODEL`` and ``OPENAI_API_KEY`` like any agent that names no model.

    Script (reset with :meth:`script`): the first ``fail_first`` calls fail; ``down=True`` fails
    every call; ``failure_rate`` fails calls at random, from a seeded generator (reproducible).
    Failures are HTTP ``status`` (503 by default; 429 with ``retry_after`` for a rate limit). The
    first ``hang_first`` calls (every call with ``hang=True``) never answer, until cancelled.
    """

    provider = "flaky"

    def __init__(self, name: str, **script: Any) -> None:
        self.model_name = name
        self.script(**script)

    def script(
        self,
        *,
        fail_first: int = 0,
        down: bool = False,
        failure_rate: float = 0.0,
        seed: int = 0,
        status: int = 503,
        retry_after: float | None = None,
        hang_first: int = 0,
        hang: bool = False,
    ) -> FlakyModel:
        self.fail_first = fail_first
        self.down = down
        self.failure_rate = failure_rate
        self._random = random.Random(seed)
        self.status = status
        self.retry_after = retry_after
        self.hang_first = hang_first
        self.hang = hang
        self.calls = 0  # requests that reached this model
        self.failures = 0  # of which failed on purpose
        self.arrivals: list[float] = []  # when each request reached it (time.monotonic())
        return self

    @property
    def inner(self) -> Model:
        return resolve_model(None)

    def cost(self, usage: Usage) -> float | None:
        return self.inner.cost(usage)  # answers come from the wrapped model, at its price

    @property
    def supports_output_schema(self) -> bool:  # type: ignore[override]
        return self.inner.supports_output_schema

    @property
    def supports_tools(self) -> bool:  # type: ignore[override]
        return self.inner.supports_tools

    def check_ready(self) -> None:
        self.inner.check_ready()

    async def request(self, request: ModelRequest) -> ModelResponse:
        self.calls += 1
        self.arrivals.append(time.monotonic())
        if self.hang or self.calls <= self.hang_first:
            await asyncio.sleep(3600)  # a hung connection: only a timeout or a cancel ends it
        fail = (
            self.down or self.calls <= self.fail_first or self._random.random() < self.failure_rate
        )
        if fail:
            self.failures += 1
            await asyncio.sleep(0.01)  # even a failing request takes a moment
            headers = None if self.retry_after is None else {"Retry-After": f"{self.retry_after:g}"}
            message = "rate limited" if self.status == 429 else "injected fault"
            raise ProviderError(message, model=self.id, status_code=self.status, headers=headers)
        return await self.inner.request(request)


# One FlakyModel per dependency, so that each section scripts its own failures.
flaky_primary = FlakyModel("primary")
flaky_fast = FlakyModel("fast")
flaky_reliable = FlakyModel("reliable")
flaky_cloud = FlakyModel("cloud")
flaky_backup = FlakyModel("backup")
flaky_sentiment = FlakyModel("sentiment")
flaky_keywords = FlakyModel("keywords")
flaky_summary = FlakyModel("summary")
flaky_backend = FlakyModel("backend")
flaky_premium = FlakyModel("premium")
flaky_basic = FlakyModel("basic")
flaky_batch = FlakyModel("batch")
flaky_slow = FlakyModel("slow")
flaky_limited = FlakyModel("limited")
flaky_compare = FlakyModel("compare")


# ---------------------------------------------------------------------------------------------
# 1. Basic retry with max attempts: a policy as an agent argument
# ---------------------------------------------------------------------------------------------


@agent(
    model=flaky_primary,
    max_tokens=48,
    retry=Retry(attempts=3, backoff=fixed(0.1), on_retry=show_retry),
)
async def unreliable_agent(question: str) -> str:
    """Answer in one short sentence: {{ question }}"""


# ---------------------------------------------------------------------------------------------
# 2. Backoff: exponential as a workflow default, jittered as a decorator, fixed as a loop
# ---------------------------------------------------------------------------------------------


@agent(model=flaky_primary, max_tokens=48)  # no retry=: it takes the workflow's default
async def answer_agent(question: str) -> str:
    """Answer in one short sentence: {{ question }}"""


@workflow(retry=Retry(attempts=5, backoff=exponential(0.05), on_retry=show_retry))
async def exponential_workflow(question: str) -> str:
    """Every agent call in this workflow that sets no retry= of its own gets this policy."""
    return await answer_agent(question)


@agent(model=flaky_primary, max_tokens=48, retry=False)  # single attempts: retried around it
async def single_shot_agent(question: str) -> str:
    """Answer in one short sentence: {{ question }}"""


@retry(attempts=5, backoff=jittered(0.05), on_retry=show_retry)
async def ask_with_jitter(question: str) -> str:
    """Any async function can be retried; this one calls an agent whose own retries are off."""
    return await single_shot_agent(question)


async def ask_with_fixed_delay(question: str) -> str:
    """The context-iterator form retries a block of code: here, with the same delay each time."""
    async for attempt in Retry(attempts=5, backoff=fixed(0.05), on_retry=show_retry):
        with attempt:
            return await single_shot_agent(question)
    raise AssertionError("unreachable: the policy returns or raises")


# ---------------------------------------------------------------------------------------------
# 3. Fallback strategies
# ---------------------------------------------------------------------------------------------

CANNED_ANSWER = "Sorry, we cannot answer right now; please try again in a few minutes."


@agent(model=flaky_fast, retry=False, max_tokens=32)  # fail over at once, don't retry
async def fast_agent(question: str) -> str:
    """Answer in a few words: {{ question }}"""


@agent(
    model=flaky_reliable,
    max_tokens=48,
    retry=Retry(attempts=2, backoff=fixed(0.05), on_retry=show_retry),
)
async def reliable_agent(question: str) -> str:
    """Answer carefully in one sentence: {{ question }}"""


# Options are tried in order; the Answer says which one answered (or "default").
# Any async callable is an option, e.g. the same agent on another model: agent.using("local/...").
ask = Fallback(fast_agent, reliable_agent, default=CANNED_ANSWER)


@agent(
    model=flaky_cloud,
    fallback=[flaky_backup],  # in production, e.g. fallback=["local/smollm2"]
    max_tokens=48,
    retry=Retry(attempts=2, backoff=fixed(0.05), on_retry=show_retry),
)
async def summarise(text: str) -> str:
    """Summarise in one sentence: {{ text }}"""


# ---------------------------------------------------------------------------------------------
# 4. Partial retry: each step has its own policy, so only the failed steps are retried
# ---------------------------------------------------------------------------------------------

STEP_RETRY = Retry(attempts=3, backoff=exponential(0.05), on_retry=show_retry)


@agent(model=flaky_sentiment, max_tokens=16, temperature=0, retry=STEP_RETRY)
async def sentiment_agent(text: str) -> Literal["positive", "negative", "neutral"]:
    """Is the sentiment of this text positive, negative or neutral? Text: {{ text }}"""


@agent(model=flaky_keywords, max_tokens=48, temperature=0, retry=STEP_RETRY)
async def keywords_agent(
    text: str,
) -> Annotated[list[Annotated[str, Field(max_length=24)]], Field(max_length=3)]:
    """List up to three keywords of: {{ text }}"""


@agent(model=flaky_summary, max_tokens=48, retry=STEP_RETRY)
async def summary_agent(text: str) -> str:
    """Summarise in one sentence: {{ text }}"""


@workflow
async def analysis_workflow(text: str) -> dict[str, Any]:
    sentiment, keywords, summary = await gather(
        sentiment_agent(text), keywords_agent(text), summary_agent(text)
    )
    return {"sentiment": sentiment, "keywords": keywords, "summary": summary}


# ---------------------------------------------------------------------------------------------
# 5. Circuit breaker
# ---------------------------------------------------------------------------------------------


BREAKER_STEPS = {
    ("closed", "open"): "OPENED after 3 consecutive failures: calls now fail fast",
    ("open", "half_open"): "half-open: recovery_time passed, this call is the probe",
    ("half_open", "open"): "the probe failed: open again",
    ("half_open", "closed"): "the probe succeeded: closed again",
}
breaker_log: list[str] = []


def show_state(breaker: CircuitBreaker, old: str, new: str) -> None:
    """The ``on_state_change`` hook (collected here, printed after the call that caused it)."""
    breaker_log.append(f"breaker {breaker.name!r}: {old} -> {new}: {BREAKER_STEPS[old, new]}")


backend_breaker = CircuitBreaker(
    "backend", failure_threshold=3, recovery_time=0.3, on_state_change=show_state
)


# retry=False: one attempt per call, so each failed call counts once. (With retries on, every
# failed attempt counts, and a call refused by the open breaker is never retried.)
@agent(model=flaky_backend, retry=False, breaker=backend_breaker, max_tokens=24)
async def backend_agent(text: str) -> str:
    """Reply in a few words to: {{ text }}"""


# ---------------------------------------------------------------------------------------------
# 6. Graceful degradation
# ---------------------------------------------------------------------------------------------


class DetailedAnalysis(BaseModel):
    sentiment: Literal["positive", "negative", "neutral"]
    topics: list[Annotated[str, Field(max_length=24)]] = Field(max_length=3)
    summary: str = Field(max_length=120)


@agent(
    model=flaky_premium,
    max_tokens=96,
    retry=Retry(attempts=2, backoff=fixed(0.05), on_retry=show_retry),
)
async def premium_agent(text: str) -> DetailedAnalysis:
    """Analyse this review: {{ text }}"""


@agent(model=flaky_basic, retry=False, max_tokens=16, temperature=0)
async def basic_agent(text: str) -> Literal["positive", "negative", "neutral"]:
    """Is this review positive, negative or neutral? Review: {{ text }}"""


def heuristic_sentiment(text: str) -> str:
    """The last resort needs no model at all."""
    words = set(text.lower().replace(",", " ").replace(".", " ").replace("!", " ").split())
    good = len(words & {"great", "love", "excellent", "good", "happy"})
    bad = len(words & {"bad", "broken", "terrible", "awful", "slow"})
    return "positive" if good > bad else "negative" if bad > good else "neutral"


# ---------------------------------------------------------------------------------------------
# 7. Retry budgets
# ---------------------------------------------------------------------------------------------


@agent(
    model=flaky_batch,
    max_tokens=16,
    temperature=0,
    retry=Retry(attempts=3, backoff=fixed(0.05), on_retry=show_retry),
)
async def batch_agent(text: str) -> Literal["positive", "negative", "neutral"]:
    """Is this review positive, negative or neutral? Review: {{ text }}"""


@workflow(retry_budget=4)
async def label_batch(items: list[str]) -> list[Any]:
    """Each call may retry twice, but the whole run (every concurrent call) shares 4 retries."""
    return await gather(*(batch_agent(item) for item in items), return_exceptions=True)


# ---------------------------------------------------------------------------------------------
# 8. Timeouts and cancellation
# ---------------------------------------------------------------------------------------------


@agent(
    model=flaky_slow,
    timeout=1.0,  # per attempt: a hung attempt is cancelled and retried
    total_timeout=2.5,  # per call, retries and waits included
    retry=Retry(attempts=10, backoff=fixed(0.05), on_retry=show_retry),
    max_tokens=32,
)
async def slow_agent(question: str) -> str:
    """Answer in a few words: {{ question }}"""


# ---------------------------------------------------------------------------------------------
# 9. Rate limiting
# ---------------------------------------------------------------------------------------------

# Shared by every agent given it. To limit every agent call to a model instead, without touching
# the agents: kagura.resilience.limit_model("openai/gpt-4o-mini", requests_per_minute=500).
api_limiter = RateLimiter("demo-api", requests_per_second=5, burst=2)


@agent(
    model=flaky_limited,
    rate_limit=api_limiter,
    max_tokens=16,
    temperature=0,
    retry=Retry(attempts=3, backoff=fixed(0.05), on_retry=show_retry),
)
async def tag_agent(text: str) -> Literal["positive", "negative", "neutral"]:
    """Is this review positive, negative or neutral? Review: {{ text }}"""


# ---------------------------------------------------------------------------------------------
# 10. Hand-written vs library
# ---------------------------------------------------------------------------------------------


@agent(model=flaky_compare, retry=False, max_tokens=32)
async def plain_agent(question: str) -> str:
    """Answer in a few words: {{ question }}"""


hand_written_waits: list[float] = []
library_waits: list[float] = []


async def hand_written_retry(question: str, max_retries: int = 3, base_delay: float = 0.05) -> str:
    """The loop from the spec (with a shorter base delay, and the waits recorded)."""
    for attempt in range(max_retries):
        try:
            return await plain_agent(question)
        except ProviderError:  # retry provider failures, never bugs
            if attempt == max_retries - 1:
                raise
            wait = base_delay * 2**attempt  # 0.05 s, 0.1 s, ...
            hand_written_waits.append(wait)
            await asyncio.sleep(wait)
    raise AssertionError("unreachable")


# The same behaviour as one policy (the hook only records the waits, for the comparison).
@agent(
    model=flaky_compare,
    max_tokens=32,
    retry=Retry(
        attempts=3, backoff=exponential(0.05), on_retry=lambda d: library_waits.append(d.wait)
    ),
)
async def library_agent(question: str) -> str:
    """Answer in a few words: {{ question }}"""


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------


def describe_model() -> None:
    print(f"Agents that name no model run on: {resolve_model(None).id}")
    print("FlakyModel wrappers inject 503s, 429s and hangs on a fixed script.")
    print(f"Agents with no retry= of their own use {DEFAULT_RETRY!r}.")
    if os.environ.get("KAGURA_MODEL_OVERRIDE"):
        print(
            "WARNING: KAGURA_MODEL_OVERRIDE replaces every model, the FlakyModel wrappers too, "
            "so no fault will be injected. Use KAGURA_MODEL to choose the wrapped model."
        )


async def section_basic_retry() -> None:
    header("1. Basic retry with max attempts")
    print("  Retry(attempts=3, backoff=fixed(0.1)); the service fails twice, then recovers:")
    flaky_primary.script(fail_first=2)
    answer = await unreliable_agent("What is the capital of France?")
    print(f"  answered on attempt {flaky_primary.calls}: {short(answer)}")
    print("  The service stays down longer than 3 attempts:")
    flaky_primary.script(fail_first=5)
    try:
        await unreliable_agent("What is the capital of France?")
    except ProviderError as exc:
        print(f"  raised {type(exc).__name__}: {exc} [{notes(exc)}]")


async def section_backoff() -> None:
    header("2. Exponential backoff (and jittered, and fixed)")
    rng = random.Random(7)
    variants = [
        ("exponential(0.05), a @workflow(retry=...) default", exponential(0.05)),
        ("jittered(0.05), @retry(...) on an async function", jittered(0.05)),
        ("fixed(0.05), async for attempt in Retry(...)", fixed(0.05)),
    ]
    for label, backoff in variants:
        schedule = ", ".join(f"{backoff.delay(n, rng):.3f}" for n in range(1, 5))
        draw = " (one random draw)" if backoff.jitter else ""
        print(f"  {label}: waits {schedule} s ...{draw}")
    print("  (jitter draws each wait at random from [0, exponential wait]: clients that failed")
    print("   together don't retry together)")
    runs = [
        ("exponential", exponential_workflow),
        ("jittered", ask_with_jitter),
        ("fixed", ask_with_fixed_delay),
    ]
    for label, run in runs:
        print(f"  [{label}] the service fails 3 times:")
        flaky_primary.script(fail_first=3)
        start = time.perf_counter()
        answer = await run("Name a primary colour.")
        elapsed = time.perf_counter() - start
        print(
            f"    {flaky_primary.calls} attempts ({flaky_primary.failures} failed) in "
            f"{elapsed:.2f} s: {short(answer, 50)}"
        )


async def section_fallback() -> None:
    header("3. Fallback strategies")
    print("  Fallback(fast_agent, reliable_agent, default=CANNED_ANSWER); fast_agent is down:")
    flaky_fast.script(down=True)
    flaky_reliable.script()
    answer = await ask("Why is the sky blue?")
    print(f"  answered by {answer.source} (degraded={answer.degraded}): {short(answer.value)}")
    for name, error in answer.errors:
        print(f"    {name} failed first: {error}")
    print("  Both are down (reliable_agent is retried once first):")
    flaky_reliable.script(down=True)
    answer = await ask("Why is the sky blue?")
    print(f"  answered by {answer.source}: {answer.value}")
    print(f"    failed first: {', '.join(name for name, _ in answer.errors)}")

    print("  @agent(model=flaky_cloud, fallback=[flaky_backup]); the cloud model is down:")
    flaky_cloud.script(down=True)
    flaky_backup.script()
    with capture_events() as seen:  # the agent's span records which model answered
        summary = await summarise("Kagura retries, falls back and degrades gracefully.")
    answered_by = seen.spans("agent", "summarise")[-1].attributes["answered_by"]
    print(f"  model fallback: answered by {answered_by}: {short(summary, 60)}")
    print(
        f"    calls: {flaky_cloud.id} {flaky_cloud.calls} (all failed), "
        f"{flaky_backup.id} {flaky_backup.calls}"
    )


async def section_partial_retry() -> None:
    header("4. Partial retry")
    print("  Three steps in parallel, each with its own Retry policy;")
    print("  keywords fails once and summary twice, sentiment never fails:")
    flaky_sentiment.script()
    flaky_keywords.script(fail_first=1)
    flaky_summary.script(fail_first=2)
    result = await analysis_workflow(
        "The new update made the app faster, but the settings menu is confusing."
    )
    for name, value in result.items():
        print(f"  {name:>9}: {short(value)}")
    print(
        f"  model calls: sentiment {flaky_sentiment.calls}, keywords {flaky_keywords.calls}, "
        f"summary {flaky_summary.calls} (only the failed steps were retried)"
    )


async def section_circuit_breaker() -> None:
    header("5. Circuit breaker")
    backend_breaker.reset()
    print(
        f"  CircuitBreaker(failure_threshold={backend_breaker.failure_threshold}, "
        f"recovery_time={backend_breaker.recovery_time}); the backend fails its first 4 calls:"
    )
    flaky_backend.script(fail_first=4)
    for call_no in range(1, 10):
        if call_no in (6, 8):
            print(f"  ... waiting {backend_breaker.recovery_time} s (recovery_time) ...")
            await asyncio.sleep(backend_breaker.recovery_time)
        breaker_log.clear()
        start = time.perf_counter()
        try:
            reply = await backend_agent(f"ping {call_no}")
            result = f"ok: {short(reply, 40)}"
        except CircuitOpenError as exc:
            result = f"FAST FAIL: {exc}"
        except ProviderError as exc:
            result = f"failed: {exc}"
        elapsed_ms = (time.perf_counter() - start) * 1000
        print(f"  call {call_no}: {result} ({elapsed_ms:.0f} ms)")
        for line in breaker_log:
            log(f"^ {line}")
    print(f"  9 calls, {flaky_backend.calls} reached the backend; the others failed fast")


async def section_degradation() -> None:
    header("6. Graceful degradation")
    text = "Great screen and I love the battery, but the speakers are bad."
    print("  gather_partial(..., deadline=3.0): premium is down, keywords hangs:")
    flaky_basic.script()
    flaky_premium.script(down=True)
    flaky_keywords.script(hang=True)
    start = time.perf_counter()
    partial = await gather_partial(
        {
            "sentiment": basic_agent(text),
            "analysis": premium_agent(text),
            "keywords": keywords_agent(text),
        },
        deadline=3.0,
    )
    print(f"  after {time.perf_counter() - start:.1f} s, complete={partial.complete}:")
    for key, value in partial.results.items():
        print(f"    result    {key}: {short(value)}")
    for key, error in partial.errors.items():
        print(f"    error     {key}: {type(error).__name__}: {error}")
    for key in partial.cancelled:
        print(f"    cancelled {key} (still running at the deadline)")

    print("  Levels: Fallback(premium_agent, basic_agent, default=<heuristic, no model>):")
    for label, premium_down, basic_down in (
        ("all services up", False, False),
        ("premium service down", True, False),
        ("premium and basic down", True, True),
    ):
        flaky_premium.script(down=premium_down)
        flaky_basic.script(down=basic_down)
        print(f"  [{label}]")
        degrade = Fallback(premium_agent, basic_agent, default=heuristic_sentiment(text))
        answer = await degrade(text)
        print(f"    -> answered by {answer.source}: {short(answer.value, 80)}")


async def section_retry_budget() -> None:
    header("7. Retry budgets")
    items = [
        "Works as advertised.",
        "Broke in two days.",
        "Nice colour.",
        "Too expensive.",
        "Fast delivery, great seller.",
        "Would buy again.",
    ]
    print(
        f"  @workflow(retry_budget=4): {len(items)} concurrent calls, up to 3 attempts each;\n"
        f"  an outage fails the first {len(items)} requests:"
    )
    flaky_batch.script(fail_first=len(items))
    outcomes = await label_batch(items)
    gave_up = 0
    for item, outcome in zip(items, outcomes, strict=True):
        if isinstance(outcome, Exception):
            gave_up += 1
            print(f"  {item!r:32} gave up: {notes(outcome)}")
        else:
            print(f"  {item!r:32} ok: {outcome}")
    print(
        f"  retry budget ran out: {len(items) - gave_up} ok, {gave_up} gave up; "
        f"{flaky_batch.calls} requests instead of up to {3 * len(items)} "
        "(no retry storm against a struggling provider)"
    )


async def section_timeouts() -> None:
    header("8. Timeouts and cancellation")
    print("  @agent(timeout=1.0, total_timeout=2.5); the first request hangs:")
    flaky_slow.script(hang_first=1)
    start = time.perf_counter()
    answer = await slow_agent("What colour is the sky?")
    print(f"  answered on attempt {flaky_slow.calls} after {time.perf_counter() - start:.1f} s")
    print(f"    {short(answer)}")
    print("  Every request hangs: the total timeout ends the call, retries included:")
    flaky_slow.script(hang=True)
    start = time.perf_counter()
    try:
        await slow_agent("What colour is the sky?")
    except TimeoutError as exc:
        print(
            f"  raised {type(exc).__name__} after {time.perf_counter() - start:.1f} s "
            f"({flaky_slow.calls} attempts)"
        )
    print("  Cancelling the caller cancels the call at once; cancellation is never retried:")
    flaky_slow.script(hang=True)
    task = asyncio.create_task(slow_agent("What colour is the sky?"))
    await asyncio.sleep(0.1)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        print(f"  cancelled after 0.1 s; {flaky_slow.calls} request, no retry")


async def section_rate_limiting() -> None:
    header("9. Rate limiting")
    texts = [f"Review number {n}: it works." for n in range(1, 7)]
    print(
        f"  RateLimiter(requests_per_second={api_limiter.request_rate:g}, burst=2); "
        f"{len(texts)} calls at once:"
    )
    flaky_limited.script()
    start = time.monotonic()
    await gather(*(tag_agent(t) for t in texts))
    arrivals = ", ".join(f"+{t - start:.2f}" for t in flaky_limited.arrivals)
    print(f"  requests reached the provider at {arrivals} s")
    print("  The provider answers the first request with 429, Retry-After 0.5 s:")
    flaky_limited.script(fail_first=1, status=429, retry_after=0.5)
    start = time.monotonic()
    await gather(*(tag_agent(t) for t in texts[:3]))
    arrivals = ", ".join(f"+{t - start:.2f}" for t in flaky_limited.arrivals)
    print(f"  requests (the retry included) reached the provider at {arrivals} s")
    print(
        f"  the limiter held every caller for the Retry-After and slowed to "
        f"{api_limiter.rate_multiplier:.0%} of its rate (recovering over 30 s)"
    )


async def section_hand_written_vs_library() -> None:
    header("10. Hand-written vs library")
    print("  hand-written: for attempt in range(3): try/except ProviderError, sleep(0.05 * 2**n)")
    print("  library:      @agent(retry=Retry(attempts=3, backoff=exponential(0.05)))")
    for fail_first in (2, 5):
        outcomes = []
        for kind, call, waits in (
            ("hand-written", hand_written_retry, hand_written_waits),
            ("library", library_agent, library_waits),
        ):
            flaky_compare.script(fail_first=fail_first)
            waits.clear()
            try:
                await call("Name a fruit.")
                result = "answered"
            except ProviderError as exc:
                result = f"raised {type(exc).__name__}"
            outcomes.append((flaky_compare.calls, list(waits), result))
            print(
                f"  fails {fail_first}x, {kind:12}: {flaky_compare.calls} attempts, "
                f"waits {waits}, {result}"
            )
        print(f"  -> same behaviour: {outcomes[0] == outcomes[1]}")


async def main() -> None:
    started = time.perf_counter()
    describe_model()
    await section_basic_retry()
    await section_backoff()
    await section_fallback()
    await section_partial_retry()
    await section_circuit_breaker()
    await section_degradation()
    await section_retry_budget()
    await section_timeouts()
    await section_rate_limiting()
    await section_hand_written_vs_library()
    print(f"\nDone in {time.perf_counter() - started:.1f} s.")


if __name__ == "__main__":
    asyncio.run(main())
