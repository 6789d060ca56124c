"""Reading a streamed chat completion in the OpenAI chunk format (the JSON objects an
OpenAI-compatible server streams, and LiteLLM's chunks as such): text deltas out as they come,
everything else gathered into the final answer.

Tool calls arrive in pieces, keyed by their index: the id and name once, the JSON arguments a
fragment at a time. Usage comes last, in a chunk of its own with no choices, and only from servers
that honour ``stream_options.include_usage``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
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

    def add(self, chunk: dict[str, Any]) -> str:
        """Take one chunk in; return its text delta (``""`` when it carries none). Fields a
        server leaves out or sends as ``null`` are read as absent."""
        try:
            if chunk.get("model") and not self._model:
                self._model = chunk["model"]
            usage = chunk.get("usage")
            if usage:
                self.usage = Usage(
                    usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
                )
            choices = chunk.get("choices")
            if not choices:
                return ""
            choice = choices[0]
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
            delta = choice.get("delta")
            if not delta:
                return ""
            for piece in delta.get("tool_calls") or ():
                call = self._calls.setdefault(piece.get("index") or 0, _PartialCall())
                if piece.get("id"):
                    call.id = piece["id"]
                function = piece.get("function")
                if function:
                    if function.get("name"):
                        call.name = function["name"]
                    if function.get("arguments"):
                        call.arguments.append(function["arguments"])
            text = delta.get("content") or ""
        except (AttributeError, IndexError, KeyError, TypeError) as exc:
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


def completion_chunk(completion: Any) -> dict[str, Any]:
    """A whole chat completion as the one chunk carrying all of it: what a server that ignores
    ``stream=true`` answers a stream with. Each message becomes its choice's delta, its tool
    calls numbered as streamed calls are. Raises ``KeyError``, ``TypeError`` or
    ``AttributeError`` for an answer that is not a completion."""
    choices = []
    for choice in completion["choices"]:
        message = choice["message"]
        calls = [
            {**call, "index": index} for index, call in enumerate(message.get("tool_calls") or ())
        ]
        delta = {**message, "tool_calls": calls}
        choices.append({**choice, "delta": delta, "finish_reason": choice.get("finish_reason")})
    return {**completion, "choices": choices}


async def read_chunks(
    open_stream: Callable[[], Awaitable[AsyncGenerator[dict[str, Any], None]]], model_id: str
) -> AsyncIterator[StreamChunk]:
    """A :meth:`~kagura.providers.Model.stream` over a stream of chunks: ``open_stream()`` sends
    the request and returns the chunks, raising Kagura's errors.

    The chunks' generator is closed however this ends (finished, failed, closed early,
    cancelled): closing the HTTP response is what tells the server to stop generating.
    """
    chunks = await open_stream()
    reader = ChunkReader(model_id)
    try:
        async for chunk in chunks:
            delta = reader.add(chunk)
            if delta:
                yield delta
    finally:
        await chunks.aclose()
    yield reader.response()
