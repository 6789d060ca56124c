"""Retries, fallbacks, circuit breakers and retry budgets, with real failures.

The failures are injected: ``FlakyModel`` wraps the default model and fails on a script with
``ProviderError("injected fault", status_code=503)``, exactly what a provider outage looks like.
Agents that use it say ``@agent(model=flaky, retry=False)``: Kagura agents retry transient errors
(429, 5xx, timeouts) by themselves by default, and ``retry=False`` turns that off here so that
every injected fault reaches the hand-written logic this example is about.

Sections:

1. Basic retry with max attempts
2. Exponential backoff (with jitter)
3. Fallback strategies (primary -> secondary -> canned answer)
4. Partial retry (re-run only the steps that failed, keep the rest)
5. Circuit breaker (open after repeated failures, fail fast, probe, close)
6. Graceful degradation (full -> basic -> minimal answers)
7. Retry budgets (a shared cap on retries for a whole batch)

Run it (no API key needed: the wrapped default model is the embedded SmolLM2-135M model):

    python examples/advanced_workflows/retry_workflow.py

Do not set KAGURA_MODEL_OVERRIDE for this one: it replaces every model, the FlakyModel wrappers
included, so no fault would be injected. Use KAGURA_MODEL to choose the wrapped model instead.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, Field

from kagura import ProviderError, RunError, agent, workflow
from kagura.providers import Model, ModelRequest, ModelResponse, resolve_model

T = TypeVar("T")


def short(text: object, limit: int = 70) -> str:
    """One line, at most ``limit`` characters: small models can ramble."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def header(title: str) -> None:
    print(f"\n=== {title} ===")


def log(message: str) -> None:
    print(f"    {message}")


# ---------------------------------------------------------------------------------------------
# Fault injection: a model that wraps the default model and fails on a script
# ---------------------------------------------------------------------------------------------


class FlakyModel(Model):
    """Fails with HTTP 503 on a script, otherwise passes the request to the default model.

    The wrapped model is looked up at every call (``resolve_model(None)``), so it follows
    ``KAGURA_MODEL`` and ``OPENAI_API_KEY`` like any agent that names no model.

    Script (reset with :meth:`script`): the first ``fail_first`` calls fail; ``down=True`` fails
    every call; ``failure_rate`` fails calls at random, from a seeded generator (reproducible).
    """

    provider = "flaky"

    def __init__(self, name: str, **script: Any) -> None:
        self.model_name = name
        self.script(**script)

    def script(
        self, *, fail_first: int = 0, down: bool = False, failure_rate: float = 0.0, seed: int = 0
    ) -> FlakyModel:
        self.fail_first = fail_first
        self.down = down
        self.failure_rate = failure_rate
        self._random = random.Random(seed)
        self.calls = 0  # requests that reached this model
        self.failures = 0  # of which failed on purpose
        return self

    @property
    def inner(self) -> Model:
        return resolve_model(None)

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
        fail = (
            self.down or self.calls <= self.fail_first or self._random.random() < self.failure_rate
        )
        if fail:
            self.failures += 1
            await asyncio.sleep(0.01)  # even a failing request takes a moment
            raise ProviderError("injected fault", model=self.id, status_code=503)
        return await self.inner.request(request)


# One FlakyModel per dependency, so that each section scripts its own failures.
flaky_primary = FlakyModel("primary")
flaky_fast = FlakyModel("fast")
flaky_reliable = FlakyModel("reliable")
flaky_keywords = FlakyModel("keywords")
flaky_summary = FlakyModel("summary")
flaky_backend = FlakyModel("backend")
flaky_premium = FlakyModel("premium")
flaky_basic = FlakyModel("basic")
flaky_batch = FlakyModel("batch")


# ---------------------------------------------------------------------------------------------
# Hand-written resilience: retry loop, circuit breaker, retry budget.
# Kept together so that library policies (kagura.resilience) can replace them in one place.
# ---------------------------------------------------------------------------------------------

# Retry what may succeed next time (the provider failed); never retry bugs (TypeError, ...).
RETRYABLE: tuple[type[BaseException], ...] = (ProviderError,)


