"""Retry policies on plain async functions: what is retried, how long it waits, and what the
caller gets when it gives up. Waits are skipped with ``set_testing(True)`` (still recorded)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from kagura.errors import (
    MissingCredentialsError,
    OutputParseError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeout,
    UsageError,
)
from kagura.resilience import (
    Attempt,
    Retry,
    RetryDetails,
    exponential,
    fixed,
    is_transient,
    retry,
    set_testing,
)
from kagura.testing import capture_events

from .conftest import settle

pytestmark = pytest.mark.usefixtures("no_waits")


def http(status: int, **headers: str) -> ProviderError:
    return ProviderError("scripted", model="fake/echo", status_code=status, headers=headers)


class Flaky:
    """An async callable that raises the scripted errors in turn, then returns ``value``."""

    def __init__(self, *errors: BaseException, value: Any = "ok") -> None:
        self.errors = list(errors)
        self.value = value
        self.calls = 0

    async def __call__(self) -> Any:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.value


def recorder() -> tuple[list[RetryDetails], Callable[[RetryDetails], None]]:
    seen: list[RetryDetails] = []
    return seen, seen.append


# -- classification -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        http(429),
        http(408),
        http(409),
        http(425),
        http(500),
        http(502),
        http(503),
        http(504),
        ProviderTimeout("slow", model="fake/echo"),
        ProviderConnectionError("reset", model="fake/echo"),
        TimeoutError(),
        ConnectionResetError(),
        ConnectionRefusedError(),
        ProviderError("malformed answer", model="fake/echo"),
    ],
    ids=repr,
)
def test_transient_errors(error: BaseException) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        http(400),
        http(401),
        http(403),
        http(404),
        http(422),
        UsageError("bad argument"),
        MissingCredentialsError("openai/gpt-4o-mini", "OPENAI_API_KEY"),
        OutputParseError("classify", "not json", "invalid", 3),
        asyncio.CancelledError(),
        ValueError("a bug"),
        KeyError("x"),
    ],
    ids=repr,
)
def test_permanent_errors(error: BaseException) -> None:
    assert not is_transient(error)


# -- attempts and what is retried ----------------------------------------------------------


async def test_retries_until_success() -> None:
    fn = Flaky(http(503), http(502))
    assert await Retry(attempts=4).call(fn) == "ok"
    assert fn.calls == 3


async def test_attempts_counts_the_first_try() -> None:
    fn = Flaky(*(http(503) for _ in range(10)))
    with pytest.raises(ProviderError):
        await Retry(attempts=3).call(fn)
    assert fn.calls == 3


async def test_one_attempt_never_retries() -> None:
    fn = Flaky(http(503))
    with pytest.raises(ProviderError):
        await Retry(attempts=1).call(fn)
    assert fn.calls == 1


def test_attempts_must_be_positive() -> None:
    with pytest.raises(UsageError):
        Retry(attempts=0)


@pytest.mark.parametrize(
    "error",
    [
        http(400),
        http(401),
        http(403),
        UsageError("wrong"),
        MissingCredentialsError("openai/gpt-4o-mini", "OPENAI_API_KEY"),
        OutputParseError("classify", "not json", "invalid", 3),
    ],
    ids=repr,
)
async def test_permanent_errors_are_raised_at_once(error: Exception) -> None:
    fn = Flaky(error)
    with pytest.raises(type(error)) as caught:
        await Retry(attempts=5).call(fn)
    assert caught.value is error
    assert fn.calls == 1


@pytest.mark.parametrize(
    "error",
    [
        http(429),
        http(408),
        http(500),
        http(503),
        ProviderTimeout("slow"),
        ProviderConnectionError("refused"),
        TimeoutError(),
        ConnectionResetError(),
    ],
    ids=repr,
)
async def test_transient_errors_are_retried_by_default(error: Exception) -> None:
    fn = Flaky(error)
    assert await Retry().call(fn) == "ok"
    assert fn.calls == 2


async def test_retry_on_exception_types() -> None:
    policy = Retry(attempts=5, retry_on=(KeyError, ValueError))
    fn = Flaky(KeyError("a"), ValueError("b"))
    assert await policy.call(fn) == "ok"
    assert fn.calls == 3
    # Types not listed are not retried, even ones the default would retry.
    fn = Flaky(http(503))
    with pytest.raises(ProviderError):
        await policy.call(fn)
    assert fn.calls == 1


async def test_retry_on_nested_tuples_of_types_as_except_takes_them() -> None:
    my_errors = (ValueError, (LookupError,))
    policy = Retry(attempts=5, retry_on=(KeyError, my_errors))  # type: ignore[arg-type]
    fn = Flaky(KeyError("a"), ValueError("b"), IndexError("c"))
    assert await policy.call(fn) == "ok"
    assert fn.calls == 4
    fn = Flaky(TypeError("not listed"))
    with pytest.raises(TypeError):
        await policy.call(fn)
    assert fn.calls == 1


async def test_retry_on_the_empty_tuple_retries_nothing() -> None:
    fn = Flaky(http(503))
    with pytest.raises(ProviderError):
        await Retry(attempts=5, retry_on=()).call(fn)
    assert fn.calls == 1


async def test_retry_on_a_single_type() -> None:
    fn = Flaky(LookupError("x"), KeyError("subclass"))
    assert await Retry(retry_on=LookupError).call(fn) == "ok"
    assert fn.calls == 3


async def test_retry_on_a_predicate() -> None:
    seen: list[BaseException] = []

    def only_teapots(error: BaseException) -> bool:
        seen.append(error)
        return isinstance(error, ProviderError) and error.status_code == 418

    fn = Flaky(http(418), http(418), http(503))
    with pytest.raises(ProviderError) as caught:
        await Retry(attempts=10, retry_on=only_teapots).call(fn)
    assert caught.value.status_code == 503
    assert fn.calls == 3
    assert len(seen) == 3


def test_retry_on_must_be_a_predicate_or_types() -> None:
    with pytest.raises(UsageError):
        Retry(retry_on="ProviderError")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        ({"backoff": 5}, "backoff must be a Backoff such as exponential() or fixed(1.0), got 5"),
        ({"backoff": fixed}, "got the function fixed: call it"),
        ({"backoff": exponential}, "got the function exponential: call it"),
        ({"on_retry": 5}, "on_retry must be a function"),
        ({"retry_on": (ValueError, 5)}, "retry_on must be a predicate, an exception type or"),
        ({"retry_on": int}, "retry_on must be a predicate, an exception type or"),
        ({"retry_on": (ValueError, (KeyError, 5))}, "5 is not an exception type"),
        ({"respect_retry_after": "no"}, "respect_retry_after must be True or False"),
    ],
    ids=repr,
)
def test_a_setting_of_the_wrong_kind_is_refused_when_the_policy_is_made(
    settings: dict[str, Any], said: str
) -> None:
    # Not at the first failure, where its TypeError would take the place of the real error.
    with pytest.raises(UsageError) as caught:
        Retry(**settings)
    assert said in str(caught.value)


@pytest.mark.parametrize("setting", ["timeout", "total_timeout"])
@pytest.mark.parametrize("value", [0, 0.0, timedelta(0)], ids=repr)
def test_a_timeout_of_zero_is_refused(setting: str, value: object) -> None:
    # Nothing finishes in no time: every attempt would time out, having sent nothing.
    with pytest.raises(UsageError, match=f"{setting} must be more than 0 seconds"):
        Retry(**{setting: value})


def test_waits_may_be_zero() -> None:
    policy = Retry(backoff=fixed(0), max_retry_after=0)
    assert policy.backoff.delay(1) == 0
    assert policy.max_retry_after == 0


# -- giving up -----------------------------------------------------------------------------


async def test_the_last_error_passes_through_unwrapped_with_a_note() -> None:
    errors = [http(503), http(502), http(500)]
    fn = Flaky(*errors)
    with pytest.raises(ProviderError) as caught:
        await Retry(attempts=3).call(fn)
    assert caught.value is errors[-1]
    assert not isinstance(caught.value, BaseExceptionGroup)
    assert any("gave up after 3 attempts" in note for note in caught.value.__notes__)


async def test_a_permanent_error_gets_no_give_up_note() -> None:
    error = http(400)
    with pytest.raises(ProviderError):
        await Retry().call(Flaky(error))
    assert not getattr(error, "__notes__", [])


# -- cancellation --------------------------------------------------------------------------


async def test_cancelled_error_is_never_retried_and_propagates() -> None:
    fn = Flaky(asyncio.CancelledError())
    predicate_calls: list[BaseException] = []

    def everything(error: BaseException) -> bool:
        predicate_calls.append(error)
        return True

    with pytest.raises(asyncio.CancelledError):
        await Retry(attempts=5, retry_on=everything).call(fn)
    assert fn.calls == 1
    assert predicate_calls == []


async def test_cancelling_during_a_backoff_wait_stops_retrying() -> None:
    # A real (long) wait this time: the cancellation must interrupt it.
    waiting = asyncio.Event()
    fn = Flaky(*(http(503) for _ in range(5)))
    policy = Retry(attempts=5, backoff=fixed(3600), on_retry=lambda _: waiting.set())
    set_testing(False)  # the no_waits fixture restores the previous setting afterwards
    task = asyncio.create_task(policy.call(fn))
    await waiting.wait()
    await settle()
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fn.calls == 1


async def test_cancelling_a_running_attempt_propagates() -> None:
    started = asyncio.Event()
    calls = 0

    async def hang() -> None:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(Retry(attempts=5, retry_on=lambda _: True).call(hang))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 1


# -- waits and Retry-After -----------------------------------------------------------------


async def test_waits_follow_the_backoff() -> None:
    seen, hook = recorder()
    fn = Flaky(http(503), http(503), http(503))
    policy = Retry(attempts=4, backoff=exponential(1.0, factor=2.0, cap=3.0), on_retry=hook)
    assert await policy.call(fn, name="job") == "ok"
    assert [d.wait for d in seen] == [1.0, 2.0, 3.0]
    assert [d.attempt for d in seen] == [1, 2, 3]
    assert all(d.name == "job" for d in seen)
    assert all(isinstance(d.error, ProviderError) for d in seen)
    assert all(d.retry_after is None for d in seen)


async def test_the_default_backoff_is_jittered_exponential() -> None:
    backoff = Retry().backoff
    assert (backoff.base, backoff.factor, backoff.cap, backoff.jitter) == (0.5, 2.0, 30.0, "full")


async def test_retry_after_is_honoured() -> None:
    seen, hook = recorder()
    fn = Flaky(http(429, **{"Retry-After": "7"}), http(503, **{"retry-after": "2.5"}))
    with capture_events() as events:
        result = await Retry(backoff=fixed(0.1), on_retry=hook).call(fn, name="job")
    assert result == "ok"
    assert [d.retry_after for d in seen] == [7.0, 2.5]
    assert seen[0].wait >= 7.0
    assert seen[1].wait >= 2.5
    waits = [e for e in events.span_events if e.name == "retry_wait"]
    assert [e.attributes["retry_after"] for e in waits] == [7.0, 2.5]
    assert waits[0].attributes["wait"] >= 7.0
    assert waits[0].attributes["attempt"] == 1
    assert waits[0].attributes["name"] == "job"
    assert "ProviderError" in waits[0].attributes["error"]


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


async def test_an_error_whose_str_fails_is_retried_and_recorded_as_such() -> None:
    fn = Flaky(Unprintable(), Unprintable())
    with capture_events() as events, pytest.raises(Unprintable):
        await Retry(attempts=2, retry_on=Unprintable).call(fn, name="job")
    assert fn.calls == 2
    (wait,) = [e for e in events.span_events if e.name == "retry_wait"]
    said = "Unprintable: <str() of Unprintable failed: RuntimeError('no text')>"
    assert wait.attributes["error"] == said


async def test_a_longer_backoff_beats_a_short_retry_after() -> None:
    seen, hook = recorder()
    fn = Flaky(http(429, **{"Retry-After": "1"}))
    await Retry(backoff=fixed(5), on_retry=hook).call(fn)
    assert seen[0].wait == 5.0


async def test_retry_after_can_be_ignored() -> None:
    seen, hook = recorder()
    fn = Flaky(http(429, **{"Retry-After": "600"}))
    await Retry(backoff=fixed(0.5), respect_retry_after=False, on_retry=hook).call(fn)
    assert seen[0].wait == 0.5
    assert seen[0].retry_after is None


async def test_a_retry_after_above_the_maximum_is_raised_at_once() -> None:
    error = http(429, **{"Retry-After": "120"})
    fn = Flaky(error)
    seen, hook = recorder()
    with pytest.raises(ProviderError) as caught:
        await Retry(attempts=5, max_retry_after=timedelta(seconds=60), on_retry=hook).call(fn)
    assert caught.value is error
    assert fn.calls == 1
    assert seen == []
    assert any("exceeds max_retry_after" in note for note in error.__notes__)


async def test_retry_helper_builds_a_policy() -> None:
    policy = retry(attempts=2, backoff=fixed(1), max_retry_after=5)
    assert isinstance(policy, Retry)
    assert policy.attempts == 2
    assert policy.max_retry_after == 5.0


# -- timeouts ------------------------------------------------------------------------------


async def test_a_hanging_attempt_is_cancelled_and_retried() -> None:
    calls = 0
    cancelled = 0
    seen, hook = recorder()

    async def first_hangs() -> str:
        nonlocal calls, cancelled
        calls += 1
        if calls == 1:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled += 1
                raise
        return "second try"

    policy = Retry(attempts=3, timeout=0.01, on_retry=hook)
    assert await policy.call(first_hangs) == "second try"
    assert calls == 2
    assert cancelled == 1
    assert isinstance(seen[0].error, TimeoutError)


async def test_every_attempt_hanging_ends_in_timeout_error() -> None:
    calls = 0

    async def hang() -> None:
        nonlocal calls
        calls += 1
        await asyncio.Event().wait()

    with pytest.raises(TimeoutError) as caught:
        await Retry(attempts=3, timeout=timedelta(milliseconds=5)).call(hang, name="hang")
    assert calls == 3
    assert str(caught.value) == "hang: attempt 3 took longer than its 0.005s"
    assert any("gave up after 3 attempts" in n for n in caught.value.__notes__)


async def test_total_timeout_raises_timeout_error() -> None:
    calls = 0

    async def hang() -> None:
        nonlocal calls
        calls += 1
        await asyncio.Event().wait()

    with pytest.raises(TimeoutError, match=r"\.<locals>\.hang: no result within 0\.02s in all$"):
        await Retry(attempts=10, total_timeout=0.02)(hang)()
    assert calls == 1


async def test_no_retry_is_started_when_the_wait_would_pass_the_total_timeout() -> None:
    error = http(503)
    fn = Flaky(error, http(503))
    with pytest.raises(ProviderError) as caught:
        await Retry(attempts=5, backoff=fixed(3600), total_timeout=60).call(fn)
    assert caught.value is error
    assert fn.calls == 1
    assert any("total timeout" in note for note in error.__notes__)


# -- as a decorator ------------------------------------------------------------------------


async def test_retry_policy_as_a_decorator() -> None:
    calls: list[tuple[int, str]] = []

    @Retry(attempts=3)
    async def fetch(n: int, *, label: str) -> str:
        """Fetches."""
        calls.append((n, label))
        if len(calls) < 3:
            raise http(503)
        return f"{label}-{n}"

    assert await fetch(4, label="x") == "x-4"
    assert calls == [(4, "x")] * 3
    assert fetch.__name__ == "fetch"
    assert fetch.__doc__ == "Fetches."


async def test_retry_function_as_a_decorator() -> None:
    seen, hook = recorder()
    fn = Flaky(http(500))

    @retry(attempts=2, on_retry=hook)
    async def wrapped() -> Any:
        return await fn()

    assert await wrapped() == "ok"
    assert fn.calls == 2
    assert seen[0].name.endswith("wrapped")


async def test_the_decorator_gives_up_like_the_policy() -> None:
    @retry(attempts=2)
    async def always_down() -> None:
        raise http(503)

    with pytest.raises(ProviderError) as caught:
        await always_down()
    assert any("gave up after 2 attempts" in n for n in caught.value.__notes__)


def test_the_decorator_refuses_sync_functions() -> None:
    with pytest.raises(UsageError):

        @Retry()
        def not_async() -> None:  # type: ignore[type-var]
            pass


# -- as a context iterator -----------------------------------------------------------------


async def test_context_iterator_retries_the_block() -> None:
    fn = Flaky(http(503), ConnectionResetError())
    numbers: list[int] = []
    result = None
    async for attempt in Retry(attempts=4):
        with attempt:
            assert isinstance(attempt, Attempt)
            numbers.append(attempt.number)
            result = await fn()
    assert result == "ok"
    assert numbers == [1, 2, 3]


async def test_context_iterator_raises_the_last_error_with_a_note() -> None:
    errors = [http(503), http(503)]
    fn = Flaky(*errors)
    with pytest.raises(ProviderError) as caught:
        async for attempt in Retry(attempts=2):
            with attempt:
                await fn()
    assert caught.value is errors[-1]
    assert any("gave up after 2 attempts" in n for n in caught.value.__notes__)


async def test_context_iterator_does_not_retry_permanent_errors() -> None:
    fn = Flaky(http(401))
    with pytest.raises(ProviderError):
        async for attempt in Retry(attempts=5):
            with attempt:
                await fn()
    assert fn.calls == 1


async def test_context_iterator_records_its_waits() -> None:
    seen, hook = recorder()
    fn = Flaky(http(429, **{"Retry-After": "3"}))
    async for attempt in Retry(backoff=fixed(1), on_retry=hook):
        with attempt:
            await fn()
    assert [d.wait for d in seen] == [3.0]
    assert seen[0].name == "block"


async def test_context_iterator_lets_cancellation_through() -> None:
    calls = 0
    with pytest.raises(asyncio.CancelledError):
        async for attempt in Retry(attempts=5, retry_on=lambda _: True):
            with attempt:
                calls += 1
                raise asyncio.CancelledError
    assert calls == 1


async def test_context_iterator_total_timeout() -> None:
    fn = Flaky(*(http(503) for _ in range(10)))
    with pytest.raises(ProviderError) as caught:
        async for attempt in Retry(attempts=10, backoff=fixed(3600), total_timeout=60):
            with attempt:
                await fn()
    # The hour-long wait would pass the total timeout: no second attempt is started.
    assert fn.calls == 1
    assert any("total timeout" in n for n in caught.value.__notes__)
