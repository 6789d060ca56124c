"""The chat-completions request both OpenAI-shaped adapters send, the errors they map, and what
they learn per endpoint.

The OpenAI-compatible adapter and the LiteLLM adapter build the same request: the messages,
sampling settings, tools and a ``response_format`` chosen by the endpoint's :class:`Profile`; an
HTTP error answer becomes the same :class:`~kagura.errors.ProviderError` (:func:`status_error`).
A server that rejects the response format it was sent gets the next, less constrained one, once;
what it accepted is remembered for that endpoint and model for the rest of the process, so the
rejection is paid once, not on every call, and never retried as if it were a transient failure.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from .._redact import REDACTED
from .._usage import Usage
from ..errors import ProviderError, UnsupportedRequestError
from ._base import (
    OUTPUT_MODES,
    ModelRequest,
    ModelResponse,
    OutputMode,
    OutputSchema,
    ToolCall,
    ToolSpec,
)
from ._grammar import grammar_schema

T = TypeVar("T")

logger = logging.getLogger("kagura.providers")

#: Where a rejected output mode goes next.
_LOWER: dict[OutputMode, OutputMode] = {
    "json_schema": "json_object_schema",
    "json_object_schema": "json_object",
    "json_object": "prompt",
}

#: (provider, base URL, model) -> the output mode the endpoint accepted after rejecting others.
_accepted_modes: dict[tuple[str, str | None, str], OutputMode] = {}
#: Endpoints (same key) that rejected native tools: tools go through the prompt there.
_rejected_tools: set[tuple[str, str | None, str]] = set()

#: HTTP statuses with which servers reject a request field they do not support: 400 and 422
#: (OpenAI, vLLM, Ollama), 500 (llama-cpp-python's server, whose request validation errors
#: surface as internal errors) and 501.
_REJECTION_STATUSES = frozenset({400, 422, 500, 501})


def response_format(schema: OutputSchema, mode: OutputMode) -> dict[str, Any] | None:
    """The ``response_format`` asking for ``schema`` in ``mode`` (``None`` for the prompt only)."""
    if mode == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {"name": schema.name, "schema": schema.schema, "strict": False},
        }
    if mode == "json_object_schema":
        # llama.cpp builds a grammar from this schema: keep only what its grammar can express
        # (the answer is validated against the full schema afterwards).
        return {"type": "json_object", "schema": grammar_schema(schema.schema)}
    if mode == "json_object":
        return {"type": "json_object"}
    return None


def tools_param(tools: list[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in tools
    ]


def chat_kwargs(model_name: str, request: ModelRequest, mode: OutputMode) -> dict[str, Any]:
    """The keyword arguments of a chat-completions call for ``request``."""
    kwargs: dict[str, Any] = {"model": model_name, "messages": request.messages}
    if request.temperature is not None:
        kwargs["temperature"] = request.temperature
    if request.max_tokens is not None:
        kwargs["max_tokens"] = request.max_tokens
    if request.output_schema is not None:
        fmt = response_format(request.output_schema, mode)
        if fmt is not None:
            kwargs["response_format"] = fmt
    if request.tools:
        kwargs["tools"] = tools_param(request.tools)
        # Some servers (llama.cpp's among them) call tools only when asked to choose.
        kwargs["tool_choice"] = "auto"
    kwargs.update(request.extra)
    return kwargs


class Endpoint:
    """What one (provider, base URL, model) has accepted so far; adapters keep one each."""

    __slots__ = ("key", "label", "profile_mode")

    def __init__(
        self, provider: str, base_url: str | None, model_name: str, profile_mode: OutputMode
    ) -> None:
        self.key = (provider, base_url, model_name)
        self.label = f"{provider}/{model_name}" + (f" at {base_url}" if base_url else "")
        self.profile_mode = profile_mode

    @property
    def native_tools_rejected(self) -> bool:
        return self.key in _rejected_tools

    def output_mode(self, request: ModelRequest) -> OutputMode:
        """The mode to send ``request`` in: the agent's choice, else what the endpoint accepts."""
        return request.output_mode or _accepted_modes.get(self.key, self.profile_mode)

    async def send(self, request: ModelRequest, send: Callable[[OutputMode], Awaitable[T]]) -> T:
        """``send(mode)``, stepping down the output modes while the server rejects them."""
        mode = self.output_mode(request)
        while True:
            try:
                return await send(mode)
            except ProviderError as exc:
                if (
                    request.output_schema is None
                    or mode == "prompt"
                    or not _rejects(exc, ("response_format", "json_schema", "json_object"))
                ):
                    if request.tools and _rejects(exc, ("tool",)):
                        _rejected_tools.add(self.key)
                        raise UnsupportedRequestError(
                            f"{self.label} does not take native tool calls ({exc}); tools go "
                            f"through the prompt from now on (@agent(tool_mode='prompted'))",
                            feature="tools",
                            model=exc.model,
                        ) from exc
                    raise
                if request.output_mode is not None:
                    choices = ", ".join(repr(m) for m in OUTPUT_MODES)
                    raise UnsupportedRequestError(
                        f"{self.label} rejected output_mode={mode!r} ({exc}); choose one it "
                        f"supports with @agent(output_mode=...): one of {choices}",
                        feature="output_mode",
                        model=exc.model,
                    ) from exc
                lower = _LOWER[mode]
                logger.warning(
                    "%s rejected response_format %r (%s); asking it with %r from now on",
                    self.label,
                    mode,
                    exc,
                    lower,
                )
                _accepted_modes[self.key] = lower
                mode = lower


