"""OpenTelemetry export: the span tree, GenAI semantic-convention attributes, status and content."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from kagura import ProviderError, Usage, UsageError, agent, tool, workflow
from kagura._events import SpanFinished, SpanStarted
from kagura._instrument import sinks
from kagura.observability.otel import (
    OpenTelemetryExporter,
    instrument,
    split_model_id,
    uninstrument,
)
from kagura.providers import ModelRequest, ToolCall
from kagura.resilience import set_testing
from kagura.resilience._config import is_testing
from kagura.testing import FakeModel, Reply, capture_events

SECRET = "sk-abcdefghijklmnopqrstuvwx"


@tool
def lookup(city: str) -> str:
    """Look up the weather in a city.

    Args:
        city: The city.
    """
    return f"sunny in {city}"


class Otel:
    """A private tracer provider exporting to memory, with Kagura's exporter installed."""

    def __init__(self, capture_content: bool = False) -> None:
        self.memory = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.memory))
        self.exporter = instrument(self.provider, capture_content=capture_content)

    @property
    def spans(self) -> tuple[ReadableSpan, ...]:
        return self.memory.get_finished_spans()

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.named(name)
        assert len(found) == 1, [s.name for s in self.spans]
        return found[0]

    def close(self) -> None:
        uninstrument(self.exporter)
        self.provider.shutdown()


@pytest.fixture
def otel() -> Iterator[Otel]:
    setup = Otel()
    yield setup
    setup.close()


@pytest.fixture
def otel_content() -> Iterator[Otel]:
    setup = Otel(capture_content=True)
    yield setup
    setup.close()


@pytest.fixture
def no_waits() -> Iterator[None]:
    previous = is_testing()
    set_testing(True)
    yield
    set_testing(previous)


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def span_id(span: ReadableSpan | None) -> int:
    assert span is not None and span.context is not None
    return span.context.span_id


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def hanging_model() -> tuple[FakeModel, asyncio.Event]:
    """A model whose first answer takes 5 s, and an event set when that request arrives."""
    asked = asyncio.Event()

    def answer(_: ModelRequest) -> Reply:
        asked.set()
        return Reply("late", delay=5)

    return FakeModel([answer]), asked


def make_pipeline() -> tuple[Any, FakeModel, FakeModel]:
    """A workflow running two agents in parallel; the researcher calls a tool first."""
    writer_model = FakeModel([Reply("a poem", usage=Usage(7, 2))])
    researcher_model = FakeModel(
        [
            Reply(
                tool_calls=(ToolCall("call_1", "lookup", '{"city": "Kyoto"}'),),
                usage=Usage(20, 5),
            ),
            Reply("It is sunny.", usage=Usage(30, 4)),
        ]
    )

    @agent(model=writer_model)
    async def writer(topic: str) -> str:
        """Write a poem about {{ topic }}."""

    @agent(model=researcher_model, tools=[lookup])
    async def researcher(city: str, key: str) -> str:
        """What is the weather in {{ city }}? Key: {{ key }}"""

    @workflow
    async def pipeline(topic: str) -> list[str]:
        return list(await asyncio.gather(writer(topic), researcher(city="Kyoto", key=SECRET)))

    return pipeline, writer_model, researcher_model


# -- the span tree and the conventions ----------------------------------------------------------


