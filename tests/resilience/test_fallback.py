"""Fallback chains: plain functions, agents on other models, and ``@agent(fallback=...)``."""

from __future__ import annotations

import asyncio

import pytest

from kagura import agent
from kagura.errors import MissingCredentialsError, ProviderError, UsageError
from kagura.resilience import Answer, Fallback, Retry, fixed
from kagura.testing import FakeModel, capture_events

from .conftest import settle


async def fast(text: str) -> str:
    raise ProviderError("fast is down", status_code=503)


async def reliable(text: str) -> str:
    return f"reliable: {text}"


async def also_down(text: str) -> str:
    raise ConnectionError("also down")


async def test_the_first_option_that_answers_wins() -> None:
    answer = await Fallback(reliable, fast)("hi")
    assert answer == Answer("reliable: hi", "reliable", ())
    assert not answer.degraded


async def test_the_source_says_which_option_answered() -> None:
    answer = await Fallback(fast, also_down, reliable)("hi")
    assert answer.value == "reliable: hi"
    assert answer.source == "reliable"
    assert answer.degraded
    assert [name for name, _ in answer.errors] == ["fast", "also_down"]
    assert isinstance(answer.errors[0][1], ProviderError)
    assert isinstance(answer.errors[1][1], ConnectionError)


async def test_the_default_answers_when_every_option_failed() -> None:
    answer = await Fallback(fast, also_down, default="n/a")("hi")
    assert answer.value == "n/a"
    assert answer.source == "default"
    assert len(answer.errors) == 2


async def test_a_none_default_is_still_a_default() -> None:
    answer = await Fallback(fast, default=None)("hi")
    assert answer.value is None
    assert answer.source == "default"


async def test_without_a_default_the_last_error_is_raised_with_notes() -> None:
    with pytest.raises(ConnectionError) as caught:
        await Fallback(fast, also_down)("hi")
    assert str(caught.value) == "also down"
    notes = caught.value.__notes__
    assert any("'fast' failed first" in n and "fast is down" in n for n in notes)


async def test_on_limits_what_moves_on() -> None:
    chain = Fallback(also_down, reliable, on=ProviderError)
    with pytest.raises(ConnectionError):
        await chain("hi")
    assert (await Fallback(fast, reliable, on=ProviderError)("x")).source == "reliable"


async def test_cancellation_is_not_a_reason_to_fall_back() -> None:
    started = asyncio.Event()
    backup_calls = 0

    async def hang(text: str) -> str:
        started.set()
        await asyncio.Event().wait()
        return text

    async def backup(text: str) -> str:
        nonlocal backup_calls
        backup_calls += 1
        return text

    task = asyncio.create_task(Fallback(hang, backup, default="d")("hi"))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle()
    assert backup_calls == 0


async def test_an_option_raising_cancelled_error_propagates() -> None:
    async def cancelled(text: str) -> str:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await Fallback(cancelled, reliable, default="d")("hi")


async def test_cancellation_propagates_even_under_on_base_exception() -> None:
    started = asyncio.Event()
    backup_calls = 0

    async def hang(text: str) -> str:
        started.set()
        await asyncio.Event().wait()
        return text

    async def backup(text: str) -> str:
        nonlocal backup_calls
        backup_calls += 1
        return text

    task = asyncio.create_task(Fallback(hang, backup, on=BaseException)("hi"))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backup_calls == 0


async def test_on_base_exception_still_moves_on_after_errors() -> None:
    answer = await Fallback(fast, reliable, on=BaseException)("hi")
    assert answer.source == "reliable"


@pytest.mark.parametrize(
    "on",
    ["ProviderError", 5, (ProviderError, "x"), (ProviderError, (KeyError, "x")), int],
    ids=repr,
)
def test_on_must_be_exception_types(on: object) -> None:
    # Refused when made: else "catching classes that do not inherit from BaseException is not
    # allowed" at the first failure, in place of that failure.
    with pytest.raises(UsageError, match="Fallback's on must be an exception type"):
        Fallback(fast, reliable, on=on)  # type: ignore[arg-type]


async def test_on_takes_nested_tuples_of_types_as_except_does() -> None:
    my_errors = (ProviderError, (ConnectionError,))
    chain = Fallback(fast, also_down, reliable, on=(KeyError, my_errors))  # type: ignore[arg-type]
    assert (await chain("hi")).source == "reliable"


async def test_on_the_empty_tuple_never_moves_on() -> None:
    with pytest.raises(ProviderError, match="fast is down"):
        await Fallback(fast, reliable, on=())("hi")


