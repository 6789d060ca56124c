"""``Agent.stream``: what it yields, what it records, when it retries, and how it ends.

On the fake model (streaming a reply a word at a time, or in the chunks a test gives it), so
every test is quick and deterministic: no test waits for time to pass. The same behaviour over
real HTTP is in ``tests/providers/test_streaming_http.py``.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pydantic_core
import pytest
from pydantic import BaseModel, ConfigDict, computed_field

from kagura import _streaming, agent, tool, workflow
from kagura._output import OutputSpec
from kagura.errors import (
    OutputParseError,
    ProviderConnectionError,
    ProviderError,
    StreamBrokenError,
    UsageError,
)
from kagura.providers import Model, ModelRequest, ModelResponse, ToolCall
from kagura.resilience import CircuitBreaker, CircuitOpenError, no_waits, reset_breakers
from kagura.testing import CapturedEvents, FakeModel, Reply, capture_events, override_model

from .conftest import JumpingClock

pytestmark = pytest.mark.timeout(30)


class Person(BaseModel):
    name: str
    age: int
    tags: list[str] = []


@agent
async def tell(topic: str) -> str:
    """Tell me about {{ topic }}."""


@agent
async def describe(text: str) -> Person:
    """Who is this? {{ text }}"""


@agent
async def count(text: str) -> int:
    """How many words: {{ text }}"""


PERSON = '{"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry"]}'


@pytest.fixture(autouse=True)
def _no_waits() -> Iterator[None]:
    """Retry waits are computed and recorded, not slept; no breaker outlives its test."""
    reset_breakers()
    with no_waits():
        yield
    reset_breakers()


async def collect(items: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in items]


def until(predicate: Callable[[], bool]) -> Callable[[], Any]:
    """Turns of the event loop until ``predicate()`` holds (bounded by turns, not by time)."""

    async def wait() -> None:
        for _ in range(1000):
            if predicate():
                return
            await asyncio.sleep(0)
        raise AssertionError("condition not reached after 1000 loop turns")

    return wait


# -- what a stream yields --------------------------------------------------------------------------


async def test_a_str_agent_yields_the_text_deltas_and_records_one_call() -> None:
    fake = FakeModel([Reply("Tea is a  drink.\n")])
    with override_model(fake), capture_events() as events:
        deltas = await collect(tell.stream("tea"))
    assert deltas == ["Tea", " is", " a", "  drink.", "\n"]

    (call,) = events.spans(kind="agent")
    (attempt,) = events.spans(kind="llm")
    assert (call.name, call.status, attempt.status) == ("tell", "completed", "completed")
    assert call.attributes["output"] == "Tea is a  drink."  # the result, as a call returns it
    assert attempt.parent_id == call.span_id
    assert attempt.attributes["output"] == "Tea is a  drink.\n"
    assert attempt.attributes["finish_reason"] == "stop"
    assert attempt.attributes["ttft_ms"] >= 0
    assert attempt.usage is not None and attempt.usage.completion_tokens == 4
    assert call.usage == attempt.usage
    (started,) = [e for e in events.started if e.kind == "agent"]
    assert started.attributes["stream"] is True
    assert len(fake.requests) == 1


async def test_a_typed_agent_yields_growing_partial_values_then_the_result() -> None:
    chunks = ('{"name": "Ada', " Lovelace", '", "age": 3', "6", ", ", '"tags": ["ma', 'th"', "]}")
    with override_model(FakeModel([Reply(chunks=chunks)])), capture_events() as events:
        items = await collect(describe.stream("Ada"))

    # No value until the required fields are there; the number shown only once it ended (never
    # the 3 of 36); a string as far as it has come; each item differs from the one before.
    assert items == [
        Person(name="Ada Lovelace", age=36),
        Person(name="Ada Lovelace", age=36, tags=["ma"]),
        Person(name="Ada Lovelace", age=36, tags=["math"]),
    ]
    assert all(isinstance(item, Person) for item in items)
    (call,) = events.spans(kind="agent")
    assert call.attributes["output"] == Person(name="Ada Lovelace", age=36, tags=["math"])


class Launch(BaseModel):
    model_config = ConfigDict(strict=True)
    when: datetime.date
    title: str


class Slot(BaseModel):
    at: datetime.datetime | str
    title: str


@agent
async def launch(text: str) -> Launch:
    """When? {{ text }}"""


@agent
async def slot(text: str) -> Slot:
    """When? {{ text }}"""


async def test_partial_values_of_a_strict_model_are_validated_as_json_as_the_result_is() -> None:
    # Strict, a date refuses its string in Python mode: no partial value was ever shown.
    chunks = ('{"when": "2024-05-01", "title": "Launch', ' party"}')
    with override_model(FakeModel([Reply(chunks=chunks)])):
        items = await collect(launch.stream("q"))
    day = datetime.date(2024, 5, 1)
    assert items == [Launch(when=day, title="Launch"), Launch(when=day, title="Launch party")]


async def test_a_partial_value_is_of_the_type_the_result_is() -> None:
    # In Python mode, a datetime | str was a str in the partial values, a datetime in the result.
    chunks = ('{"at": "2024-05-01T09:00:00", "title": "Stand', 'up"}')
    with override_model(FakeModel([Reply(chunks=chunks)])):
        items = await collect(slot.stream("q"))
    at = datetime.datetime(2024, 5, 1, 9)
    assert items == [Slot(at=at, title="Stand"), Slot(at=at, title="Standup")]


class Series(BaseModel):
    sensor: str
    values: list[float]


class Averaged(Series):
    @computed_field  # type: ignore[prop-decorator]
    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else float("nan")


@agent
async def series(text: str) -> Series:
    """Read {{ text }}"""


@agent
async def averaged(text: str) -> Averaged:
    """Read {{ text }}"""


async def test_a_partial_value_holding_nan_is_not_shown() -> None:
    # The result refuses it: shown, a NaN would be taken back only by the error that ends the
    # stream.
    items: list[Any] = []
    chunks = ('{"sensor": "t1", "values": [1.5, ', "NaN, ", "2.5]}")
    with (
        override_model(FakeModel([Reply(chunks=chunks)])),
        pytest.raises(OutputParseError, match=r"values\.1: Input should be a finite number"),
    ):
        async for item in series.stream("t1"):
            items.append(item)
    assert items == [Series(sensor="t1", values=[1.5])]


async def test_a_computed_fields_nan_is_not_the_answers() -> None:
    with override_model(FakeModel([Reply(chunks=('{"sensor": "t1", ', '"values": []}'))])):
        assert await collect(averaged.stream("t1")) == [Averaged(sensor="t1", values=[])]


async def test_brackets_and_braces_inside_strings_leave_the_answer_open() -> None:
    # Only the JSON's own closing bracket ends the answer: one inside a string does not, so the
    # name still grows as partial values; the result equals the last of them, and is not
    # repeated. Chatter after the JSON shows nothing more.
    chunks = ('{"age": 36, "name": "Ada ]', " Lovelace }", '"}', " Hope this helps!")
    with override_model(FakeModel([Reply(chunks=chunks)])):
        items = await collect(describe.stream("Ada"))
    assert items == [Person(name="Ada ]", age=36), Person(name="Ada ] Lovelace }", age=36)]


async def test_a_delta_that_adds_nothing_to_the_json_is_not_validated_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A key still without its value reads as the JSON before it: validating it again (most of
    # what a typed stream's delta costs) would only repeat the last outcome.
    validated: list[Any] = []
    validate_partial = OutputSpec.validate_partial

    def counted(self: OutputSpec, text: str) -> Any:
        validated.append(pydantic_core.from_json(text, allow_partial="trailing-strings"))
        return validate_partial(self, text)

    monkeypatch.setattr(OutputSpec, "validate_partial", counted)
    chunks = ('{"name": "Ada"', ', "age"', ": 36", ",", ' "tags"', ': ["x"', "]}")
    with override_model(FakeModel([Reply(chunks=chunks)])):
        items = await collect(describe.stream("Ada"))
    assert items == [Person(name="Ada", age=36), Person(name="Ada", age=36, tags=["x"])]
    assert validated == [
        {"name": "Ada"},  # not valid yet: no age
        {"name": "Ada", "age": 36},
        {"name": "Ada", "age": 36, "tags": ["x"]},
    ]


class Shelf(BaseModel):
    title: str
    people: list[Person]


@agent
async def shelve(text: str) -> Shelf:
    """Who is in this? {{ text }}"""


def shelf_of(people: int) -> Shelf:
    return Shelf(
        title="all",
        people=[Person(name=f"P {i}", age=i, tags=["a", "b"]) for i in range(people)],
    )


def a_word_a_chunk(value: BaseModel) -> tuple[str, ...]:
    """``value`` as JSON, a word a chunk, as a model writes it."""
    return tuple(re.findall(r"\S+\s*", json.dumps(value.model_dump())))


async def test_a_long_typed_answer_is_read_at_a_cost_that_grows_with_it_not_with_its_square(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A partial value is read from the whole JSON so far. Read at every delta, the characters
    # parsed for an answer of n characters in words would add up to about n * n / 14; past 256
    # characters they are read once the JSON has grown by an eighth, so the readings add up to
    # at most 8 n. No time passes here, so only growth decides.
    monkeypatch.setattr(_streaming, "_clock", lambda: 0.0)
    parsed: list[int] = []
    from_json = pydantic_core.from_json

    def counted(data: str, **options: Any) -> Any:
        parsed.append(len(data))
        return from_json(data, **options)

    monkeypatch.setattr(pydantic_core, "from_json", counted)
    shelf = shelf_of(300)
    chunks = a_word_a_chunk(shelf)
    size = len("".join(chunks))
    with override_model(FakeModel([Reply(chunks=chunks)])):
        items = await collect(shelve.stream("everyone"))

    assert sum(n for n in parsed if n > 256) <= 8 * size  # at every delta: 150 times that
    assert len(chunks) > 2_000 and len(parsed) < 100
    # What the reader is shown is as before, only sparser: growing values, each differing from
    # the one before, then the result.
    assert len(items) > 10
    assert all(isinstance(item, Shelf) for item in items)
    assert all(a != b for a, b in itertools.pairwise(items))
    counts = [len(item.people) for item in items]
    assert counts == sorted(counts)
    assert items[-1] == shelf


async def test_a_slow_typed_stream_shows_a_value_at_every_delta(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A stream whose deltas come more than a tenth of a second apart shows what reading at every
    # delta shows: a long answer is read seldom only where the reader could not tell.
    chunks = a_word_a_chunk(shelf_of(40))
    assert len("".join(chunks)) > 1_000

    monkeypatch.setattr(_streaming, "_SMALL", 10**9)  # every delta, as before
    with override_model(FakeModel([Reply(chunks=chunks)])):
        every_delta = await collect(shelve.stream("everyone"))
    monkeypatch.undo()

    ticks = itertools.count()
    monkeypatch.setattr(_streaming, "_clock", lambda: next(ticks) * 0.125)
    with override_model(FakeModel([Reply(chunks=chunks)])):
        slow = await collect(shelve.stream("everyone"))
    assert slow == every_delta
    assert len(slow) > 40


async def test_the_result_is_the_last_item_even_when_no_partial_value_matched_it() -> None:
    # The model wrapped an object in {"result": ...}: the partial values cannot read it, the
    # result (parsed as an awaited call's answer is) can.
    wrapped = '{"result": ' + PERSON + "}"
    with override_model(FakeModel([Reply(wrapped)])):
        items = await collect(describe.stream("Ada"))
    assert items[-1] == Person(name="Ada Lovelace", age=36, tags=["math", "poetry"])
    assert items.count(items[-1]) == 1


async def test_a_scalar_result_is_yielded_once() -> None:
    with override_model(FakeModel([Reply(chunks=('{"resu', 'lt": 4', "2}"))])):
        assert await collect(count.stream("some words")) == [42]


async def test_an_answer_that_does_not_validate_raises_and_is_not_asked_again() -> None:
    fake = FakeModel([Reply('{"name": "Ada"}')])
    with (
        override_model(fake),
        capture_events() as events,
        pytest.raises(OutputParseError) as caught,
    ):
        await collect(describe.stream("Ada"))
    assert caught.value.attempts == 1
    assert "age" in caught.value.validation_error
    assert len(fake.requests) == 1  # what was shown cannot be taken back: no re-ask
    assert [s.status for s in events.spans(kind="agent")] == ["failed"]


async def test_a_typed_answer_cut_off_by_max_tokens_is_never_the_result() -> None:
    @agent(max_tokens=12)
    async def short(text: str) -> Person:
        """Who is this? {{ text }}"""

    cut = Reply(chunks=('{"name": "Ada", "age": 36, "tags": ["ma',), finish_reason="length")
    with override_model(FakeModel([cut])):
        items: list[Any] = []
        with pytest.raises(OutputParseError, match=r"cut off by max_tokens=12") as caught:
            async for item in short.stream("Ada"):
                items.append(item)
    assert items == [Person(name="Ada", age=36, tags=["ma"])]  # partial values, no result
    assert "@agent(max_tokens=...)" in str(caught.value)

    # A text answer cut short is still the text that was streamed.
    with override_model(FakeModel([Reply("and then", finish_reason="length")])):
        assert await collect(tell.stream("tea")) == ["and", " then"]


async def test_models_that_cannot_stream_answer_in_one_chunk() -> None:
    class Plain(Model):
        provider = "plain"
        model_name = "once"

        async def request(self, request: ModelRequest) -> ModelResponse:
            return ModelResponse("all at once", finish_reason="stop")

    assert not Plain.supports_streaming

    @agent(model=Plain())
    async def ask(text: str) -> str:
        """{{ text }}"""

    assert await collect(ask.stream("x")) == ["all at once"]


# -- usage errors ----------------------------------------------------------------------------------


def test_stream_given_to_the_decorator_is_refused_with_a_pointer_to_stream() -> None:
    with pytest.raises(UsageError, match=r"stream= is not an agent setting.*\.stream\(") as caught:

        @agent(stream=True)
        async def chatty(text: str) -> str:
            """{{ text }}"""

    assert "chatty.stream(...)" in str(caught.value)


def test_the_arguments_are_checked_when_stream_is_called() -> None:
    with pytest.raises(TypeError, match="agent 'tell'"):
        tell.stream("tea", "too many")  # type: ignore[call-arg]


def test_tools_on_a_model_without_native_tool_calling_are_refused_at_stream() -> None:
    @tool
    def lookup(word: str) -> str:
        """Look a word up."""
        return word

    @agent(model=FakeModel(supports_tools=False), tools=[lookup])
    async def helper(text: str) -> str:
        """{{ text }}"""

    with pytest.raises(UsageError, match=r"offered through the prompt \(tool_mode='prompted'\)"):
        helper.stream("x")

    # The same when the agent chooses prompted tools on a model that has native ones.
    @agent(model=FakeModel(), tools=[lookup], tool_mode="prompted")
    async def chosen(text: str) -> str:
        """{{ text }}"""

    with pytest.raises(UsageError, match="tool_mode='prompted'"):
        chosen.stream("x")


# -- tools -----------------------------------------------------------------------------------------


async def test_tools_run_between_streamed_rounds() -> None:
    ran: list[int] = []

    @tool
    def square(n: int) -> int:
        """Square a number."""
        ran.append(n)
        return n * n

    @agent(tools=[square])
    async def calculator(question: str) -> str:
        """{{ question }}"""

    call = ToolCall("call_1", "square", json.dumps({"n": 7}))
    fake = FakeModel([Reply(tool_calls=(call,)), Reply("7 squared is 49")])
    with override_model(fake), capture_events() as events:
        deltas = await collect(calculator.stream("What is 7 squared?"))
    assert deltas == ["7", " squared", " is", " 49"]
    assert ran == [7]
    tool_message = fake.requests[1].messages[-1]
    assert tool_message == {"role": "tool", "tool_call_id": "call_1", "content": "49"}
    (call_span,) = events.spans(kind="agent")
    assert len(events.spans(kind="llm")) == 2
    assert [s.parent_id for s in events.spans(kind="tool")] == [call_span.span_id]


# -- retries and failures --------------------------------------------------------------------------


async def test_failures_before_the_first_item_are_retried() -> None:
    fake = FakeModel(
        [
            ProviderError("overloaded", status_code=503),
            Reply(chunks=(ProviderConnectionError("reset before any text"),)),
            Reply("third time lucky"),
        ]
    )
    with override_model(fake), capture_events() as events:
        deltas = await collect(tell.stream("luck"))
    assert deltas == ["third", " time", " lucky"]
    assert len(fake.requests) == 3
    assert [s.status for s in events.spans(kind="llm")] == ["failed", "failed", "completed"]
    assert len([e for e in events.span_events if e.name == "retry_wait"]) == 2
    (call,) = events.spans(kind="agent")
    assert call.status == "completed"


async def test_a_typed_stream_is_retried_until_it_has_shown_a_value() -> None:
    # Text arrived, but no value was shown yet: a new attempt repeats nothing the reader saw.
    broken = Reply(chunks=('{"name": "Ad', ProviderConnectionError("reset")))
    fake = FakeModel([broken, Reply(PERSON)])
    with override_model(fake):
        items = await collect(describe.stream("Ada"))
    assert items[-1] == Person(name="Ada Lovelace", age=36, tags=["math", "poetry"])
    assert len(fake.requests) == 2


async def test_a_failure_after_the_first_item_raises_and_is_never_retried() -> None:
    reset = ProviderConnectionError("connection reset", model="fake/echo")
    broken = Reply(chunks=("Once", " upon", reset))
    fake = FakeModel([broken, Reply("a second attempt would repeat the text")])
    with override_model(fake), capture_events() as events:
        deltas: list[str] = []
        with pytest.raises(StreamBrokenError) as caught:
            async for delta in tell.stream("a time"):
                deltas.append(delta)
    assert deltas == ["Once", " upon"]
    error = caught.value
    assert isinstance(error, ProviderError)
    assert isinstance(error.__cause__, ProviderConnectionError)
    assert "after 9 characters (2 items yielded)" in str(error)
    assert "connection reset" in str(error)
    assert error.text == "Once upon"
    assert error.model == "fake/echo"
    assert len(fake.requests) == 1
    assert [s.status for s in events.spans(kind="llm")] == ["failed"]
    assert [s.status for s in events.spans(kind="agent")] == ["failed"]
    assert not [e for e in events.span_events if e.name == "retry_wait"]


async def test_the_total_timeout_counts_the_readers_time_between_items(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The answer has arrived whole; the reader takes longer than the call may: the next item
    # is not given. The loop's clock is moved on instead of waiting.
    @agent(total_timeout=30)
    async def brief(topic: str) -> str:
        """{{ topic }}"""

    loop = asyncio.get_running_loop()
    later = loop.time() + 31
    fake = FakeModel([Reply(chunks=("One", " two", " three"))])
    with (
        override_model(fake),
        capture_events() as events,
        pytest.raises(StreamBrokenError) as caught,
    ):
        async for delta in brief.stream("count"):
            assert delta == "One"
            monkeypatch.setattr(loop, "time", lambda: later)
    assert caught.value.text == "One"
    assert "the total timeout of 30s ran out" in str(caught.value)
    (attempt,) = events.spans(kind="llm")
    assert (attempt.status, attempt.error_type, attempt.error) == (
        "timed_out",
        "TimeoutError",
        "cut short by the agent call's total_timeout",
    )
    assert attempt.attributes["output"] == "One"  # what the reader was shown


async def test_the_total_timeout_bounds_the_tool_rounds_of_a_stream(
    jumping_clock: JumpingClock,
) -> None:
    started = asyncio.Event()

    @tool
    async def lookup(key: str) -> str:
        """Look ``key`` up."""
        started.set()
        await asyncio.Event().wait()
        return key

    @agent(tools=[lookup], total_timeout=30)
    async def brief(topic: str) -> str:
        """{{ topic }}"""

    call = ToolCall("call_1", "lookup", json.dumps({"key": "k"}))
    fake = FakeModel([Reply(tool_calls=(call,)), Reply("never reached")])
    with override_model(fake), capture_events() as events:
        reading = asyncio.ensure_future(collect(brief.stream("x")))
        await started.wait()
        jumping_clock.jump(31)  # the deadline passes while the tool runs
        with pytest.raises(TimeoutError, match="no answer within the total timeout of 30s"):
            await reading
    assert len(fake.requests) == 1
    assert [s.status for s in events.spans(kind="tool")] == ["timed_out"]
    assert [s.status for s in events.spans(kind="agent")] == ["timed_out"]


async def test_an_outer_calls_total_timeout_cutting_a_stream_short_is_recorded_as_such(
    jumping_clock: JumpingClock,
) -> None:
    inner_model = FakeModel([Reply("too late", delay=3600)], name="inner")

    @agent(model=inner_model, total_timeout=3600, retry=False)
    async def inner(topic: str) -> str:
        """{{ topic }}"""

    @tool
    async def ask_inner(key: str) -> str:
        """Ask the inner agent about ``key``."""
        return "".join([delta async for delta in inner.stream(key)])

    call = ToolCall("call_1", "ask_inner", json.dumps({"key": "k"}))

    @agent(model=FakeModel([Reply(tool_calls=(call,))]), tools=[ask_inner], total_timeout=30)
    async def outer(topic: str) -> str:
        """{{ topic }}"""

    with capture_events() as events:
        task = asyncio.ensure_future(outer("x"))
        await until(lambda: len(inner_model.requests) == 1)()
        jumping_clock.jump(31)  # the outer call's deadline passes while the inner stream waits
        with pytest.raises(TimeoutError):
            await task
    (attempt,) = events.spans(kind="llm", name="fake/inner")
    assert (attempt.status, attempt.error) == (
        "timed_out",
        "cut short by the agent call's total_timeout",
    )


async def test_a_broken_stream_that_generated_text_costs_an_unknown_amount() -> None:
    class Priced(FakeModel):
        provider = "acme"  # no known price: not free

    broken = Reply(chunks=("Once", " upon", ProviderConnectionError("connection reset")))
    with (
        override_model(Priced([broken])),
        capture_events() as events,
        pytest.raises(StreamBrokenError),
    ):
        await collect(tell.stream("a time"))
    (attempt,) = events.spans(kind="llm")
    assert attempt.attributes["output"] == "Once upon"
    # Tokens were generated, how many is unknown: not a call that cost $0.
    (call,) = events.spans(kind="agent")
    assert call.cost_usd is None


async def test_a_fallback_model_answers_when_the_first_fails_before_any_item() -> None:
    down = FakeModel([ProviderError("down", status_code=503)] * 10, name="down")
    backup = FakeModel([Reply("from the backup")], name="backup")

    @agent(model=down, fallback=[backup], retry=False)
    async def ask(text: str) -> str:
        """{{ text }}"""

    with capture_events() as events:
        assert await collect(ask.stream("x")) == ["from", " the", " backup"]
    (fallback,) = [e for e in events.span_events if e.name == "fallback"]
    assert (fallback.attributes["failed"], fallback.attributes["next"]) == (
        "fake/down",
        "fake/backup",
    )
    (call,) = events.spans(kind="agent")
    assert call.attributes["answered_by"] == "fake/backup"


async def test_a_streamed_call_reports_the_models_that_failed_before_the_last() -> None:
    first = ProviderError("first down", status_code=500)
    primary = FakeModel([first], name="main")
    backup = FakeModel([ProviderError("backup down", status_code=503)], name="backup")

    @agent(model=primary, fallback=[backup], retry=False)
    async def summarise(text: str) -> str:
        """Summarise: {{ text }}"""

    with pytest.raises(ProviderError) as caught:
        await collect(summarise.stream("t"))
    assert caught.value.status_code == 503
    assert caught.value.__notes__ == [
        f"kagura: fallback model 'fake/main' failed first: ProviderError: {first}"
    ]
    assert caught.value.__context__ is first


async def test_the_breaker_learns_the_outcome_of_streams() -> None:
    breaker = CircuitBreaker("streams", failure_threshold=1, recovery_time=60)
    fake = FakeModel([ProviderError("down", status_code=503), Reply("unreached")])

    @agent(model=fake, breaker=breaker, retry=False)
    async def ask(text: str) -> str:
        """{{ text }}"""

    with pytest.raises(ProviderError):
        await collect(ask.stream("x"))
    assert breaker.state == "open"
    with pytest.raises(CircuitOpenError):
        await collect(ask.stream("x"))
    assert len(fake.requests) == 1


# -- leaving early and cancelling ------------------------------------------------------------------


class Watched(FakeModel):
    """A fake model whose streams say when they are closed, and can wait before their end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closed = 0
        self.release = asyncio.Event()

    async def stream(self, request: ModelRequest) -> AsyncIterator[str | ModelResponse]:
        try:
            async for chunk in super().stream(request):
                if isinstance(chunk, ModelResponse):
                    await self.release.wait()  # a stream that has not ended yet
                yield chunk
        finally:
            self.closed += 1


