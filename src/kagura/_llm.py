"""The one seam every LLM attempt passes through.

Each attempt gets its own ``llm`` span (model, tokens, cost, latency, status). Resilience policies
wrap calls to :func:`attempt`, so every retry is its own recorded attempt. A model not yet set up
(:meth:`kagura.providers.Model.prepare`) is set up first, outside the attempt's timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from . import _instrument
from ._context import Span
from ._events import Status
from ._instrument import CUT_SHORT, span_finished, span_started, status_of
from ._usage import NO_USAGE, Usage
from .errors import ProviderError, ProviderTimeout
from .providers import Model, ModelRequest, ModelResponse, StreamChunk


async def attempt(
    model: Model,
    request: ModelRequest,
    parent: Span,
    timeout: float | None = None,  # noqa: ASYNC109 - a per-attempt limit the caller configures
) -> ModelResponse:
    """Send one request to ``model`` and return its answer. The attempt's tokens and cost
    (``None`` when its price is unknown) go on its span and are added to ``parent``'s totals."""
    model_id = model.id
    span = Span("llm", model_id, parent)
    recording = _instrument.recording  # attributes are built only for someone to read them
    if recording:
        # The agent appends to its message list after this attempt: a sink that keeps record
        # objects gets a snapshot (span sinks take what they need at once).
        messages = request.messages if not _instrument.record_sinks else tuple(request.messages)
        span_started(span, {"model": model_id, "messages": messages})
    try:
        if not model.prepared:
            # Set-up (an SDK import, loading weights) is not the provider being slow: the
            # attempt's timeout starts once it is done. It stays in the attempt's span, as the
            # time the attempt took and, should it fail, as the attempt's error.
            await model.prepare()
        if timeout is None:
            response = await model.request(request)
        else:
            async with asyncio.timeout(timeout):
                response = await model.request(request)
    except TimeoutError as exc:
        error = exc
        if timeout is not None and not isinstance(exc, ProviderTimeout):
            # Our own per-attempt timeout expired (and cancelled the request).
            error = ProviderTimeout(f"no answer within {timeout:g}s", model=model_id)
        span_finished(span, "timed_out", error, attributes={"model": model_id})
        if error is exc:
            raise
        raise error from exc
    except BaseException as exc:
        span_finished(span, status_of(exc), exc, attributes={"model": model_id})
        raise
    result: dict[str, Any] | None = None
    if recording:
        # The model is among the start attributes; what the provider did not say is left out.
        result = {"output": response.text}
        if response.model:
            result["response_model"] = response.model
        if response.finish_reason is not None:
            result["finish_reason"] = response.finish_reason
        if response.tool_calls:
            result["tool_calls"] = tool_calls_of(response)
    usage, cost = usage_and_cost(model, response.usage)
    span_finished(span, "completed", usage=usage, cost_usd=cost, attributes=result)
    return response


def tool_calls_of(response: ModelResponse) -> list[dict[str, str]]:
    """The tool calls an answer asked for, as an attempt's span records them: what the model
    answered, when its text is empty (the next attempt's messages hold them too, but not what
    this attempt answered)."""
    return [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in response.tool_calls]


class DeadlinePassed(TimeoutError):
    """The whole call's deadline passed while its stream was read (a bare ``TimeoutError``,
    for the caller to word, and to tell from a provider's own)."""