class RetryBudgetExhausted(RunError):
    """The shared retry budget is spent: the call failed and may not be retried."""


class RetryBudget:
    """At most ``max_retries`` retries in total, shared by every call that uses the budget.

    Per-call attempt limits bound one call; a budget bounds the whole batch, so that a struggling
    provider gets a few retries, not ``items x attempts`` of them (no retry storm).
    """

    def __init__(self, max_retries: int) -> None:
        self.max_retries = max_retries
        self.used = 0

    @property
    def remaining(self) -> int:
        return self.max_retries - self.used

    def try_spend(self) -> bool:
        if self.used >= self.max_retries:
            return False
        self.used += 1
        return True


_jitter = random.Random(42)  # seeded so that the printed waits are reproducible


async def retry_with_backoff(
    call: Callable[[], Awaitable[T]],
    *,
    max_attempts: int = 3,
    base_delay: float = 0.05,
    multiplier: float = 2.0,
    jitter: float = 0.0,
    budget: RetryBudget | None = None,
) -> T:
    """Call ``call()`` until it succeeds, at most ``max_attempts`` times.

    The wait before retry n is ``base_delay * multiplier ** (n - 1)`` plus up to ``jitter`` times
    that at random: ``multiplier=1`` is a fixed delay, ``multiplier=2`` exponential backoff.
    """
    for attempt in range(1, max_attempts + 1):
        try:
            result = await call()
        except RETRYABLE as exc:
            if attempt == max_attempts:
                log(f"attempt {attempt}/{max_attempts} failed: {exc} -> no attempts left")
                raise
            if budget is not None and not budget.try_spend():
                log(f"attempt {attempt}/{max_attempts} failed: {exc} -> retry budget exhausted")
                raise RetryBudgetExhausted(
                    f"retry budget of {budget.max_retries} exhausted; last error: {exc}"
                ) from exc
            delay = base_delay * multiplier ** (attempt - 1)
            delay += _jitter.uniform(0, delay * jitter)
            spent = f" (retry budget left: {budget.remaining})" if budget is not None else ""
            log(f"attempt {attempt}/{max_attempts} failed: {exc} -> waiting {delay:.3f} s{spent}")
            await asyncio.sleep(delay)
        else:
            log(f"attempt {attempt}/{max_attempts} succeeded")
            return result
    raise AssertionError("unreachable")


class CircuitOpenError(RunError):
    """The breaker is open: the call was refused without reaching the dependency."""


class CircuitBreaker:
    """closed --(threshold consecutive failures)--> open --(reset_timeout)--> half-open;
    half-open --(trial call succeeds)--> closed, --(trial fails)--> open again."""

    def __init__(self, failure_threshold: int = 3, reset_timeout: float = 0.2) -> None:
        self.threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.failures = 0
        self.state: Literal["closed", "open", "half-open"] = "closed"
        self.opened_at = 0.0

    def before_call(self) -> None:
        """Raise :class:`CircuitOpenError` if the call must fail fast."""
        if self.state == "open":
            waited = time.monotonic() - self.opened_at
            if waited < self.reset_timeout:
                retry_in = self.reset_timeout - waited
                raise CircuitOpenError(
                    f"circuit open: failing fast (next trial in {retry_in:.2f} s)"
                )
            self.state = "half-open"  # let one trial call through
            log(f"breaker: {waited:.2f} s since it opened -> half-open, one trial call allowed")

    def record_success(self) -> None:
        self.failures = 0
        self.state = "closed"

    def record_failure(self) -> None:
        self.failures += 1
        if self.state == "half-open" or self.failures >= self.threshold:
            self.state = "open"
            self.opened_at = time.monotonic()

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        self.before_call()
        try:
            result = await fn()
        except RETRYABLE:
            self.record_failure()
            raise
        self.record_success()
        return result


# ---------------------------------------------------------------------------------------------
# Agents (those on a FlakyModel have their built-in retries turned off: see the module docstring)
# ---------------------------------------------------------------------------------------------


