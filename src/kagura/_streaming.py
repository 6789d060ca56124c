"""``Agent.stream``: an agent's answer as the model generates it.

A ``str`` agent yields the text deltas as they arrive. A typed agent yields its value while the
JSON grows: each partial value that validates (pydantic's partial validation: the fields so far,
a string still arriving as far as it has come) and differs from the one before, then the
result, validated as a call's answer is, unless it equals the last partial value: the last item
is always the result. Past its first 256 characters, the JSON is read for a partial value only
once it has grown by an eighth or a tenth of a second has passed (see :class:`_Reader`). An
answer is never re-asked, since what was shown cannot be taken back: an answer that does not
validate raises :class:`~kagura.errors.OutputParseError`, and so does a typed answer cut off by
``max_tokens``.

A stream is recorded as one ``agent`` span, with an ``llm`` span per attempt (time to first
chunk, and usage when the stream reports it). Attempts are retried, and fallback models tried,
only until the reader has been shown something (see :mod:`kagura.resilience._stream`); after
that a failure raises :class:`~kagura.errors.StreamBrokenError`. Closing the stream early, or
cancelling the task reading it, closes the provider's stream. In a durable run the result is
journaled before the stream ends, and a resumed run yields the journaled result as one item.

The generator never leaves a context variable set across a ``yield``: the code reading the
stream runs in its own context between items, and an abandoned stream is closed from another
task.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator, Awaitable, Mapping
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import pydantic_core

from . import _instrument
from ._context import Span, call_deadline, current_span
from ._instrument import span_finished, span_started, status_of
from ._llm import DeadlinePassed
from ._output import OutputSpec, OutputValidationError, cut_off
from ._prompt import PromptTemplate
from ._recording import ensure_recording
from .durable import _script
from .durable._run import current_durable_run, input_hash, read_back
from .errors import (
    OutputParseError,
    ProviderError,
    ProviderTimeout,
    RunError,
    StreamBrokenError,
    ToolLoopError,
    UsageError,
)
from .providers import Message, Model, ModelRequest, ModelResponse, ToolCall, ToolMode
from .resilience._fallback import record_fallback, tried_first
from .resilience._policies import Policies, effective
from .resilience._stream import GuardedStream, open_stream

T = TypeVar("T")

#: No item to show (yet).
_NOTHING: Any = object()
# A number at the end of partial JSON may still grow (the 3 of 36): it is not shown until it ends.
_NUMBER_END = frozenset("0123456789.-+eE")
# When a typed stream reads a partial value of its JSON (see _Reader): at every delta up to this
# many characters, then once the JSON has grown by an eighth, or this many seconds have passed.
_SMALL = 256
_EVERY = 0.1
_clock = time.monotonic  # a name of its own, for tests to stop or step time


class Streamed(Protocol):
    """What a streamed call needs of its agent (:class:`kagura.Agent` is one). Named here so
    that this module depends on the agent's seam, and only the agent module on this one."""

    @property
    def name(self) -> str: ...
    @property
    def output(self) -> OutputSpec: ...
    @property
    def prompt(self) -> PromptTemplate: ...
    @property
    def policies(self) -> Policies: ...
    @property
    def tools(self) -> Mapping[str, Any]: ...
    @property
    def tool_mode(self) -> ToolMode | None: ...
    @property
    def max_tool_rounds(self) -> int: ...

    def model_chain(self) -> list[Model]: ...

    def first_request(
        self, model: Model, prompt: str, prompted_tools: bool = False
    ) -> ModelRequest: ...

    async def tool_round(
        self, text: str, calls: list[ToolCall], span: Span, *, prompted: bool = False
    ) -> tuple[list[str], list[Message]]: ...