def statuses(events: CapturedEvents) -> tuple[list[str], list[str]]:
    return [s.status for s in events.spans(kind="agent")], [
        s.status for s in events.spans(kind="llm")
    ]


async def test_closing_a_stream_early_closes_the_model_stream_and_records_cancelled() -> None:
    fake = Watched([Reply("one two three four five")])
    with override_model(fake), capture_events() as events:
        async with tell.stream("numbers") as stream:
            assert await anext(stream) == "one"
            assert await anext(stream) == " two"
        assert fake.closed == 1
    assert statuses(events) == (["cancelled"], ["cancelled"])
    (call,) = events.spans(kind="agent")
    assert call.error == "the stream was closed by its reader after 2 items"
    (attempt,) = events.spans(kind="llm")
    assert attempt.error == "the stream was closed by its reader after 7 characters"
    assert attempt.attributes["ttft_ms"] >= 0


async def test_breaking_out_of_async_for_closes_the_stream() -> None:
    fake = Watched([Reply("one two three four five")])
    with override_model(fake), capture_events() as events:
        async for word in tell.stream("numbers"):
            assert word == "one"
            break
        # Nothing refers to the stream any more: the event loop closes it.
        await until(lambda: fake.closed == 1)()
        await until(lambda: bool(events.spans(kind="agent")))()
    assert statuses(events) == (["cancelled"], ["cancelled"])