@agent(model=flaky_primary, retry=False, max_tokens=48)
async def unreliable_agent(question: str) -> str:
    """Answer in one short sentence: {{ question }}"""


@agent(model=flaky_fast, retry=False, max_tokens=32)
async def fast_agent(question: str) -> str:
    """Answer in a few words: {{ question }}"""


@agent(model=flaky_reliable, retry=False, max_tokens=48)
async def reliable_agent(question: str) -> str:
    """Answer carefully in one sentence: {{ question }}"""


@agent(max_tokens=16, temperature=0)
async def sentiment_agent(text: str) -> Literal["positive", "negative", "neutral"]:
    """Is the sentiment of this text positive, negative or neutral? Text: {{ text }}"""


@agent(model=flaky_keywords, retry=False, max_tokens=48, temperature=0)
async def keywords_agent(
    text: str,
) -> Annotated[list[Annotated[str, Field(max_length=24)]], Field(max_length=3)]:
    """List up to three keywords of: {{ text }}"""


@agent(model=flaky_summary, retry=False, max_tokens=48)
async def summary_agent(text: str) -> str:
    """Summarise in one sentence: {{ text }}"""


@agent(model=flaky_backend, retry=False, max_tokens=32)
async def backend_agent(text: str) -> str:
    """Reply in a few words to: {{ text }}"""


class DetailedAnalysis(BaseModel):
    sentiment: Literal["positive", "negative", "neutral"]
    topics: list[Annotated[str, Field(max_length=24)]] = Field(max_length=3)
    summary: str = Field(max_length=120)


@agent(model=flaky_premium, retry=False, max_tokens=96)
async def premium_agent(text: str) -> DetailedAnalysis:
    """Analyse this review: {{ text }}"""


@agent(model=flaky_basic, retry=False, max_tokens=16, temperature=0)
async def basic_agent(text: str) -> Literal["positive", "negative", "neutral"]:
    """Is this review positive, negative or neutral? Review: {{ text }}"""


@agent(model=flaky_batch, retry=False, max_tokens=16, temperature=0)
async def batch_agent(text: str) -> Literal["positive", "negative", "neutral"]:
    """Is this review positive, negative or neutral? Review: {{ text }}"""


# ---------------------------------------------------------------------------------------------
# Workflows
# ---------------------------------------------------------------------------------------------


@workflow
async def retry_workflow(question: str, max_attempts: int = 3) -> str:
    """1. Retry a few times with a short fixed delay, then give up (the last error propagates)."""
    return await retry_with_backoff(
        lambda: unreliable_agent(question), max_attempts=max_attempts, multiplier=1.0
    )


@workflow
async def backoff_workflow(question: str) -> str:
    """2. Exponential backoff with jitter: each wait doubles, plus up to 10% at random."""
    return await retry_with_backoff(
        lambda: unreliable_agent(question),
        max_attempts=5,
        base_delay=0.05,
        multiplier=2.0,
        jitter=0.1,
    )


CANNED_ANSWER = "Sorry, we cannot answer right now; please try again in a few minutes."


@workflow
async def resilient_workflow(question: str) -> tuple[str, str]:
    """3. Try the fast primary, fall back to the reliable secondary, then to a canned answer."""
    for name, candidate in (("fast_agent", fast_agent), ("reliable_agent", reliable_agent)):
        try:
            return name, await candidate(question)
        except RunError as exc:
            log(f"{name} failed: {exc} -> falling back")
    return "canned answer", CANNED_ANSWER


@workflow
async def partial_retry_workflow(text: str, max_rounds: int = 3) -> dict[str, Any]:
    """4. Run the steps in parallel; re-run only the failed ones, keeping what succeeded."""
    steps: dict[str, Callable[[], Awaitable[Any]]] = {
        "sentiment": lambda: sentiment_agent(text),
        "keywords": lambda: keywords_agent(text),
        "summary": lambda: summary_agent(text),
    }
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for round_no in range(1, max_rounds + 1):
        pending = [name for name in steps if name not in results]
        if not pending:
            break
        log(f"round {round_no}: running {', '.join(pending)}")
        outcomes = await asyncio.gather(*(steps[n]() for n in pending), return_exceptions=True)
        for name, outcome in zip(pending, outcomes, strict=True):
            if isinstance(outcome, RunError):
                errors[name] = str(outcome)
                log(f"  {name:>9}: FAILED ({outcome})")
            elif isinstance(outcome, BaseException):
                raise outcome  # a bug or a cancellation: do not hide it
            else:
                results[name] = outcome
                errors.pop(name, None)
                log(f"  {name:>9}: ok")
        if errors:
            log(f"  partial results so far: {sorted(results)}; failed: {sorted(errors)}")
    return {"results": results, "errors": errors}