def test_sync_options_are_refused() -> None:
    def sync_answer(text: str) -> str:
        return text

    # Refused when made, as Retry(...) refuses to decorate one: else it "fails" when reached,
    # with a TypeError taken for its failure, and the chain falls through to its default.
    with pytest.raises(UsageError, match=r"sync_answer.* is not: wrap a sync function"):
        Fallback(fast, sync_answer, default="d")


async def test_the_earlier_errors_are_the_context_of_the_last() -> None:
    async def third(text: str) -> str:
        raise KeyError("third down")

    with pytest.raises(KeyError) as caught:
        await Fallback(fast, also_down, third)("hi")
    # As though each option had been tried in the except of the one before.
    assert isinstance(caught.value.__context__, ConnectionError)
    assert isinstance(caught.value.__context__.__context__, ProviderError)
    notes = caught.value.__notes__
    assert [n.split(":")[1] for n in notes] == [
        " fallback option 'fast' failed first",
        " fallback option 'also_down' failed first",
    ]


def depth(error: BaseException | None) -> int:
    found = 0
    while error is not None:
        found, error = found + 1, error.__context__
    return found


async def test_an_error_raised_to_every_call_gathers_a_bounded_amount() -> None:
    # Every caller awaiting one failed future gets the same exception: were each call to chain
    # and note on it without end, it would keep every call's errors alive.
    failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    failed.set_exception(ConnectionError("the shared pool failed to start"))

    async def primary(text: str) -> str:
        raise RuntimeError(f"primary down for {text}")

    async def shared(text: str) -> str:
        return await failed

    async def last(text: str) -> str:
        raise KeyError(f"last refused {text}")

    chain, last_shared = Fallback(primary, shared, last), Fallback(primary, shared)
    for call in range(40):
        with pytest.raises(ConnectionError):
            await last_shared(str(call))
        with pytest.raises(KeyError) as caught:
            await chain(str(call))
        assert caught.value.__context__ is failed.exception()
    error = failed.exception()
    assert error is not None
    assert depth(error) <= 16
    assert len(error.__notes__) <= 16


async def test_nested_fallbacks_keep_the_failures_of_both() -> None:
    def down(name: str) -> FakeModel:
        return FakeModel([ProviderError(f"{name} down", status_code=400)], name=name)

    @agent(model=down("a1"), fallback=[down("a2")], retry=False)
    async def first(q: str) -> str:
        """{{ q }}"""

    @agent(model=down("b1"), fallback=[down("b2")], retry=False)
    async def second(q: str) -> str:
        """{{ q }}"""

    with pytest.raises(ProviderError) as caught:
        await Fallback(first, second)("hi")
    assert [note.split(":")[1] for note in caught.value.__notes__] == [
        " fallback model 'fake/b1' failed first",
        " fallback option 'first' failed first",
    ]
    chain, error = [], caught.value
    while error is not None:
        chain.append(str(error))
        error = error.__context__
    assert chain == [f"HTTP 400: {name} down" for name in ("b2", "b1", "a2", "a1")]


async def test_arguments_are_passed_to_every_option() -> None:
    seen: list[tuple[tuple[object, ...], dict[str, object]]] = []

    async def record(*args: object, **kwargs: object) -> str:
        seen.append((args, kwargs))
        raise ValueError("no")

    await Fallback(record, record, default="d")(1, 2, key="v")
    assert seen == [((1, 2), {"key": "v"})] * 2


async def test_each_failure_is_recorded_as_a_span_event() -> None:
    with capture_events() as events:
        await Fallback(fast, also_down, reliable)("hi")
    failed = [e.attributes["failed"] for e in events.span_events if e.name == "fallback"]
    assert failed == ["fast", "also_down"]


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


async def unprintable(text: str) -> str:
    raise Unprintable()


async def test_a_failure_whose_str_fails_is_recorded_and_the_next_option_tried() -> None:
    with capture_events() as events:
        answer = await Fallback(unprintable, reliable)("hi")
    assert answer.value == "reliable: hi"
    (event,) = [e for e in events.span_events if e.name == "fallback"]
    said = "Unprintable: <str() of Unprintable failed: RuntimeError('no text')>"
    assert event.attributes["error"] == said


def test_a_fallback_needs_options() -> None:
    with pytest.raises(UsageError):
        Fallback()


# -- agents --------------------------------------------------------------------------------


async def test_agent_using_another_model_as_an_option() -> None:
    primary = FakeModel([ProviderError("overloaded", status_code=529)])

    @agent(model=primary, retry=False)
    async def summarise(text: str) -> str:
        """Summarise: {{ text }}"""

    other = summarise.using("fake/other")
    assert other.name == "summarise@fake/other"
    assert other.policies is summarise.policies
    answer = await Fallback(summarise, other)("the text")
    assert answer.value == "Summarise: the text"
    assert answer.source == "summarise@fake/other"
    assert [name for name, _ in answer.errors] == ["summarise"]
    assert len(primary.requests) == 1