async def test_workflow_exports_a_span_tree_with_gen_ai_names_and_attributes(otel: Otel) -> None:
    pipeline, _, _ = make_pipeline()
    with capture_events() as captured:
        assert await pipeline("autumn") == ["a poem", "It is sunny."]

    assert sorted(s.name for s in otel.spans) == sorted(
        [
            "workflow pipeline",
            "invoke_agent writer",
            "invoke_agent researcher",
            "chat echo",
            "chat echo",
            "chat echo",
            "execute_tool lookup",
        ]
    )
    root = otel.one("workflow pipeline")
    writer = otel.one("invoke_agent writer")
    researcher = otel.one("invoke_agent researcher")
    tool_span = otel.one("execute_tool lookup")
    chats = otel.named("chat echo")

    # One trace; parents as in Kagura's run tree.
    assert root.context is not None
    assert {s.context.trace_id for s in otel.spans if s.context} == {root.context.trace_id}
    assert root.parent is None
    assert parent_id(writer) == span_id(root)
    assert parent_id(researcher) == span_id(root)
    assert parent_id(tool_span) == span_id(researcher)
    writer_chats = [c for c in chats if parent_id(c) == span_id(writer)]
    researcher_chats = sorted(
        (c for c in chats if parent_id(c) == span_id(researcher)), key=lambda s: s.start_time or 0
    )
    assert len(writer_chats) == 1 and len(researcher_chats) == 2

    # Times are Kagura's own.
    started = {e.span_id: e for e in captured.started}
    finished = {e.span_id: e for e in captured.finished}
    for span in otel.spans:
        kagura_id = attrs(span)["kagura.span_id"]
        assert span.start_time == started[kagura_id].start_ns
        assert span.end_time == finished[kagura_id].end_ns

    run_id = attrs(root)["kagura.span_id"]
    for span in otel.spans:
        a = attrs(span)
        assert a["kagura.run_id"] == run_id
        assert a["kagura.status"] == "completed"
        assert span.status.status_code is StatusCode.UNSET
        assert "error.type" not in a

    assert attrs(root)["gen_ai.operation.name"] == "invoke_workflow"
    assert attrs(root)["gen_ai.workflow.name"] == "pipeline"
    assert attrs(root)["kagura.step_key"] == "pipeline"
    assert attrs(root)["kagura.kind"] == "workflow"
    assert root.kind is SpanKind.INTERNAL

    w = attrs(writer)
    assert w["gen_ai.operation.name"] == "invoke_agent"
    assert w["gen_ai.agent.name"] == "writer"
    assert w["gen_ai.provider.name"] == "fake"
    assert w["gen_ai.request.model"] == "echo"
    assert w["kagura.step_key"] == "pipeline/writer#0"
    assert w["kagura.answered_by"] == "fake/echo"
    assert (w["gen_ai.usage.input_tokens"], w["gen_ai.usage.output_tokens"]) == (7, 2)
    assert w["kagura.cost_usd"] == 0.0  # fakes are free
    r = attrs(researcher)
    assert (r["gen_ai.usage.input_tokens"], r["gen_ai.usage.output_tokens"]) == (50, 9)

    chat = attrs(writer_chats[0])
    assert writer_chats[0].kind is SpanKind.CLIENT
    assert chat["gen_ai.operation.name"] == "chat"
    assert chat["gen_ai.provider.name"] == "fake"
    assert chat["gen_ai.system"] == "fake"
    assert chat["gen_ai.request.model"] == "echo"
    assert chat["gen_ai.response.model"] == "echo"
    assert chat["gen_ai.response.finish_reasons"] == ("stop",)
    assert (chat["gen_ai.usage.input_tokens"], chat["gen_ai.usage.output_tokens"]) == (7, 2)
    assert chat["kagura.step_key"] == "pipeline/writer#0/fake/echo#0"
    first, second = (attrs(c) for c in researcher_chats)
    assert (first["gen_ai.usage.input_tokens"], first["gen_ai.usage.output_tokens"]) == (20, 5)
    assert (second["gen_ai.usage.input_tokens"], second["gen_ai.usage.output_tokens"]) == (30, 4)

    t = attrs(tool_span)
    assert t["gen_ai.operation.name"] == "execute_tool"
    assert t["gen_ai.tool.name"] == "lookup"
    assert t["gen_ai.tool.type"] == "function"
    assert tool_span.kind is SpanKind.INTERNAL

    # Content stays out unless asked for.
    for span in otel.spans:
        assert not {
            "gen_ai.input.messages",
            "gen_ai.output.messages",
            "gen_ai.tool.call.arguments",
            "gen_ai.tool.call.result",
            "kagura.inputs",
            "kagura.output",
        } & set(attrs(span))
    assert otel.exporter.open_spans == 0


