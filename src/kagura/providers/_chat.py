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

import base64
import binascii
import json
import logging
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from .._redact import REDACTED, is_secret_name
from .._usage import NO_USAGE, Usage
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
#: (OpenAI, vLLM, Ollama), 501, and 500 from llama.cpp's servers (llama-cpp-python's request
#: validation errors, llama-server's "tools param requires --jinja flag"). A status alone says
#: nothing: a 500 is mostly the server failing, and must stay a retried server error, so a
#: rejection is also a text that names the field as refused (_refusal).
_REJECTION_STATUSES = frozenset({400, 422, 500, 501})


def _refusal(field: str) -> re.Pattern[str]:
    """What servers say when they refuse a request field ``field`` (a regex) itself, and not
    something else that happens to mention it (a message with role 'tool', a parser that failed):
    "<field> is not supported", "<field> requires ...", "does not support <field>",
    "unrecognized request argument: <field>", or a validation error located at the field
    ("(body.response_format.type)", ``"loc": ["body", "tools"]``)."""
    field = rf"\b(?:{field})\b"
    named = (
        r"(?:(?:request\s+)?(?:param(?:eter)?|field|argument|key|option)s?(?:\s+supplied)?\W{0,4})"
    )
    refused = (
        r"(?:(?:is|are)\s+not\s+(?:supported|allowed|permitted|available|enabled|implemented)"
        r"|requires?\b)"
    )
    return re.compile(
        rf"{field}\W{{0,4}}{named}?{refused}"
        rf"|(?:does|do)\s*(?:not|n't)\s+support\s+(?:the\s+)?{named}?(?:native\s+)?{field}"
        rf"|(?:unsupported|unknown|unrecogni[sz]ed|invalid|unexpected)\s+{named}{field}"
        rf"|(?:unsupported|unrecogni[sz]ed)\s+{field}"
        rf"|\bbody\W{{1,4}}{field}",
        re.IGNORECASE,
    )


_OUTPUT_REFUSAL = _refusal(r"response[_ ]format|json_schema|json_object")
_TOOLS_REFUSAL = _refusal(r"tools|tool[_ ]choice|tool[_ -]call(?:s|ing)|function[_ -]calling")


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
        # Logged and put in errors: the address without a user and password in it.
        where = f" at {without_credentials(base_url)}" if base_url else ""
        self.label = f"{provider}/{model_name}{where}"
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
                    or not _rejects(exc, _OUTPUT_REFUSAL)
                ):
                    if request.tools and _rejects(exc, _TOOLS_REFUSAL):
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


def _rejects(error: ProviderError, refusal: re.Pattern[str]) -> bool:
    """The server refused the request for the field ``refusal`` finds refused."""
    if error.status_code not in _REJECTION_STATUSES:
        return False
    return refusal.search(f"{error} {error.body or ''}") is not None