async def test_cancelling_the_reading_task_closes_the_stream() -> None:
    fake = Watched([Reply("all of it")])
    seen: list[str] = []

    async def read() -> None:
        async for delta in tell.stream("it"):
            seen.append(delta)

    with override_model(fake), capture_events() as events:
        task = asyncio.create_task(read())
        await until(lambda: len(seen) == 3)()  # every delta read; the end is held back
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert fake.closed == 1
    assert statuses(events) == (["cancelled"], ["cancelled"])


async def test_a_reader_that_stops_at_the_result_leaves_a_completed_call() -> None:
    with override_model(FakeModel([Reply(PERSON)])), capture_events() as events:
        async with describe.stream("Ada") as stream:
            async for person in stream:
                if person.tags == ["math", "poetry"]:
                    break
    assert statuses(events) == (["completed"], ["completed"])


async def test_a_stream_in_a_workflow_joins_its_run() -> None:
    @workflow
    async def chat(topic: str) -> str:
        return "".join([delta async for delta in tell.stream(topic)])

    with override_model(FakeModel()), capture_events() as events:
        assert await chat("tea") == "Tell me about tea."
    (run,) = events.spans(kind="workflow")
    (call,) = events.spans(kind="agent")
    assert call.parent_id == run.span_id
    assert call.run_id == run.run_id