def _rejects(error: ProviderError, words: tuple[str, ...]) -> bool:
    """The server refused the request for a field named by one of ``words``."""
    if error.status_code not in _REJECTION_STATUSES:
        return False
    text = f"{error} {error.body or ''}".lower()
    return any(word in text for word in words)


def status_error(
    model_id: str,
    status: int,
    headers: Mapping[str, str],
    body: str | None,
    message: str | None = None,
    *,
    secret: str | None = None,
) -> ProviderError:
    """An HTTP error answer as a :class:`~kagura.errors.ProviderError`: its status, its headers
    (``Retry-After`` among them) and the start of its body. The message is ``message``, else the
    one in the body's JSON (``{"error": {"message": ...}}``, what OpenAI-compatible servers
    send), else the start of the body. ``secret``, the API key the request was sent with, is
    left out of both wherever it appears: a server may quote a key it refuses ("Incorrect API
    key provided: ..."), and the error is raised, logged and recorded, whatever shape the key
    has (the redaction of recorded values knows only some)."""
    if message is None:
        message = _message_of(body) or (body or "").strip()[:500] or "(no body)"
    if secret and len(secret) >= _SHORTEST_SECRET:
        message = message.replace(secret, REDACTED)
        body = None if body is None else body.replace(secret, REDACTED)
    return ProviderError(
        message,
        model=model_id,
        status_code=status,
        headers=headers,
        body=body[:2000] if body is not None else None,
    )


#: A shorter "key" (a placeholder such as "x" for a local server) is not looked for: it could
#: stand for any letter of a message.
_SHORTEST_SECRET = 8


def _message_of(body: str | None) -> str | None:
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return None
    return error_message(data) if isinstance(data, dict) else None


def error_message(body: Mapping[str, Any]) -> str | None:
    """The message of an error body: ``{"error": {"message": ...}}``, or the inner object."""
    inner = body.get("error", body)
    if isinstance(inner, dict) and inner.get("message"):
        return str(inner["message"])
    return None


def to_response(completion: Any, model_id: str) -> ModelResponse:
    """A chat completion as the answer Kagura reads: the JSON object the server sent (what the
    openai provider reads), or an object with those fields (LiteLLM's), through its
    ``model_dump()``. Missing optional fields are read as absent, as lenient as the SDK's own
    model: servers that call themselves OpenAI-compatible leave some out."""
    try:
        data = completion if isinstance(completion, dict) else completion.model_dump()
        choice = data["choices"][0]
        message = choice["message"]
        calls = tuple(
            ToolCall(
                id=call.get("id"),
                name=call["function"]["name"],
                arguments=call["function"].get("arguments") or "{}",
            )
            for call in message.get("tool_calls") or ()
        )
        usage = data.get("usage") or {}
        return ModelResponse(
            text=message.get("content") or "",
            tool_calls=calls,
            usage=Usage(usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0),
            model=data.get("model") or model_id,
            finish_reason=choice.get("finish_reason"),
        )
    except (AttributeError, IndexError, KeyError, TypeError) as exc:
        raw = completion if isinstance(completion, str) else repr(completion)
        raise ProviderError(f"malformed response: {exc}", model=model_id, body=raw[:2000]) from exc