def without_credentials(url: str) -> str:
    """``url`` without the user and password it may carry (``http://user:password@host``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


#: A shorter "key" (a placeholder such as "x" for a local server) is not looked for: it could
#: stand for any letter of a message.
_SHORTEST_SECRET = 8

#: What an error built from a server's answer leaves out: the API key, or every credential the
#: request was sent with.
Secrets = str | tuple[str, ...] | None


def status_error(
    model_id: str,
    status: int,
    headers: Mapping[str, str],
    body: str | None,
    message: str | None = None,
    *,
    secret: Secrets = None,
) -> ProviderError:
    """An HTTP error answer as a :class:`~kagura.errors.ProviderError`: its status, its headers
    (``Retry-After`` among them) and the start of its body. The message is ``message``, else the
    one in the body's JSON (``{"error": {"message": ...}}``, what OpenAI-compatible servers
    send), else the start of the body. ``secret``, the API key the request was sent with (or
    each of the credentials it was sent with), is left out of both wherever it appears: a server
    may quote a key it refuses ("Incorrect API key provided: ..."), and the error is raised,
    logged and recorded, whatever shape the key has (the redaction of recorded values knows
    only some)."""
    if message is None:
        message = message_of(body) or (body or "").strip()[:500] or "(no body)"
    return answer_error(model_id, message, body, secret=secret, status_code=status, headers=headers)


def answer_error(
    model_id: str,
    message: str,
    body: str | None,
    *,
    secret: Secrets,
    status_code: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> ProviderError:
    """A :class:`~kagura.errors.ProviderError` built from what a server answered: its message
    and the start of its ``body``, ``secret`` (the API key) cut out of both. Every error that
    quotes an answer is built here (see :func:`status_error` for why)."""
    return ProviderError(
        without_secrets(message, secret),
        model=model_id,
        status_code=status_code,
        headers=headers,
        body=without_secrets(body, secret)[:2000] if body is not None else None,
    )


def header_secrets(headers: Any) -> tuple[str, ...]:
    """The credentials among a request's extra headers (``provider_kwargs={"extra_headers":
    ...}``), as a server may quote them back: the values of headers named as secrets are
    (``api-key``, Azure's; ``x-api-key``; ``Authorization``; any ``...-Key``), each whole and,
    after a scheme (``Bearer``, ``Basic``), the token alone; a basic token's user and password
    too, decoded. Other headers (``api-version``, ``OpenAI-Beta``, a tag) are not secrets, and
    cutting their values out of an error would only garble it."""
    if not isinstance(headers, Mapping):
        return ()
    found: list[str] = []
    for name, value in headers.items():
        name = str(name)
        if not isinstance(value, str) or not (is_secret_name(name) or name.lower().endswith("key")):
            continue
        found.append(value)
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if not token:
            continue
        found.append(token)
        if scheme.lower() == "basic":
            try:
                user_password = base64.b64decode(token, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                continue  # not base64: the token as it was is all there is to cut out
            found += [user_password, user_password.partition(":")[2]]
    return tuple(dict.fromkeys(found))


def without_secrets(text: str, secret: Secrets) -> str:
    """``text`` with ``secret`` (each of them) cut out, wherever it appears."""
    for cut in (secret,) if isinstance(secret, str) else secret or ():
        if len(cut) >= _SHORTEST_SECRET:
            text = text.replace(cut, REDACTED)
    return text


def message_of(body: str | None) -> str | None:
    try:
        data = json.loads(body) if body else None
    except (ValueError, RecursionError):  # not JSON, or nested past Python's stack
        return None
    return error_message(data) if isinstance(data, dict) else None


def error_message(body: Mapping[str, Any]) -> str | None:
    """The message of an error body: ``{"error": {"message": ...}}``, or the inner object."""
    inner = body.get("error", body)
    if isinstance(inner, dict) and inner.get("message"):
        return str(inner["message"])
    return None


def to_response(completion: Any, model_id: str, *, secret: Secrets = None) -> ModelResponse:
    """A chat completion as the answer Kagura reads: the JSON object the server sent (what the
    openai provider reads), or an object with those fields (LiteLLM's), through its
    ``model_dump()``. Missing optional fields are read as absent, as lenient as the SDK's own
    model: servers that call themselves OpenAI-compatible leave some out; an answer without
    usage reports :data:`~kagura._usage.NO_USAGE` (unknown, not free). ``secret`` is left out of
    the error a malformed answer raises."""
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
        usage = data.get("usage")
        return ModelResponse(
            text=message.get("content") or "",
            tool_calls=calls,
            usage=(
                Usage(usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)
                if usage
                else NO_USAGE
            ),
            model=data.get("model") or model_id,
            finish_reason=choice.get("finish_reason"),
        )
    except (AttributeError, IndexError, KeyError, TypeError) as exc:
        raw = completion if isinstance(completion, str) else repr(completion)
        raise answer_error(model_id, f"malformed response: {exc}", raw, secret=secret) from exc
