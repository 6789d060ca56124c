"""The one small interface every model adapter implements.

Messages use the OpenAI chat format (a list of ``{"role": ..., "content": ...}`` dicts) as the
internal lingua franca: it is what most endpoints speak, and adapters for other wire formats
translate at their boundary.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, get_args

from .._usage import NO_USAGE, Usage
from ..pricing import cost_of

Message = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool offered to the model: its name, description and JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call the model asked for: its id, the tool's name and the arguments as JSON text."""

    id: str
    name: str
    arguments: str  # JSON text, as the model produced it


@dataclass(frozen=True, slots=True)
class OutputSchema:
    """A JSON schema the answer must follow. ``name`` is what structured-output APIs ask for."""

    name: str
    schema: dict[str, Any]


#: How a server is asked for an answer that follows a JSON schema, most constrained first:
#: ``response_format`` of type ``json_schema`` (OpenAI, vLLM, Ollama); ``json_object`` with the
#: schema under ``"schema"`` (llama.cpp's servers, which turn it into a grammar); ``json_object``
#: alone; or nothing but the prompt. The prompt always carries the schema as well.
OutputMode = Literal["json_schema", "json_object_schema", "json_object", "prompt"]
OUTPUT_MODES: tuple[OutputMode, ...] = get_args(OutputMode)

#: How tools are offered: the API's ``tools`` (the server must support function calling), or in
#: the prompt, the model answering with a JSON tool call held to a schema where the server
#: constrains output.
ToolMode = Literal["native", "prompted"]
TOOL_MODES: tuple[ToolMode, ...] = get_args(ToolMode)


@dataclass(frozen=True, slots=True)
class Profile:
    """What an endpoint supports: how to ask it for structured output and for tool calls."""

    output: OutputMode = "json_schema"
    tools: ToolMode = "native"


@dataclass(slots=True)
class ModelRequest:
    """What an agent asks of a model: the messages, sampling settings, output schema and tools."""

    messages: list[Message]
    temperature: float | None = None
    max_tokens: int | None = None
    output_schema: OutputSchema | None = None
    tools: list[ToolSpec] = field(default_factory=list)
    # Provider keywords passed through untouched from @agent(...), e.g. top_p or seed.
    extra: dict[str, Any] = field(default_factory=dict)
    #: The agent's choice (``@agent(output_mode=...)``); ``None``: the endpoint's profile.
    output_mode: OutputMode | None = None


# Not frozen, unlike the request's parts: every LLM attempt builds one, and a frozen dataclass's
# __init__ costs 4.5x as much (measured: 456 ns against 101 ns). Treat it as read-only.
@dataclass(slots=True)
class ModelResponse:
    """A model's answer: its text, the tool calls it asked for, its usage and why it stopped."""

    text: str
    tool_calls: tuple[ToolCall, ...] = ()
    usage: Usage = NO_USAGE
    model: str = ""
    finish_reason: str | None = None


#: What :meth:`Model.stream` yields: text deltas as they arrive, then one final
#: :class:`ModelResponse` with the whole text, the tool calls, the usage and the finish reason.
StreamChunk: TypeAlias = str | ModelResponse


class Model(abc.ABC):
    """A model adapter: owns the wire format behind one request method.

    ``provider`` and ``model_name`` identify it for pricing, circuit breakers and recording.
    """

    provider: str
    model_name: str
    #: The adapter can constrain its answer to a JSON schema (structured output or a grammar).
    supports_output_schema: bool = False
    #: The adapter speaks native tool calling; otherwise tools are offered through the prompt.
    supports_tools: bool = False
    #: The output limit applied when a request sets no ``max_tokens`` (``None``: the server's).
    default_max_tokens: int | None = None
    #: Nothing is left for :meth:`prepare` to do. Adapters with set-up make it false per instance
    #: and their ``prepare`` makes it true; attempts check it, so a prepared model costs nothing.
    prepared: bool = True

    @functools.cached_property
    def id(self) -> str:
        """``provider/model``: the model's name in recordings, breakers and rate limits."""
        return f"{self.provider}/{self.model_name}"

    @abc.abstractmethod
    async def request(self, request: ModelRequest) -> ModelResponse:
        """Send one request and return the answer, raising :class:`kagura.errors.ProviderError`."""

    async def prepare(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Set up what requests need: import the SDK, build the client, load the weights.

        Every attempt awaits it while :attr:`prepared` is false, before the attempt's timeout
        starts: set-up does not count against a per-attempt timeout (the call's
        ``total_timeout`` does include it). Await it yourself to warm a model up at start-up.

        An implementation does slow work off the event loop, shares one set-up between
        concurrent callers, and sets ``prepared`` once done. A failure raises (the attempt fails
        with that error) and leaves ``prepared`` false, so that the next attempt tries again.
        :meth:`request` must still work on a model that was never prepared. A wrapper delegates
        both this and ``prepared`` to the model it wraps.
        """

    def cost(self, usage: Usage) -> float | None:
        """USD for ``usage`` on this model (``None`` when unknown). Wrappers delegate this to
        the model they wrap; by default it is looked up by ``provider`` and ``model_name``."""
        return cost_of(self.provider, self.model_name, usage)

    def check_ready(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Raise :class:`kagura.errors.UsageError` if the model cannot be used as configured."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id}>"

    #: :meth:`stream` really streams; otherwise it is the fallback of one chunk from
    #: :meth:`request`.
    supports_streaming: bool = False

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamChunk]:
        """Send one request and yield the answer as it is generated: text deltas (``str``),
        then exactly one final :class:`ModelResponse` (the whole text, tool calls, usage,
        finish reason), or raise :class:`kagura.errors.ProviderError`.

        Closing the iterator early (``aclose()``, or cancelling the task reading it) must stop
        the provider's generation: an HTTP adapter drops the connection, the embedded model stops
        at the next token. A response that reports no usage keeps :data:`NO_USAGE` itself, so
        that callers can tell "not reported" from zero.

        This default is for adapters that cannot stream (``supports_streaming`` false): it
        awaits :meth:`request` and yields its whole text as one delta, then the response.
        """
        response = await self.request(request)
        if response.text:
            yield response.text
        yield response