breaker = CircuitBreaker(failure_threshold=3, reset_timeout=0.2)


@workflow
async def protected_workflow(text: str) -> str:
    """5. Every call goes through the breaker; while it is open, calls fail fast."""
    return await breaker.call(lambda: backend_agent(text))


def heuristic_sentiment(text: str) -> str:
    """The last resort needs no model at all."""
    words = set(text.lower().replace(",", " ").replace(".", " ").replace("!", " ").split())
    good = len(words & {"great", "love", "excellent", "good", "happy"})
    bad = len(words & {"bad", "broken", "terrible", "awful", "slow"})
    return "positive" if good > bad else "negative" if bad > good else "neutral"


@workflow
async def degrading_workflow(text: str) -> dict[str, Any]:
    """6. Premium analysis if possible, else basic, else a keyword heuristic: always an answer."""
    try:
        return {"level": "full", "analysis": await premium_agent(text)}
    except RunError as exc:
        log(f"premium_agent failed: {short(exc, 60)} -> degrading to basic")
    try:
        return {"level": "basic", "sentiment": await basic_agent(text)}
    except RunError as exc:
        log(f"basic_agent failed: {short(exc, 60)} -> degrading to heuristic")
    return {"level": "minimal", "sentiment": heuristic_sentiment(text)}


@workflow
async def budgeted_batch(items: list[str], budget: RetryBudget) -> list[tuple[str, str]]:
    """7. Every item may be attempted 3 times, but the whole batch shares one retry budget."""
    outcomes: list[tuple[str, str]] = []
    for number, item in enumerate(items, 1):
        log(f"item {number}: {item!r}")
        try:
            label = await retry_with_backoff(
                functools.partial(batch_agent, item),
                max_attempts=3,
                base_delay=0.02,
                budget=budget,
            )
            outcomes.append((item, f"ok: {label}"))
        except RetryBudgetExhausted:
            outcomes.append((item, "gave up: retry budget exhausted"))
        except ProviderError:
            outcomes.append((item, "gave up: no attempts left"))
    return outcomes


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------


def describe_model() -> None:
    print(f"Agents that name no model run on: {resolve_model(None).id}")
    print("FlakyModel wrappers inject 'HTTP 503: injected fault' errors on a fixed script.")
    if os.environ.get("KAGURA_MODEL_OVERRIDE"):
        print(
            "WARNING: KAGURA_MODEL_OVERRIDE replaces every model, the FlakyModel wrappers too, "
            "so no fault will be injected. Use KAGURA_MODEL to choose the wrapped model."
        )