class StreamedAttempt:
    """One streamed LLM attempt and its ``llm`` span: :meth:`start` it, read it chunk by chunk
    with :meth:`next` up to the final :class:`ModelResponse`, or end it early with :meth:`close`.

    The span records the time from sending the request to the first chunk (``ttft_ms``), and
    the tokens and cost when the stream reports its usage. ``timeout`` bounds every wait for a
    chunk, the first included (a stream that keeps producing may run longer); ``deadline``
    (``loop.time()``) is when the whole call must be over.
    """

    __slots__ = (
        "_chunks",
        "_first_ns",
        "_request",
        "_sent_ns",
        "deadline",
        "model",
        "span",
        "text",
        "timeout",
    )

    def __init__(
        self,
        model: Model,
        request: ModelRequest,
        parent: Span,
        *,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> None:
        self.model = model
        self.timeout = timeout
        self.deadline = deadline
        self.span = Span("llm", model.id, parent)
        #: The text deltas so far.
        self.text: list[str] = []
        self._chunks: AsyncIterator[StreamChunk] | None = None
        self._sent_ns = 0
        self._first_ns = 0
        if _instrument.recording:
            messages = request.messages if not _instrument.record_sinks else tuple(request.messages)
            span_started(self.span, {"model": model.id, "messages": messages, "stream": True})
        self._request = request

    async def start(self) -> None:
        """Set the model up if needed (before any timeout starts, as for :func:`attempt`), then
        send the request: the provider's stream begins with the first :meth:`next`."""
        try:
            if not self.model.prepared:
                await self.model.prepare()
        except BaseException as exc:
            self._end(status_of(exc), exc)
            raise
        self._sent_ns = time.perf_counter_ns()
        self._chunks = self.model.stream(self._request)

    async def next(self) -> StreamChunk:
        """The next text delta, or the final answer (then the attempt is over and its span
        closed). A failure closes the span and is raised; an expired ``timeout`` raises
        :class:`~kagura.errors.ProviderTimeout`, an expired ``deadline`` :class:`DeadlinePassed`
        for the caller to word."""
        chunks = self._chunks
        if chunks is None:
            raise RuntimeError("the streamed attempt is not started, or is over")
        when = self.deadline
        now = asyncio.get_running_loop().time()
        if when is not None and now >= when:
            # Passed while the reader had the last chunk: the timeout below would not fire on a
            # chunk that has arrived already (reading it does not wait).
            passed = DeadlinePassed()
            self._end("timed_out", passed)
            raise passed
        per_chunk = False
        if self.timeout is not None:
            limit = now + self.timeout
            if when is None or limit < when:
                when, per_chunk = limit, True
        scope = asyncio.timeout_at(when)
        try:
            async with scope:
                chunk = await anext(chunks)
        except StopAsyncIteration:
            ended = ProviderError("the stream ended without its final answer", model=self.model.id)
            self._end("failed", ended)
            raise ended from None
        except TimeoutError as exc:
            if not scope.expired():
                self._end("timed_out", exc)
                raise
            error: BaseException = DeadlinePassed()
            if per_chunk:
                which = "next" if self._first_ns else "first"
                error = ProviderTimeout(
                    f"no {which} chunk within {self.timeout:g}s", model=self.model.id
                )
            self._end("timed_out", error)
            raise error from exc
        except BaseException as exc:
            self._end(status_of(exc), exc)
            raise
        if not self._first_ns:
            self._first_ns = time.perf_counter_ns()
        if isinstance(chunk, str):
            self.text.append(chunk)
            return chunk
        await self._close_chunks()
        self._completed(chunk)
        return chunk

    async def close(self, reason: BaseException | None = None) -> None:
        """End the attempt before its stream did: the provider's stream is closed (a server then
        stops generating) and the span, if still open, ends as ``reason`` says (by default:
        cancelled, the reader having stopped)."""
        try:
            await self._close_chunks()
        finally:
            if self.span.status == "running":
                if reason is None:
                    reason = asyncio.CancelledError(
                        f"the stream was closed by its reader after {sum(map(len, self.text))} "
                        f"characters"
                    )
                self._end(status_of(reason), reason)

    async def _close_chunks(self) -> None:
        chunks, self._chunks = self._chunks, None
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()

    def _attributes(self) -> dict[str, Any]:
        found: dict[str, Any] = {"model": self.model.id}
        if self._first_ns:
            found["ttft_ms"] = (self._first_ns - self._sent_ns) / 1e6
        return found

    def _end(self, status: Status, error: BaseException) -> None:
        self._chunks = None
        if isinstance(error, DeadlinePassed):  # raised for the caller to word; recorded worded
            error = TimeoutError(CUT_SHORT)
        attributes = self._attributes()
        usage = cost = None
        if self.text:
            # Tokens were generated, and their number is unknown: an attempt of unknown price
            # (so a report says its spend is a floor), as the cost budgets count it, or free on
            # a free model. Not 0 tokens at $0, which reports would take as true.
            usage, cost = Usage(), (0.0 if is_free(self.model) else None)
            if _instrument.recording:
                attributes["output"] = "".join(self.text)  # what the reader was shown
        span_finished(self.span, status, error, usage=usage, cost_usd=cost, attributes=attributes)

    def _completed(self, response: ModelResponse) -> None:
        model = self.model
        result: dict[str, Any] | None = None
        if _instrument.recording:
            result = self._attributes()
            del result["model"]  # among the start attributes
            result["output"] = response.text
            if response.model:
                result["response_model"] = response.model
            if response.finish_reason is not None:
                result["finish_reason"] = response.finish_reason
            if response.tool_calls:
                result["tool_calls"] = tool_calls_of(response)
        usage, cost = usage_and_cost(model, response.usage)
        span_finished(self.span, "completed", usage=usage, cost_usd=cost, attributes=result)


_ONE_TOKEN_EACH = Usage(1, 1)


def is_free(model: Model) -> bool:
    """Whether every call to ``model`` costs nothing (the local model, the fake one)."""
    return model.cost(_ONE_TOKEN_EACH) == 0.0


def usage_and_cost(model: Model, usage: Usage) -> tuple[Usage | None, float | None]:
    """What an answer used and cost: both unknown (``None``) when the provider reported no
    usage (llama.cpp's server streams none; some servers send none at all), unless the model is
    free. Never 0 tokens at $0 for a priced model: budgets and reports would take it as true."""
    if usage is NO_USAGE:
        return None, (0.0 if is_free(model) else None)
    return usage, model.cost(usage)
