"""``kagura.testing``: the scriptable fake model, the model override and event capture."""

from __future__ import annotations

import asyncio
import datetime
import subprocess
import sys
import uuid
from typing import Any

import pytest
from pydantic import AnyUrl, BaseModel

from kagura import OutputParseError, ProviderError, Usage, agent
from kagura.providers import ModelRequest, ToolCall
from kagura.providers.fake import example_for_schema
from kagura.testing import FakeModel, Reply, capture_events, override_model


@agent
async def ask(question: str) -> str:
    """Q: {{ question }}"""


@agent
async def count(question: str) -> int:
    """Count: {{ question }}"""


async def test_echoes_the_prompt_by_default() -> None:
    with override_model(FakeModel()):
        assert await ask("hello") == "Q: hello"
        assert await ask("again") == "Q: again"


async def test_default_answer_fits_the_requested_schema() -> None:
    with override_model(FakeModel()):
        assert await count("sheep") == 0


async def test_scripted_strings_then_echo() -> None:
    fake = FakeModel(["first", "second"])
    with override_model(fake):
        assert [await ask("a"), await ask("b"), await ask("c")] == ["first", "second", "Q: c"]
    fake.add("queued later")
    with override_model(fake):
        assert await ask("d") == "queued later"


async def test_scripted_exceptions_are_raised_in_order() -> None:
    fake = FakeModel([ProviderError("bad request", status_code=400), "recovered"])
    with override_model(fake):
        with pytest.raises(ProviderError) as info:
            await ask("a")
        assert info.value.status_code == 400
        assert await ask("b") == "recovered"
    assert len(fake.requests) == 2


async def test_callables_answer_from_the_request() -> None:
    def answer(request: ModelRequest) -> str:
        return request.messages[-1]["content"].upper()

    def reply(request: ModelRequest) -> Reply:
        return Reply("via reply", usage=Usage(1, 2))

    fake = FakeModel([answer, reply])
    with override_model(fake), capture_events() as events:
        assert await ask("shout") == "Q: SHOUT"
        assert await ask("x") == "via reply"
    assert events.spans(kind="llm")[1].usage == Usage(1, 2)


async def test_reply_with_tool_calls() -> None:
    call = ToolCall("c1", "lookup", "{}")
    fake = FakeModel([Reply("thinking", tool_calls=(call,))])
    response = await fake.request(ModelRequest([{"role": "user", "content": "hi"}]))
    assert response.text == "thinking"
    assert response.tool_calls == (call,)
    assert response.model == "fake/echo"


async def test_reply_delay_is_honoured() -> None:
    fake = FakeModel([Reply("late", delay=0.01)])
    with override_model(fake):
        assert await ask("a") == "late"


async def test_reply_delay_suspends_only_that_call() -> None:
    requested = asyncio.Event()

    def slow(_request: ModelRequest) -> Reply:
        requested.set()
        return Reply("slow", delay=3600)

    fake = FakeModel([slow, "fast"])
    with override_model(fake):
        pending = asyncio.create_task(ask("a"))
        await requested.wait()
        assert await ask("b") == "fast"
        assert not pending.done()
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending


async def test_a_delayed_reply_can_be_cancelled() -> None:
    fake = FakeModel([Reply("never", delay=3600)])
    with override_model(fake), pytest.raises(TimeoutError):
        await asyncio.wait_for(ask("a"), timeout=0.01)


async def test_records_requests_as_snapshots() -> None:
    fake = FakeModel(["not a number", "3"])

    @agent(model=fake, temperature=0.5)
    async def retrying(q: str) -> int:
        """{{ q }}"""

    assert await retrying("q") == 3
    first, second = fake.requests
    assert len(first.messages) == 1  # not mutated by the re-ask that followed
    assert len(second.messages) == 3
    assert first.temperature == 0.5


def test_usage_counts_words_unless_given() -> None:
    async def go() -> None:
        fake = FakeModel(["three word answer", Reply("x", usage=Usage(7, 8))])
        request = ModelRequest([{"role": "user", "content": "four words of prompt"}])
        assert (await fake.request(request)).usage == Usage(4, 3)
        assert (await fake.request(request)).usage == Usage(7, 8)

    asyncio.run(go())