async def main() -> None:
    started = time.perf_counter()
    describe_model()

    header("1. Basic retry with max attempts")
    print("  The service fails twice, then recovers (3 attempts allowed, 0.05 s between them):")
    flaky_primary.script(fail_first=2)
    answer = await retry_workflow("What is the capital of France?")
    print(f"  answer: {short(answer)}")
    print("  The service stays down longer than the attempts allow:")
    flaky_primary.script(fail_first=5)
    try:
        await retry_workflow("What is the capital of France?")
    except ProviderError as exc:
        print(f"  gave up after 3 attempts: {exc}")

    header("2. Exponential backoff")
    print("  The service fails 3 times; waits double from 0.05 s (+ up to 10% jitter):")
    flaky_primary.script(fail_first=3)
    start = time.perf_counter()
    answer = await backoff_workflow("Name a primary colour.")
    print(f"  answer: {short(answer)}")
    print(
        f"  {flaky_primary.calls} attempts ({flaky_primary.failures} failed) "
        f"in {time.perf_counter() - start:.2f} s"
    )

    header("3. Fallback strategies")
    print("  The fast primary is down, the reliable secondary is up:")
    flaky_fast.script(down=True)
    flaky_reliable.script()
    answered_by, answer = await resilient_workflow("Why is the sky blue?")
    print(f"  answered by {answered_by} (fallback): {short(answer)}")
    print("  Both are down:")
    flaky_reliable.script(down=True)
    answered_by, answer = await resilient_workflow("Why is the sky blue?")
    print(f"  answered by {answered_by} (last-resort fallback): {answer}")

    header("4. Partial retry")
    print("  keywords fails once and summary twice; sentiment never runs twice:")
    flaky_keywords.script(fail_first=1)
    flaky_summary.script(fail_first=2)
    outcome = await partial_retry_workflow(
        "The new update made the app faster, but the settings menu is confusing."
    )
    for name, value in outcome["results"].items():
        print(f"  {name:>9}: {short(value)}")
    print(
        f"  model calls: keywords {flaky_keywords.calls}, summary {flaky_summary.calls} "
        "(sentiment once)"
    )

    header("5. Circuit breaker")
    print(
        f"  threshold {breaker.threshold} consecutive failures, reset timeout "
        f"{breaker.reset_timeout} s; the backend fails its first 3 calls, then recovers:"
    )
    flaky_backend.script(fail_first=3)
    for call_no in range(1, 8):
        if call_no == 6:
            print(f"  ... waiting {breaker.reset_timeout} s for the reset timeout ...")
            await asyncio.sleep(breaker.reset_timeout)
        state_before = breaker.state
        start = time.perf_counter()
        try:
            reply = await protected_workflow(f"ping {call_no}")
            result = f"ok: {short(reply, 40)}"
        except CircuitOpenError as exc:
            result = f"FAST FAIL: {exc}"
        except ProviderError as exc:
            result = f"failed: {exc}"
        elapsed_ms = (time.perf_counter() - start) * 1000
        transition = (
            f"{state_before} -> {breaker.state}" if state_before != breaker.state else breaker.state
        )
        print(f"  call {call_no}: [{transition}] {result} ({elapsed_ms:.0f} ms)")
        if state_before != "open" and breaker.state == "open":
            print("          ^ circuit breaker OPENED")
    print(f"  7 calls, {flaky_backend.calls} reached the backend; the others failed fast")

    header("6. Graceful degradation")
    text = "Great screen and I love the battery, but the speakers are bad."
    for label, premium_down, basic_down in (
        ("all services up", False, False),
        ("premium service down", True, False),
        ("premium and basic down", True, True),
    ):
        flaky_premium.script(down=premium_down)
        flaky_basic.script(down=basic_down)
        print(f"  [{label}]")
        degraded = await degrading_workflow(text)
        details = {k: v for k, v in degraded.items() if k != "level"}
        print(f"    -> level={degraded['level']}: {short(details, 100)}")

    header("7. Retry budgets")
    budget = RetryBudget(max_retries=3)
    flaky_batch.script(failure_rate=0.5, seed=3)
    items = [
        "Works as advertised.",
        "Broke in two days.",
        "Nice colour.",
        "Too expensive.",
        "Fast delivery, great seller.",
        "Would buy again.",
    ]
    print(
        f"  {len(items)} items, up to 3 attempts each, one shared budget of "
        f"{budget.max_retries} retries; the provider fails ~50% of calls:"
    )
    outcomes = await budgeted_batch(items, budget)
    for item, result in outcomes:
        print(f"  {item!r:32} {result}")
    gave_up = sum(result.startswith("gave up") for _, result in outcomes)
    print(
        f"  retries used {budget.used}/{budget.max_retries}; {len(items) - gave_up} ok, "
        f"{gave_up} gave up instead of retrying without limit"
    )

    print(f"\nDone in {time.perf_counter() - started:.1f} s.")


if __name__ == "__main__":
    asyncio.run(main())
