"""The deterministic fake model: the ``"fake"`` model string, and :class:`kagura.testing.FakeModel`.

It answers at once with an echo of the prompt or, when a JSON schema is asked for, with the
smallest value that fits it (:func:`example_for_schema`, which the fault-injecting HTTP server in
:mod:`kagura.testing.fault_server` uses too). Tests script its answers, errors and latency per call;
:mod:`kagura.testing` documents how. It lives with the providers, not the test helpers, because
production code resolves ``"fake"`` (benchmarks, examples) and must not import the test package.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .._usage import Usage
from ._base import Model, ModelRequest, ModelResponse, StreamChunk, ToolCall

__all__ = ["FakeModel", "Reply", "Script", "example_for_schema"]


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
    supports_tools: bool = True
    supports_streaming = True

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

    # The wait is in request and stream themselves, not in a coroutine they share: one frame
    # less per call in flight (a fan-out of 10,000 calls holds 10,000 of each).
    async def request(self, request: ModelRequest) -> ModelResponse:
        """The next scripted reply (by default an echo of the prompt), after its delay; a scripted
        error is raised."""
        scripted, delay = self._next(request)
        if delay:
            await asyncio.sleep(delay)
        reply = _given(scripted, request)
        for piece in reply.chunks:
            if isinstance(piece, BaseException):
                raise piece
        return self._response(request, reply)

    def _next(self, request: ModelRequest) -> tuple[Reply | BaseException | None, float]:
        """The next scripted reply or error (``None``: the default answer, made after the wait
        rather than kept through it), and the seconds to wait before giving it."""
        if self.record_requests:
            # Snapshot: the agent keeps appending to its message list after this call.
            self.requests.append(
                dataclasses.replace(
                    request,
                    messages=list(request.messages),
                    tools=list(request.tools),
                    extra=dict(request.extra),
                )
            )
        item: Script | None = self._script.popleft() if self._script else None
        if callable(item) and not isinstance(item, BaseException):
            item = item(request)
        if isinstance(item, BaseException):
            return item, self.delay
        reply = Reply(item) if isinstance(item, str) else item
        if reply is None:
            return None, self.delay
        return reply, reply.delay or self.delay

    def _response(self, request: ModelRequest, reply: Reply) -> ModelResponse:
        text = reply.text or "".join(p for p in reply.chunks if isinstance(p, str))
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in request.messages)
        usage = reply.usage or Usage(prompt_tokens, len(text.split()))
        return ModelResponse(text, reply.tool_calls, usage, self.id, reply.finish_reason)

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamChunk]:
        """The scripted reply as a stream: its ``chunks``, or its text a word at a time, then
        the whole answer. A scripted error (or one among the chunks) is raised where it is."""
        scripted, delay = self._next(request)
        if delay:
            await asyncio.sleep(delay)
        reply = _given(scripted, request)
        response = self._response(request, reply)
        for piece in reply.chunks or WORDS.findall(response.text):
            if isinstance(piece, BaseException):
                raise piece
            if piece:
                yield piece
        yield response


#: How a fake streams text: a word at a time, each with the spaces before it.
WORDS = re.compile(r"\s*\S+|\s+$")


def _given(scripted: Reply | BaseException | None, request: ModelRequest) -> Reply:
    """What a fake gives once its wait is over: a scripted error is raised, and no script is
    the default answer."""
    if isinstance(scripted, BaseException):
        raise scripted
    return scripted if scripted is not None else Reply(_default_answer(request))


def _default_answer(request: ModelRequest) -> str:
    prompt = str(request.messages[-1].get("content") or "") if request.messages else ""
    if request.output_schema is None:
        return prompt
    return json.dumps(example_for_schema(request.output_schema.schema, prompt))


#: The simplest valid string of each format pydantic's types give their schemas (``datetime``,
#: ``UUID``, ``EmailStr``, ``AnyUrl``, ...): echoed text would not validate.
_FORMATS = {
    "date-time": "2000-01-01T00:00:00Z",
    "date": "2000-01-01",
    "time": "00:00:00",
    "duration": "PT0S",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "email": "someone@example.com",
    "uri": "https://example.com/",
    "hostname": "example.com",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
}


def example_for_schema(schema: Mapping[str, Any], text: str = "", root: Any = None) -> Any:
    """The simplest value valid for a simple JSON schema (strings echo ``text``, shortened,
    unless their format asks for a date, a UUID, an address, ...).

    Of the options of an ``anyOf`` or ``oneOf`` the first that is not ``null`` is taken (so
    ``int | None`` gives 0 and ``int | str`` gives 0); of an ``allOf``, the first. Every property
    is filled and every list has an item, but for a model that holds its own kind (a tree's
    nodes): there, where the model comes round again, only what it requires is filled.
    """
    return _example(schema, text, schema if root is None else root, ())


def _example(schema: Mapping[str, Any], text: str, root: Any, refs: tuple[str, ...]) -> Any:
    """:func:`example_for_schema`, ``refs`` the definitions being filled in (outermost first)."""
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        if refs.count(name) > 1:  # it requires a value of its own kind: none is finite
            return None
        defs = root.get("$defs") or root.get("definitions") or {}
        return _example(defs.get(name, {}), text, root, (*refs, name))
    # Come round again: the least the schema allows, so that the value ends.
    least = len(set(refs)) < len(refs)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if options:
            non_null = [s for s in options if s.get("type") != "null"] or options
            if least and len(non_null) < len(options):
                return None
            return _example(non_null[0], text, root, refs)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties") or {}
        if least:
            required = set(schema.get("required") or ())
            props = {k: v for k, v in props.items() if k in required}
        return {k: _example(v, text, root, refs) for k, v in props.items()}
    if kind == "array":
        prefix = schema.get("prefixItems")
        if prefix:
            return [_example(s, text, root, refs) for s in prefix]
        count = int(schema.get("minItems", 0 if least else 1))
        if not least:
            count = max(1, count)
        if "maxItems" in schema:
            count = min(count, int(schema["maxItems"]))
        if not count:
            return []
        return [_example(schema.get("items") or {}, text, root, refs)] * count
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        value = 0 if low is None else low + (1 if "exclusiveMinimum" in schema else 0)
        return int(value) if kind == "integer" else value
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    if schema.get("format") in _FORMATS:
        return _FORMATS[schema["format"]]
    words = (text.strip() or "text")[: int(schema.get("maxLength", 80))]
    return words.ljust(int(schema.get("minLength", 0)), "x")