async def test_using_rejects_a_bad_model_string() -> None:
    @agent(model="fake")
    async def summarise(text: str) -> str:
        """Summarise: {{ text }}"""

    with pytest.raises(UsageError):
        summarise.using("nonsense-provider/model")


async def test_agent_fallback_answers_after_the_primarys_retries(no_waits: None) -> None:
    primary = FakeModel([ProviderError("down", status_code=503) for _ in range(10)], name="main")

    @agent(model=primary, fallback=["fake/backup"])
    async def summarise(text: str) -> str:
        """Summarise: {{ text }}"""

    with capture_events() as events:
        assert await summarise("the text") == "Summarise: the text"
    assert len(primary.requests) == 4  # the default policy's 4 attempts, then the backup
    (span,) = events.spans(kind="agent")
    assert span.status == "completed"
    assert span.attributes["answered_by"] == "fake/backup"
    llm = events.spans(kind="llm")
    assert [s.name for s in llm] == ["fake/main"] * 4 + ["fake/backup"]
    assert [s.status for s in llm] == ["failed"] * 4 + ["completed"]
    assert all(s.parent_id == span.span_id for s in llm)
    (moved,) = [e.attributes for e in events.span_events if e.name == "fallback"]
    assert moved["failed"] == "fake/main"
    assert moved["next"] == "fake/backup"


async def test_the_primary_answers_when_it_can() -> None:
    primary = FakeModel(["primary answer"], name="main")

    @agent(model=primary, fallback=["fake/backup"])
    async def summarise(text: str) -> str:
        """Summarise: {{ text }}"""

    with capture_events() as events:
        assert await summarise("t") == "primary answer"
    assert events.spans(kind="agent")[0].attributes["answered_by"] == "fake/main"


async def test_when_every_model_fails_the_last_error_is_raised() -> None:
    primary = FakeModel([ProviderError("bad key", status_code=401)], name="main")
    backup = FakeModel([ProviderError("backup down", status_code=500)], name="second")

    @agent(model=primary, retry=False, fallback=[backup])
    async def summarise(text: str) -> str:
        """Summarise: {{ text }}"""

    with pytest.raises(ProviderError) as caught:
        await summarise("t")
    assert caught.value.status_code == 500
    assert len(primary.requests) == len(backup.requests) == 1


async def test_the_last_error_carries_the_failures_of_the_models_before() -> None:
    first = ProviderError("first down", status_code=500)
    primary = FakeModel([first] * 4, name="main")
    bad_key = ProviderError("bad key", status_code=401)
    second = FakeModel([bad_key], name="second")
    third = FakeModel([ProviderError("bad request", status_code=400)], name="third")

    @agent(model=primary, fallback=[second, third], retry=Retry(attempts=4, backoff=fixed(0)))
    async def summarise(text: str) -> str:
        """Summarise: {{ text }}"""

    with pytest.raises(ProviderError) as caught:
        await summarise("t")
    assert caught.value.status_code == 400
    # Noted as a Fallback notes the options that failed before its last...
    fallback_notes = [n for n in caught.value.__notes__ if "fallback" in n]
    assert fallback_notes == [
        f"kagura: fallback model 'fake/main' failed first: ProviderError: {first}",
        f"kagura: fallback model 'fake/second' failed first: ProviderError: {bad_key}",
    ]
    # ...and chained, as though each model had been tried in the except of the one before.
    assert caught.value.__context__ is bad_key
    assert bad_key.__context__ is first


class _NoKeyModel(FakeModel):
    def check_ready(self) -> None:
        raise MissingCredentialsError(self.id, "NO_KEY_API_KEY")


async def test_a_fallback_model_that_cannot_run_still_reports_the_primarys_failure() -> None:
    down = ProviderError("down", status_code=500)
    primary = FakeModel([down], name="main")

    @agent(model=primary, fallback=[_NoKeyModel(name="nokey")], retry=False)
    async def summarise(text: str) -> str:
        """Summarise: {{ text }}"""

    with pytest.raises(MissingCredentialsError) as caught:
        await summarise("t")
    assert caught.value.__notes__ == [
        f"kagura: fallback model 'fake/main' failed first: ProviderError: {down}"
    ]


def test_a_bad_fallback_model_string_fails_at_decoration() -> None:
    with pytest.raises(UsageError):

        @agent(model="fake", fallback=["nonsense-provider/model"])
        async def summarise(text: str) -> str:
            """Summarise: {{ text }}"""