class AgentStream(Generic[T]):
    """What :meth:`kagura.Agent.stream` returns: an async iterator of the answer's items.

    Closing it stops the provider's generation. ``async with agent.stream(...) as stream:``
    closes it when the block ends; an ``async for`` left early closes it once the stream is
    garbage-collected (at once on CPython, unless something else still refers to it), and
    :meth:`aclose` closes it whenever you choose.
    """

    __slots__ = ("_items",)

    def __init__(self, items: AsyncGenerator[T, None]) -> None:
        self._items = items

    def __aiter__(self) -> AgentStream[T]:
        return self

    async def __anext__(self) -> T:
        return await self._items.__anext__()

    async def aclose(self) -> None:
        """Stop the stream: the provider's stream is closed and the call recorded as cancelled
        (nothing happens to a stream that is over)."""
        await self._items.aclose()

    async def __aenter__(self) -> AgentStream[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def open_agent_stream(agent: Streamed, arguments: dict[str, Any]) -> AgentStream[Any]:
    """The stream of ``agent`` for the bound ``arguments``. Usage errors raise here, at once;
    the call itself starts with the first item asked for."""
    chain = agent.model_chain()
    if agent.tools:
        for candidate in chain:
            if agent.tool_mode == "prompted" or (
                agent.tool_mode is None and not candidate.supports_tools
            ):
                raise UsageError(
                    f"agent {agent.name!r} has tools, and on {candidate.id} they are offered "
                    f"through the prompt (tool_mode='prompted'), whose answers are "
                    f"JSON to read rather than text to stream. Await the agent instead, or "
                    f"stream it on a model with tool calling"
                )
    return AgentStream(_items(agent, arguments, chain))


@dataclasses.dataclass(slots=True)
class _State:
    """What the handlers of an ending stream need: the stream being read, what was shown."""

    live: GuardedStream | None = None
    items: int = 0
    ended: bool = False


async def _items(
    agent: Streamed, arguments: dict[str, Any], chain: list[Model]
) -> AsyncGenerator[Any, None]:
    if _script.loads_in_progress:  # a workflow's module is being imported to resume a run
        _script.check_not_loading(f"agent {agent.name!r} was streamed")
    ensure_recording()
    policies = effective(agent.policies)
    span = Span("agent", agent.name, current_span.get())
    if _instrument.recording:
        span_started(span, {"model": chain[0].id, "inputs": arguments, "stream": True})
    state = _State()
    total = policies.call_timeout()
    try:
        try:
            durable = current_durable_run.get()
            digest = ""
            if durable is not None:
                digest = input_hash(arguments)
                record = durable.lookup(span.step_key, agent.name, "agent", digest, span.position)
                if record is not None:
                    value = read_back(span, "agent", agent.output.load, record.output)
                    state.ended = True
                    span_finished(span, "completed", attributes={"output": value, "replayed": True})
                    yield value
                    return
                durable.check_held()
            prompt = agent.prompt.render(arguments)
            deadline = None if total is None else time.monotonic() + total
            # What the models before failed with, for the error that ends the call.
            failed: list[tuple[str, Exception]] = []
            for position, model in enumerate(chain):
                if position == 1:
                    policies = policies.for_fallbacks()
                try:
                    model.check_ready()  # here, not earlier: a replayed call needs no credentials
                    request = agent.first_request(model, prompt)
                    rounds = 0
                    while True:
                        live, (reader, item, final) = await _open(
                            model, request, span, policies, agent.output, deadline
                        )
                        state.live = live
                        while final is None:
                            if item is not _NOTHING:
                                state.items += 1
                                yield item
                            try:
                                chunk = await live.next()
                            except ProviderError as exc:
                                raise StreamBrokenError(exc, live.text, state.items) from exc
                            except DeadlinePassed as exc:
                                # What was shown stays shown.
                                ran_out = ProviderTimeout(
                                    f"the total timeout of {total:g}s ran out", model=model.id
                                )
                                ran_out.__cause__ = exc
                                raise StreamBrokenError(
                                    ran_out, live.text, state.items
                                ) from ran_out
                            if isinstance(chunk, str):
                                item = reader.feed(chunk)
                            else:
                                final, item = chunk, _NOTHING
                        state.live = None
                        if not final.tool_calls:
                            break
                        rounds += 1
                        if rounds > agent.max_tool_rounds:
                            raise ToolLoopError(
                                f"agent {agent.name!r}: the model was still calling tools after "
                                f"{agent.max_tool_rounds} rounds (raise max_tool_rounds if that "
                                f"is expected)"
                            )
                        calls = list(final.tool_calls)
                        _, replies = await _by_deadline(
                            agent.tool_round(final.text, calls, span), deadline
                        )
                        request.messages.extend(replies)
                    result = _result(agent, model, request, final)
                except RunError as exc:
                    if state.items or position == len(chain) - 1:
                        tried_first(exc, failed, "model")
                        raise
                    record_fallback(span, model.id, chain[position + 1].id, exc)
                    failed.append((model.id, exc))
                    continue
                except Exception as exc:  # a fallback model not ready (no API key), say
                    tried_first(exc, failed, "model")
                    raise
                if durable is not None:
                    # Committed before the reader sees the result, or the end of the text.
                    await durable.record(
                        span.step_key,
                        agent.name,
                        "agent",
                        digest,
                        agent.output.dump(result, f"agent {agent.name!r}"),
                        span.position,
                    )
                # Over before the last item: a reader that stops at the result (and never asks
                # for the end of the stream) leaves a completed call.
                state.ended = True
                span_finished(
                    span,
                    "completed",
                    attributes={"output": result, "answered_by": model.id}
                    if _instrument.recording
                    else None,
                )
                if not agent.output.is_text and (state.items == 0 or result != reader.last):
                    yield result
                return
        except TimeoutError as exc:
            if str(exc) or total is None:
                raise
            raise TimeoutError(f"no answer within the total timeout of {total:g}s") from exc
    except GeneratorExit:
        # The reader closed the stream (aclose, or it was garbage-collected unfinished).
        stopped = asyncio.CancelledError(
            f"the stream was closed by its reader after {state.items} items"
        )
        await _stop(state, None)
        if not state.ended:
            span_finished(span, "cancelled", stopped)
        raise
    except BaseException as exc:
        await _stop(state, exc)
        if not state.ended:
            span_finished(span, status_of(exc), exc)
        raise


async def _open(
    model: Model,
    request: ModelRequest,
    span: Span,
    policies: Policies,
    output: OutputSpec,
    deadline: float | None,
) -> tuple[GuardedStream, tuple[_Reader, Any, ModelResponse | None]]:
    """Open a round's stream under the policies, up to its first item or its end, with the
    agent's span current (the policies record their retries and breaker changes on it)."""

    async def first(stream: GuardedStream) -> tuple[_Reader, Any, ModelResponse | None]:
        reader = _Reader(output)
        while True:
            chunk = await stream.next()
            if isinstance(chunk, ModelResponse):
                return reader, _NOTHING, chunk
            item = reader.feed(chunk)
            if item is not _NOTHING:
                return reader, item, None

    token = current_span.set(span)
    try:
        if deadline is None:
            return await open_stream(model, request, span, policies, first)
        # Set-up and retry waits included; each read after this stops at the deadline itself.
        return await _by_deadline(
            open_stream(model, request, span, policies, first, deadline=deadline), deadline
        )
    finally:
        current_span.reset(token)


async def _by_deadline(awaitable: Awaitable[T], deadline: float | None) -> T:
    """``awaitable``, cut short at the call's ``deadline`` (``time.monotonic()``; ``None``:
    none) by a bare ``TimeoutError``. Meanwhile the deadline is the call's (see
    :data:`~kagura._context.call_deadline`): a span it cuts short is recorded as timed out. Not
    held across a ``yield``: the reader's code runs in its own context between items."""
    if deadline is None:
        return await awaitable
    outer = call_deadline.get()  # an agent's call this one is part of (a tool's, say)
    token = call_deadline.set(deadline if outer is None else min(outer, deadline))
    try:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout_at(loop.time() + (deadline - time.monotonic())):
            return await awaitable
    finally:
        call_deadline.reset(token)


async def _stop(state: _State, reason: BaseException | None) -> None:
    """Close the stream being read, if any, when the call ends before it."""
    live, state.live = state.live, None
    if live is not None:
        await live.close(reason)


def _result(agent: Streamed, model: Model, request: ModelRequest, response: ModelResponse) -> Any:
    """The call's result from the whole answer, parsed as an awaited call's is."""
    output = agent.output
    if output.is_text:
        return output.parse(response.text)
    if response.finish_reason == "length":
        raise OutputParseError(agent.name, response.text, cut_off(request, model), 1)
    try:
        return output.parse(response.text)
    except OutputValidationError as exc:
        raise OutputParseError(agent.name, response.text, str(exc), 1) from None


class _Reader:
    """What the reader is shown of one round's answer, delta by delta: the delta itself for a
    ``str`` agent, a new partial value (or nothing) for a typed one.

    A partial value is read from the whole JSON so far, so reading one costs time in proportion
    to the answer's length; read at every delta, a whole answer would cost time in proportion to
    its square (seconds of CPU for tens of kilobytes). Up to ``_SMALL`` characters it
    is read at every delta. Past them, only once the JSON has grown by an eighth since the last
    reading, or ``_EVERY`` seconds have passed: the readings of a fast stream then add up to a
    few times the cost of the last one, whatever the length, and a slow stream still shows a
    value at every delta that comes a tenth of a second or more after the last reading.
    """

    __slots__ = (
        "_data",
        "_depth",
        "_end",
        "_escaped",
        "_in_string",
        "_length",
        "_output",
        "_parts",
        "_read_at",
        "_read_time",
        "_start",
        "last",
    )

    def __init__(self, output: OutputSpec) -> None:
        self._output = output
        self._parts: list[str] = []
        self._length = 0
        self._start = -1  # where the JSON starts (text before it is chatter)
        self._in_string = False
        self._escaped = False
        self._depth = 0  # of the JSON's objects and arrays, at the end of the text so far
        self._end = ""  # the text's last character other than white space
        self._read_at = 0  # the JSON's length at the last reading of a partial value
        self._read_time = 0.0  # and when (time.monotonic)
        self._data: Any = _NOTHING  # the partial JSON last validated
        #: The last partial value shown.
        self.last: Any = _NOTHING

    def feed(self, delta: str) -> Any:
        if self._output.is_text:
            return delta
        self._parts.append(delta)
        offset = 0
        if self._start < 0:
            found = [i for i in (delta.find("{"), delta.find("[")) if i >= 0]
            if not found:
                self._length += len(delta)
                return _NOTHING
            offset = min(found)
            self._start = self._length + offset
        self._length += len(delta)
        self._scan(delta, offset)
        if self._depth <= 0:
            # Its objects and arrays are closed: the answer is complete, and its value is the
            # result, once validated at the end. (Followed by chatter, or not JSON at all, it
            # does not parse as a partial value either.)
            return _NOTHING
        if not self._in_string and self._end in _NUMBER_END:
            return _NOTHING
        size = self._length - self._start
        now = _clock()
        if size > _SMALL and (size - self._read_at) * 8 < size and now - self._read_time < _EVERY:
            return _NOTHING
        self._read_at, self._read_time = size, now
        text = "".join(self._parts)
        self._parts = [text]  # the next reading joins this and the deltas after it
        answer = text[self._start :]
        try:
            data = pydantic_core.from_json(answer, allow_partial="trailing-strings")
        except ValueError:
            return _NOTHING
        if data == self._data:
            # The delta added nothing the value is made of (a key still without its value, a
            # comma, a closing quote): validating, most of what a delta costs, would give the
            # value already shown, or fail again.
            return _NOTHING
        self._data = data
        try:
            # The text, not data: validated as JSON, as the result will be.
            value = self._output.validate_partial(answer)
        except ValueError:  # OutputValidationError included
            return _NOTHING
        if self.last is not _NOTHING and value == self.last:
            return _NOTHING
        self.last = value
        return value

    def _scan(self, delta: str, offset: int) -> None:
        """Follow whether the JSON text ends inside a string (where digits are not a number),
        and how deep in its objects and arrays (zero: complete). Parsing the whole text at every
        delta to learn that took as long as reading the partial value from it."""
        in_string, escaped, depth = self._in_string, self._escaped, self._depth
        for char in delta[offset:]:
            if escaped:
                escaped = False
            elif in_string:
                if char == "\\":
                    escaped = True
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif char in "{[":
                depth += 1
            elif char in "}]":
                depth -= 1
        self._in_string, self._escaped, self._depth = in_string, escaped, depth
        end = delta.rstrip()
        if len(end) > offset:
            self._end = end[-1]
