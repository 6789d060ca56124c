"""Reading a streamed chat completion in the OpenAI chunk format (the ``openai`` SDK's and
LiteLLM's streams): text deltas out as they come, everything else gathered into the final answer.

Tool calls arrive in pieces, keyed by their index: the id and name once, the JSON arguments a
fragment at a time. Usage comes last, in a chunk of its own with no choices, and only from servers
that honour ``stream_options.include_usage``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from .._usage import NO_USAGE, Usage
from ..errors import ProviderConnectionError, ProviderError
from ._base import ModelResponse, StreamChunk, ToolCall


@dataclass(slots=True)
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ChunkReader:
    """Feed it the stream's chunks with :meth:`add`; :meth:`response` is the whole answer."""

    __slots__ = ("_calls", "_model", "_parts", "finish_reason", "model_id", "usage")

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self._parts: list[str] = []
        self._calls: dict[int, _PartialCall] = {}
        self._model = ""
        self.finish_reason: str | None = None
        self.usage: Usage = NO_USAGE

    def add(self, chunk: Any) -> str:
        """Take one chunk in; return its text delta (``""`` when it carries none)."""
        try:
            if chunk.model and not self._model:
                self._model = chunk.model
            usage = getattr(chunk, "usage", None)
            if usage is not None:
                self.usage = Usage(usage.prompt_tokens or 0, usage.completion_tokens or 0)
            if not chunk.choices:
                return ""
            choice = chunk.choices[0]
            if choice.finish_reason is not None:
                self.finish_reason = choice.finish_reason
            delta = choice.delta
            if delta is None:
                return ""
            for piece in getattr(delta, "tool_calls", None) or ():
                call = self._calls.setdefault(piece.index or 0, _PartialCall())
                if piece.id:
                    call.id = piece.id
                function = piece.function
                if function is not None:
                    if function.name:
                        call.name = function.name
                    if function.arguments:
                        call.arguments.append(function.arguments)
            text = delta.content or ""
        except (AttributeError, IndexError, TypeError) as exc:
            raise ProviderError(
                f"malformed stream chunk: {exc}", model=self.model_id, body=repr(chunk)[:2000]
            ) from exc
        if text:
            self._parts.append(text)
        return text

    def response(self) -> ModelResponse:
        """The whole answer, once the stream has ended. A stream that ended without saying why
        (no finish reason: the connection closed early, or the server stopped before ``[DONE]``)
        raises :class:`~kagura.errors.ProviderConnectionError`: its answer may be cut short."""
        text = "".join(self._parts)
        if self.finish_reason is None:
            raise ProviderConnectionError(
                f"the stream ended without a finish reason after {len(text)} characters "
                f"(cut off before the end of the answer)",
                model=self.model_id,
            )
        calls = tuple(
            ToolCall(call.id or f"call_{index}", call.name, "".join(call.arguments) or "{}")
            for index, call in sorted(self._calls.items())
        )
        return ModelResponse(
            text, calls, self.usage, self._model or self.model_id, self.finish_reason
        )


async def read_chunks(
    open_stream: Callable[[], Awaitable[Any]],
    model_id: str,
    errors_mapped: Callable[[], AbstractContextManager[None]],
) -> AsyncIterator[StreamChunk]:
    """A :meth:`~kagura.providers.Model.stream` over an SDK's chunk stream: ``open_stream()``
    sends the request and returns the stream; every SDK call is made under ``errors_mapped()``.

    The SDK's stream is closed however this ends (finished, failed, closed early, cancelled):
    closing the HTTP response is what tells the server to stop generating.
    """
    with errors_mapped():
        chunks = await open_stream()
    reader = ChunkReader(model_id)
    try:
        while True:
            with errors_mapped():
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
            delta = reader.add(chunk)
            if delta:
                yield delta
    finally:
        close = getattr(chunks, "aclose", None) or chunks.close  # LiteLLM's, the openai SDK's
        await close()
    yield reader.response()
