"""Test doubles for Kagura programs: a scriptable fake model, a model override and an event capture.

The model string ``"fake"`` resolves to a :class:`FakeModel` that answers at once with a
deterministic echo of the prompt (or, when a JSON schema is asked for, with the smallest value that
fits it). In tests, script its answers, errors and latency per call::

    fake = FakeModel(["positive", ProviderError("boom", status_code=503), Reply("ok", delay=0.2)])
    with override_model(fake):
        await my_workflow("text")
    assert len(fake.requests) == 3

It streams too (``agent.stream(...)``): a reply's text a word at a time, or the ``chunks`` it is
given, among which an exception breaks the stream at that point::

    FakeModel([Reply(chunks=("Hello", ", wor", ProviderConnectionError("reset")))])
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .._events import Event, SpanEvent, SpanFinished, SpanStarted
from .._instrument import add_sink, remove_sink
from .._usage import Usage
from ..providers import (
    Model,
    ModelRequest,
    ModelResponse,
    StreamChunk,
    ToolCall,
    model_override_var,
)

__all__ = [
    "CapturedEvents",
    "FakeModel",
    "Reply",
    "capture_events",
    "override_model",
    "replay",
]


async def replay(run_id: str, workflow: Any = None, *, db: str | None = None) -> Any:
    """Run durable run ``run_id`` again against its journal alone, with no provider at all: a
    check that a changed workflow still follows yesterday's real traffic. Returns its result;
    a step the journal lacks (or that changed) raises :class:`kagura.NonDeterminismError`.
    ``workflow`` defaults to the one the run recorded; pass the new version to check it."""
    from ..durable._execute import replay as _replay

    return await _replay(run_id, workflow, db=db)


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted answer: text and/or tool calls, after an optional delay (seconds)."""

    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    delay: float = 0.0
    usage: Usage | None = None
    #: How a stream delivers it (by default the text a word at a time): the text is these
    #: pieces joined, and an exception among them is raised when the stream reaches it (an
    #: awaited call raises it instead of answering).
    chunks: tuple[str | BaseException, ...] = ()
    finish_reason: str = "stop"


Script = str | Reply | BaseException | Callable[[ModelRequest], "str | Reply"]


class FakeModel(Model):
    """A model that answers from a script, then by echoing the prompt. Records every request."""

    provider = "fake"
    supports_output_schema = True
    supports_tools = True

    def __init__(
        self,
        responses: Iterable[Script] = (),
        *,
        name: str = "echo",
        delay: float = 0.0,
        supports_tools: bool = True,
        record_requests: bool = True,
    ) -> None:
        self.model_name = name
        self.record_requests = record_requests
        self.delay = delay
        self.supports_tools = supports_tools
        self._script: deque[Script] = deque(responses)
        self.requests: list[ModelRequest] = []

    def add(self, *responses: Script) -> None:
        """Queue more scripted answers."""
        self._script.extend(responses)

    async def request(self, request: ModelRequest) -> ModelResponse:
        reply = await self._reply(request)
        for piece in reply.chunks:
            if isinstance(piece, BaseException):
                raise piece
        return self._response(request, reply)

    async def _reply(self, request: ModelRequest) -> Reply:
        """The next scripted reply (after its delay), or raise the next scripted error."""
        if self.record_requests:
            # Snapshot: the agent keeps appending to its message list after this call.
            self.requests.append(
                ModelRequest(
                    list(request.messages),
                    request.temperature,
                    request.max_tokens,
                    request.output_schema,
                    list(request.tools),
                    dict(request.extra),
                    request.output_mode,
                )
            )
        item: Script | None = self._script.popleft() if self._script else None
        if callable(item) and not isinstance(item, BaseException):
            item = item(request)
        if isinstance(item, BaseException):
            if self.delay:
                await asyncio.sleep(self.delay)
            raise item
        reply = Reply(item) if isinstance(item, str) else item
        delay = reply.delay if reply is not None and reply.delay else self.delay
        if delay:
            await asyncio.sleep(delay)
        if reply is None:
            reply = Reply(_default_answer(request))
        return reply

    def _response(self, request: ModelRequest, reply: Reply) -> ModelResponse:
        text = reply.text or "".join(p for p in reply.chunks if isinstance(p, str))
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in request.messages)
        usage = reply.usage or Usage(prompt_tokens, len(text.split()))
        return ModelResponse(text, reply.tool_calls, usage, self.id, reply.finish_reason)

    supports_streaming = True

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamChunk]:
        """The scripted reply as a stream: its ``chunks``, or its text a word at a time, then
        the whole answer. A scripted error (or one among the chunks) is raised where it is."""
        reply = await self._reply(request)
        response = self._response(request, reply)
        for piece in reply.chunks or _WORDS.findall(response.text):
            if isinstance(piece, BaseException):
                raise piece
            if piece:
                yield piece
        yield response


_WORDS = re.compile(r"\s*\S+|\s+$")


def _default_answer(request: ModelRequest) -> str:
    prompt = str(request.messages[-1].get("content") or "") if request.messages else ""
    if request.output_schema is None:
        return prompt
    value = _example(request.output_schema.schema, request.output_schema.schema, prompt)
    return json.dumps(value)


def _example(schema: dict[str, Any], root: dict[str, Any], text: str) -> Any:
    """The simplest value that satisfies ``schema`` (strings echo the prompt)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return _example(root.get("$defs", {}).get(name, {}), root, text)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = [s for s in schema[key] if s.get("type") != "null"] or schema[key]
            return _example(options[-1] if key == "anyOf" else options[0], root, text)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: _example(v, root, text) for k, v in props.items()}
    if kind == "array":
        items = schema.get("prefixItems")
        if items:
            return [_example(s, root, text) for s in items]
        return [_example(schema.get("items", {}), root, text)] * max(1, schema.get("minItems", 1))
    if kind == "string":
        return text[: min(80, schema.get("maxLength", 80))]
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return text[:80]


@contextmanager
def override_model(model: Model) -> Iterator[Model]:
    """Make every agent call in this context (and tasks it starts) use ``model``."""
    token = model_override_var.set(model)
    try:
        yield model
    finally:
        model_override_var.reset(token)


@dataclass
class CapturedEvents:
    """Every instrumentation record emitted inside :func:`capture_events`, in order."""

    events: list[Event] = field(default_factory=list)

    def handle(self, event: Event) -> None:
        self.events.append(event)

    @property
    def finished(self) -> list[SpanFinished]:
        return [e for e in self.events if isinstance(e, SpanFinished)]

    @property
    def started(self) -> list[SpanStarted]:
        return [e for e in self.events if isinstance(e, SpanStarted)]

    @property
    def span_events(self) -> list[SpanEvent]:
        return [e for e in self.events if isinstance(e, SpanEvent)]

    def spans(self, kind: str | None = None, name: str | None = None) -> list[SpanFinished]:
        return [
            e
            for e in self.finished
            if (kind is None or e.kind == kind) and (name is None or e.name == name)
        ]


@contextmanager
def capture_events() -> Iterator[CapturedEvents]:
    """Collect the spans and events Kagura emits while the block runs."""
    sink = CapturedEvents()
    add_sink(sink)
    try:
        yield sink
    finally:
        remove_sink(sink)