def test_cost_is_exported_only_when_known(otel: Otel) -> None:
    for span_id_, cost in (("priced", 0.25), ("unpriced", None)):
        otel.exporter.handle(
            SpanFinished(
                span_id_,
                None,
                span_id_,
                "llm",
                "openai/gpt-4o-mini",
                span_id_,
                1,
                2,
                "completed",
                usage=Usage(1, 1),
                cost_usd=cost,
                attributes={"model": "openai/gpt-4o-mini", "response_model": "gpt-4o-mini-2024"},
            )
        )
    priced, unpriced = sorted(
        otel.named("chat gpt-4o-mini"), key=lambda s: attrs(s)["kagura.step_key"]
    )
    assert attrs(priced)["kagura.cost_usd"] == 0.25
    assert attrs(priced)["gen_ai.provider.name"] == "openai"
    assert attrs(priced)["gen_ai.response.model"] == "gpt-4o-mini-2024"
    assert "kagura.cost_usd" not in attrs(unpriced)


async def test_a_root_run_joins_the_current_otel_span(otel: Otel) -> None:
    @agent(model=FakeModel(["hi"]))
    async def greet() -> str:
        """Say hi."""

    tracer = otel.provider.get_tracer("app")
    with tracer.start_as_current_span("request") as request:
        await greet()
    agent_span = otel.one("invoke_agent greet")
    assert parent_id(agent_span) == request.get_span_context().span_id
    assert attrs(agent_span)["kagura.run_id"] == attrs(agent_span)["kagura.span_id"]


# -- status -------------------------------------------------------------------------------------


async def test_a_failing_agent_has_error_status_and_error_type(otel: Otel) -> None:
    fake = FakeModel([ProviderError("bad request", status_code=400)])

    @agent(model=fake, retry=False)
    async def broken() -> str:
        """Fail."""

    with pytest.raises(ProviderError):
        await broken()

    for name in ("chat echo", "invoke_agent broken"):
        span = otel.one(name)
        assert span.status.status_code is StatusCode.ERROR
        assert "HTTP 400: bad request" in (span.status.description or "")
        assert attrs(span)["error.type"] == "ProviderError"
        assert attrs(span)["kagura.status"] == "failed"
        exception = [e for e in span.events if e.name == "exception"]
        assert len(exception) == 1
        assert dict(exception[0].attributes or {})["exception.type"] == "ProviderError"
    chat = attrs(otel.one("chat echo"))
    assert "gen_ai.response.model" not in chat and "gen_ai.usage.input_tokens" not in chat


async def test_a_timed_out_attempt_is_an_error(otel: Otel) -> None:
    fake = FakeModel([Reply("late", delay=5)])

    @agent(model=fake, retry=False, timeout=0.01)
    async def slow() -> str:
        """Wait."""

    with pytest.raises(TimeoutError):
        await slow()
    chat = otel.one("chat echo")
    assert chat.status.status_code is StatusCode.ERROR
    assert attrs(chat)["error.type"] == "ProviderTimeout"
    assert attrs(chat)["kagura.status"] == "timed_out"
    assert otel.one("invoke_agent slow").status.status_code is StatusCode.ERROR


async def test_a_cancelled_call_is_not_an_error(otel: Otel) -> None:
    fake, asked = hanging_model()

    @agent(model=fake, retry=False)
    async def slow() -> str:
        """Wait."""

    task = asyncio.create_task(slow())
    await asked.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for name in ("chat echo", "invoke_agent slow"):
        span = otel.one(name)
        assert span.status.status_code is StatusCode.UNSET
        assert attrs(span)["kagura.status"] == "cancelled"
        assert "error.type" not in attrs(span)