async def test_record_requests_can_be_turned_off() -> None:
    fake = FakeModel(record_requests=False)
    await fake.request(ModelRequest([{"role": "user", "content": "hi"}]))
    assert fake.requests == []


async def test_override_is_scoped_to_the_block() -> None:
    inner = FakeModel(["inner"])

    @agent(model=FakeModel(["own"]))
    async def pick(q: str) -> str:
        """{{ q }}"""

    with override_model(inner) as model:
        assert model is inner
        assert await pick("q") == "inner"
    assert await pick("q") == "own"


async def test_capture_events_stops_at_the_end_of_the_block() -> None:
    with override_model(FakeModel()):
        with capture_events() as events:
            await ask("a")
        await ask("b")
    assert [e.kind for e in events.started] == ["agent", "llm"]
    assert [e.kind for e in events.finished] == ["llm", "agent"]
    assert events.spans(name="ask")[0].kind == "agent"


def test_one_schema_example_generator_serves_the_fake_and_the_fault_server() -> None:
    from kagura.testing import fault_server

    assert fault_server.example_for_schema is example_for_schema


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        # anyOf and oneOf: the first option that is not null, whatever the order.
        ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, 0),
        ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, "text"),
        ({"anyOf": [{"type": "null"}, {"type": "boolean"}]}, True),
        ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, 0),
        ({"anyOf": [{"type": "null"}]}, None),
        ({"oneOf": [{"type": "null"}, {"type": "string", "maxLength": 2}]}, "te"),
        ({"allOf": [{"type": "integer", "minimum": 2}]}, 2),
    ],
)
def test_schema_examples_take_the_first_non_null_option(schema: Any, expected: Any) -> None:
    assert example_for_schema(schema) == expected


class Node(BaseModel):
    name: str
    children: list[Node] = []


class Whole(BaseModel):
    parts: list[Part]


class Part(BaseModel):
    name: str
    whole: Whole | None = None


class Chain(BaseModel):
    next: Chain  # no finite value has this shape


def answering(kind: Any) -> Any:
    async def make(q: str) -> Any:
        """{{ q }}"""

    make.__annotations__["return"] = kind
    return agent(make)


async def test_the_fake_answers_models_that_hold_their_own_kind() -> None:
    # Where the model comes round again, only what it requires is filled: the value ends.
    with override_model(FakeModel()):
        tree = await answering(Node)("oak")
        assert tree.children == [Node(name=tree.name)]
        (first,) = await answering(list[Node])("oaks")
        assert first.children == [Node(name=first.name)]
        whole = await answering(Whole)("car")
        assert whole.parts == [Part(name=whole.parts[0].name, whole=Whole(parts=[]))]
        with pytest.raises(OutputParseError):
            await answering(Chain)("links")


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (datetime.datetime, datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)),
        (datetime.date, datetime.date(2000, 1, 1)),
        (datetime.time, datetime.time(0, 0)),
        (datetime.timedelta, datetime.timedelta(0)),
        (uuid.UUID, uuid.UUID("00000000-0000-4000-8000-000000000000")),
        (AnyUrl, AnyUrl("https://example.com/")),
        (tuple[()], ()),
    ],
)
async def test_the_fake_answers_strings_of_a_format_and_empty_tuples(
    kind: Any, expected: Any
) -> None:
    with override_model(FakeModel()):
        assert await answering(kind)("when") == expected


async def test_the_fake_answers_a_union_with_its_first_option() -> None:
    @agent
    async def pick(q: str) -> int | str:
        """{{ q }}"""

    with override_model(FakeModel()):
        assert await pick("q") == 0


def test_production_code_never_imports_the_test_package() -> None:
    """The "fake" model string resolves to the fake model without importing kagura.testing."""
    code = (
        "import sys, kagura, kagura.durable\n"
        "from kagura.providers import resolve_model\n"
        "assert type(resolve_model('fake')).__name__ == 'FakeModel'\n"
        "print(sorted(m for m in sys.modules if m.startswith('kagura.testing')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "[]"