async def test_retry_waits_are_span_events(otel: Otel, no_waits: None) -> None:
    fake = FakeModel([ProviderError("busy", status_code=503), "ok"])

    @agent(model=fake)
    async def flaky() -> str:
        """Try."""

    assert await flaky() == "ok"
    agent_span = otel.one("invoke_agent flaky")
    waits = [e for e in agent_span.events if e.name == "retry_wait"]
    assert len(waits) == 1
    wait = dict(waits[0].attributes or {})
    assert wait["attempt"] == 1
    assert "HTTP 503: busy" in wait["error"]
    assert isinstance(wait["wait"], float)
    assert "retry_after" not in wait  # None values are left out
    chats = sorted(otel.named("chat echo"), key=lambda s: s.start_time or 0)
    assert [c.status.status_code for c in chats] == [StatusCode.ERROR, StatusCode.UNSET]
    assert all(parent_id(c) == span_id(agent_span) for c in chats)
    assert agent_span.status.status_code is StatusCode.UNSET


# -- content ------------------------------------------------------------------------------------


async def test_content_is_captured_and_redacted_when_asked(otel_content: Otel) -> None:
    pipeline, _, _ = make_pipeline()
    await pipeline("autumn")

    researcher = otel_content.one("invoke_agent researcher")
    chats = sorted(
        (c for c in otel_content.named("chat echo") if parent_id(c) == span_id(researcher)),
        key=lambda s: s.start_time or 0,
    )
    first = json.loads(attrs(chats[0])["gen_ai.input.messages"])
    assert first[0]["role"] == "user"
    prompt = first[0]["parts"][0]["content"]
    assert prompt.startswith("What is the weather in Kyoto? Key: [REDACTED]")
    assert SECRET not in attrs(chats[0])["gen_ai.input.messages"]

    # The first attempt answered with the tool call alone: its output says so.
    assert json.loads(attrs(chats[0])["gen_ai.output.messages"]) == [
        {
            "role": "assistant",
            "parts": [
                {
                    "type": "tool_call",
                    "id": "call_1",
                    "name": "lookup",
                    "arguments": {"city": "Kyoto"},
                }
            ],
            "finish_reason": "stop",  # as the fake model says it
        }
    ]

    # The second attempt sees the tool call and its result, in the conventions' part types.
    second = json.loads(attrs(chats[1])["gen_ai.input.messages"])
    assert [m["role"] for m in second] == ["user", "assistant", "tool"]
    assert second[1]["parts"] == [
        {"type": "tool_call", "id": "call_1", "name": "lookup", "arguments": {"city": "Kyoto"}}
    ]
    assert second[2]["parts"] == [
        {"type": "tool_call_response", "id": "call_1", "response": "sunny in Kyoto"}
    ]
    output = json.loads(attrs(chats[1])["gen_ai.output.messages"])
    assert output == [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": "It is sunny."}],
            "finish_reason": "stop",
        }
    ]

    tool_span = attrs(otel_content.one("execute_tool lookup"))
    assert json.loads(tool_span["gen_ai.tool.call.arguments"]) == {"city": "Kyoto"}
    assert tool_span["gen_ai.tool.call.result"] == "sunny in Kyoto"

    agent_attrs = attrs(researcher)
    assert json.loads(agent_attrs["kagura.inputs"]) == {"city": "Kyoto", "key": "[REDACTED]"}
    assert json.loads(agent_attrs["kagura.output"]) == "It is sunny."
    root = attrs(otel_content.one("workflow pipeline"))
    assert json.loads(root["kagura.inputs"]) == {"topic": "autumn"}
    assert json.loads(root["kagura.output"]) == ["a poem", "It is sunny."]


async def test_failed_attempts_carry_no_output_content(otel_content: Otel) -> None:
    @agent(model=FakeModel([ProviderError("nope", status_code=400)]), retry=False)
    async def broken() -> str:
        """Fail."""

    with pytest.raises(ProviderError):
        await broken()
    chat = attrs(otel_content.one("chat echo"))
    assert "gen_ai.input.messages" in chat
    assert "gen_ai.output.messages" not in chat


# -- installing and removing --------------------------------------------------------------------


async def test_uninstrument_stops_export() -> None:
    setup = Otel()

    @agent(model=FakeModel(["one", "two"]))
    async def say() -> str:
        """Say."""

    await say()
    assert len(setup.spans) == 2
    assert setup.exporter in sinks()
    setup.close()
    assert setup.exporter not in sinks()
    await say()
    assert len(setup.spans) == 2


async def test_uninstrument_ends_spans_still_open() -> None:
    setup = Otel()
    fake, asked = hanging_model()

    @agent(model=fake, retry=False)
    async def slow() -> str:
        """Wait."""

    task = asyncio.create_task(slow())
    await asked.wait()
    assert setup.exporter.open_spans == 2
    uninstrument(setup.exporter)
    assert setup.exporter.open_spans == 0
    assert sorted(attrs(s)["kagura.status"] for s in setup.spans) == ["running", "running"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(setup.spans) == 2
    setup.provider.shutdown()


def test_a_span_finishing_after_install_is_exported_whole(otel: Otel) -> None:
    # Started before the exporter was installed: only its finish record arrives.
    otel.exporter.handle(
        SpanFinished(
            "w1",
            None,
            "w1",
            "workflow",
            "late",
            "late",
            100,
            200,
            "failed",
            error="boom",
            error_type="RuntimeError",
        )
    )
    span = otel.one("workflow late")
    assert (span.start_time, span.end_time) == (100, 200)
    assert span.status.status_code is StatusCode.ERROR
    assert attrs(span)["error.type"] == "RuntimeError"


def test_open_spans_are_bounded_and_bad_records_never_raise(otel: Otel) -> None:
    exporter = OpenTelemetryExporter(otel.provider, capture_content=True, max_open_spans=1)
    exporter.handle(SpanStarted("a", None, "a", "workflow", "a", "a", 1))
    exporter.handle(SpanStarted("b", "a", "a", "agent", "b", "a/b#0", 2))  # over the bound
    assert exporter.open_spans == 1

    class Unprintable:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    # Unserialisable content, an unknown span kind and events for unknown spans are all fine.
    exporter.handle(SpanStarted("c", None, "c", "step", "s", "s", 3, {"inputs": Unprintable()}))
    exporter.handle(SpanFinished("a", None, "a", "workflow", "a", "a", 1, 5, "completed"))
    exporter.handle(
        SpanStarted("d", None, "d", "llm", "weird", "d", 3, {"messages": [1, {"role": None}]})
    )
    exporter.handle(SpanFinished("d", None, "d", "llm", "weird", "d", 3, 4, "completed"))
    exporter.handle(SpanFinished("zzz", None, "zzz", "mystery", "m", "m", 3, 4, "completed"))
    assert {s.name for s in otel.spans} >= {"workflow a", "chat weird", "mystery m"}
    assert attrs(otel.one("chat weird"))["gen_ai.request.model"] == "weird"
    assert "gen_ai.provider.name" not in attrs(otel.one("chat weird"))
    exporter.close()


def test_model_ids_split_into_provider_and_model() -> None:
    assert split_model_id("openai/gpt-4o-mini") == ("openai", "gpt-4o-mini")
    assert split_model_id("openrouter/anthropic/claude-3.5-haiku") == (
        "openrouter",
        "anthropic/claude-3.5-haiku",
    )
    assert split_model_id("litellm/anthropic/claude-3-5-haiku") == ("anthropic", "claude-3-5-haiku")
    assert split_model_id("litellm/gemini/gemini-2.0-flash") == ("gcp.gemini", "gemini-2.0-flash")
    assert split_model_id("litellm/gpt-4o") == ("litellm", "gpt-4o")
    assert split_model_id("gpt-4o") == (None, "gpt-4o")


def test_missing_opentelemetry_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delitem(sys.modules, "kagura.observability.otel")
    with pytest.raises(UsageError, match=r"pip install 'kagura\[otel\]'") as raised:
        importlib.import_module("kagura.observability.otel")
    assert isinstance(raised.value, ImportError)
