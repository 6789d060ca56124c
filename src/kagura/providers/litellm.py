"""LiteLLM, for the providers that do not speak the OpenAI chat-completions API (the
``[litellm]`` extra).

LiteLLM answers in the OpenAI response shape, so the OpenAI adapter's response and chunk readers
are reused. Its exceptions subclass the ``openai`` SDK's (which LiteLLM brings), and are mapped
to Kagura's here, as the OpenAI adapter maps the same failures: what the server answered (an HTTP
status it sent, a body that is not a completion, an error event) or what broke the connection,
never a status LiteLLM made up. Importing it takes seconds, so it is imported by
:meth:`LiteLLMModel.prepare`, off the event loop.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

from .. import pricing
from .._redact import secret_names
from ..errors import (
    MissingCredentialsError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeout,
    UsageError,
)
from ._base import Model, ModelRequest, ModelResponse, OutputMode, StreamChunk
from ._chat import (
    Endpoint,
    Secrets,
    answer_error,
    chat_kwargs,
    error_message,
    header_secrets,
    message_of,
    status_error,
    to_response,
    without_credentials,
    without_secrets,
)
from ._chunks import read_chunks
from ._setup import SharedSetUp

_INSTALL_HINT = "litellm/... models need LiteLLM: pip install 'kagura[litellm]'"

#: Sent as the key to a base URL of the agent's when none is set: a self-hosted server usually
#: needs none, but LiteLLM (and the SDK under it) refuse to send a request without one. What the
#: OpenAI adapter sends there too.
_NO_KEY = "not-needed"


#: Providers that LiteLLM also reaches with credentials other than a key, which
#: ``validate_environment`` does not count: Azure's Entra ID (``AZURE_AD_TOKEN``, a client
#: secret, a managed identity).
_OTHER_CREDENTIALS = frozenset({"azure"})


class LiteLLMModel(Model):
    """A model reached through LiteLLM (``"litellm/<model>"``), for the providers that do not
    speak the OpenAI chat-completions API."""

    provider = "litellm"
    supports_output_schema = True

    def __init__(
        self, model_name: str, *, base_url: str | None = None, api_key: str | None = None
    ) -> None:
        self.model_name = model_name
        self._base_url = base_url
        self._api_key = api_key
        self.prepared: bool = False
        # LiteLLM translates the json_schema response format for the providers it speaks.
        self._endpoint = Endpoint(self.provider, base_url, model_name, "json_schema")
        self._where = without_credentials(base_url) if base_url else f"LiteLLM ({model_name})"

    @property
    def supports_tools(self) -> bool:  # type: ignore[override]
        return not self._endpoint.native_tools_rejected

    def check_ready(self) -> None:
        """Raise :class:`~kagura.errors.UsageError` if LiteLLM is not installed."""
        # Found, not imported: the import is the slow part of set-up, left to prepare(), which
        # checks the credentials (LiteLLM knows which variable each provider reads).
        if importlib.util.find_spec("litellm") is None:
            raise UsageError(_INSTALL_HINT)

    async def prepare(self) -> None:
        """Import LiteLLM (once per process, off the event loop), then raise
        :class:`~kagura.errors.MissingCredentialsError` if the provider's key is not set: a
        request without it would fail as a server error LiteLLM makes up, and be retried."""
        await _litellm()
        self._check_credentials()
        self.prepared = True

    def _missing_keys(self) -> list[str]:
        """The environment variables holding the provider's API key, if none of them is set and
        no key is given (LiteLLM's ``validate_environment`` knows which provider needs which)."""
        if self._api_key or self.model_name.partition("/")[0] in _OTHER_CREDENTIALS:
            return []
        litellm = _import_litellm()
        if getattr(litellm, "api_key", None):  # a key set on the module is used for every call
            return []
        found = litellm.validate_environment(model=self.model_name)
        if found.get("keys_in_environment"):
            return []
        # Only keys: a provider may also name settings with working defaults (OLLAMA_API_BASE),
        # or credentials read from elsewhere (AWS profiles, Google's default credentials).
        return [
            name
            for name in found.get("missing_keys") or ()
            if name.endswith("_API_KEY") and not os.environ.get(name)
        ]

    def _check_credentials(self) -> None:
        # A self-hosted base URL usually needs no key: the OpenAI adapter's rule (see _kwargs).
        if self._base_url:
            return
        missing = self._missing_keys()
        if missing:
            raise MissingCredentialsError(self.id, " or ".join(missing))

    async def request(self, request: ModelRequest) -> ModelResponse:
        """Send ``request`` through ``litellm.acompletion``, its errors mapped to Kagura's."""
        litellm = _import_litellm()
        secrets = self._secrets(request)

        async def send(mode: OutputMode) -> Any:
            try:
                return await litellm.acompletion(**self._kwargs(request, mode))
            except Exception as exc:
                error = self._error(exc, secrets)
            # Raised here, out of the except clause: LiteLLM's exception, which may quote the
            # key, must not stay on the error as its context.
            raise error

        completion = await self._endpoint.send(request, send)
        return to_response(completion, self.id, secret=secrets)

    def _kwargs(self, request: ModelRequest, mode: OutputMode) -> dict[str, Any]:
        """The keyword arguments of ``litellm.acompletion`` for ``request``."""
        kwargs = chat_kwargs(self.model_name, request, mode)
        kwargs["num_retries"] = 0
        if self._base_url:
            kwargs["api_base"] = self._base_url
        if self._api_key:
            kwargs["api_key"] = self._api_key
        elif self._base_url and self._missing_keys():
            kwargs["api_key"] = _NO_KEY
        return kwargs

    def _secrets(self, request: ModelRequest) -> tuple[str, ...]:
        """What an error leaves out, should a server quote it back: the key given, the base
        URL's credentials, the credentials among the request's extra headers (LiteLLM sends
        ``extra_headers`` and ``headers``), and the keys LiteLLM may have read from the
        environment (which one it took, it does not say)."""
        secrets = [self._api_key or ""]
        for option in ("extra_headers", "headers"):
            secrets += header_secrets(request.extra.get(option))
        if self._base_url:
            parts = urllib.parse.urlsplit(self._base_url)
            if parts.password:
                secrets += [parts.password, urllib.parse.unquote(parts.password)]
        secrets += [os.environ[name] for name in secret_names(os.environ)]
        return tuple(s for s in dict.fromkeys(secrets) if s and s != _NO_KEY)

    def _error(self, exc: Exception, secrets: Secrets) -> Exception:
        return kagura_error(exc, self.id, self._where, secrets)

    supports_streaming = True

    def stream(self, request: ModelRequest) -> AsyncIterator[StreamChunk]:
        """``litellm.acompletion(stream=True)``: text deltas, then the whole answer (with usage
        when the provider reports it). The stream is closed however the iterator ends."""

        secrets = self._secrets(request)

        async def send(mode: OutputMode) -> AsyncGenerator[dict[str, Any], None]:
            kwargs = self._kwargs(request, mode)
            kwargs["stream"] = True
            kwargs.setdefault("stream_options", {"include_usage": True})
            try:
                stream = await _import_litellm().acompletion(**kwargs)
            except Exception as exc:
                error = self._error(exc, secrets)
            else:
                return self._chunks(stream, secrets)
            raise error  # out of the except clause, as in request()

        return read_chunks(lambda: self._endpoint.send(request, send), self.id)

    async def _chunks(self, stream: Any, secrets: Secrets) -> AsyncGenerator[dict[str, Any], None]:
        """LiteLLM's stream as the JSON objects of its chunks, closed however it ends."""
        answered = False
        try:
            while True:
                try:
                    chunk = await anext(stream)
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    error = self._error(exc, secrets)
                else:
                    data = chunk.model_dump()
                    answered = answered or _carries_an_answer(data)
                    yield data
                    continue
                raise error  # out of the except clause, as in request()
        finally:
            await stream.aclose()
        if not answered and getattr(stream, "received_finish_reason", "") is None:
            # Nothing came, and LiteLLM made up the finish reason: the server answered with
            # something that is not a stream (a proxy's or a portal's page). The OpenAI adapter
            # says so too, rather than read it as an empty answer.
            headers = getattr(stream, "_response_headers", None) or {}
            sent = headers.get("content-type", "an unknown content type")
            raise ProviderError(
                f"malformed response: the answer is not a stream of chunks ({sent})",
                model=self.id,
            )


def _carries_an_answer(chunk: dict[str, Any]) -> bool:
    """Does this chunk hold any of an answer (text, a role, tool calls)?"""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("role") or delta.get("tool_calls"):
            return True
    return False


def kagura_error(exc: Exception, model_id: str, where: str, secret: Secrets) -> Exception:
    """A LiteLLM exception (a subclass of the ``openai`` SDK's) as Kagura's
    :class:`~kagura.errors.ProviderError` family, by what happened underneath: an HTTP status
    the server sent, a connection that broke, a timeout, a body that was not a completion, an
    error event part-way through a stream. ``where`` names the endpoint; ``secret`` (the keys)
    is cut out of everything quoted from the server. Anything else is returned as it is.

    LiteLLM reports a connection failure, or an answer that is not JSON, as an HTTP 500 of a
    response it made up: that status is never passed on. Nor is LiteLLM's exception kept as the
    cause: its message may quote the key a server refused."""
    import openai

    if isinstance(exc, openai.APIStatusError) and exc.response.headers:
        # A status the server sent: a response LiteLLM makes up has no headers.
        body = _body_of(exc.response)
        message = (
            error_message(exc.body if isinstance(exc.body, dict) else {})
            or message_of(body)
            or str(exc.message)
        )
        return status_error(
            model_id, exc.status_code, exc.response.headers, body, message, secret=secret
        )
    transport: BaseException | None = None
    for cause in _chain(exc):
        module = type(cause).__module__
        if module.startswith("litellm"):
            continue  # LiteLLM's wrappers: what they wrap says what happened
        if module.startswith("httpx"):
            response = getattr(cause, "response", None)
            status = getattr(response, "status_code", None)
            if isinstance(status, int) and response is not None:
                # The server's answer, read by LiteLLM's own HTTP client (its Anthropic and
                # Gemini providers, among others), under a response LiteLLM made up.
                body = _body_of(response)
                message = message_of(body) or str(getattr(exc, "message", exc))
                return status_error(
                    model_id, status, response.headers, body, message, secret=secret
                )
            # Under an aiohttp transport httpx's class says little (every aiohttp connection
            # error is a connect timeout to it): aiohttp's own error, below it, says more.
            transport = transport or cause
            continue
        if isinstance(cause, TimeoutError):  # aiohttp's and asyncio's timeouts
            return _caused(ProviderTimeout(f"request to {where} timed out", model=model_id), cause)
        if module.startswith("aiohttp") or isinstance(cause, OSError):
            return _connection_error(cause, model_id, where)
        if isinstance(cause, StopAsyncIteration):  # LiteLLM ended a stream with no finish
            return ProviderConnectionError(
                "the stream ended without a finish reason (cut off before the end of the answer)",
                model=model_id,
            )
        if isinstance(cause, openai.APIError) and not isinstance(
            cause, openai.APIStatusError | openai.APIConnectionError
        ):  # an error event part-way through a stream
            return answer_error(
                model_id,
                f"error event in the stream: {cause.message}",
                repr(cause.body),
                secret=secret,
            )
        if isinstance(cause, ValueError):  # a body that is not JSON
            return _caused(
                answer_error(model_id, f"malformed response: {cause}", None, secret=secret), cause
            )
    if transport is not None:
        import httpx

        if isinstance(transport, httpx.TimeoutException):
            return _caused(
                ProviderTimeout(f"request to {where} timed out", model=model_id), transport
            )
        return _connection_error(transport, model_id, where)
    if isinstance(exc, openai.APITimeoutError):
        return ProviderTimeout(f"request to {where} timed out", model=model_id)
    if isinstance(exc, openai.APIConnectionError):
        return ProviderConnectionError(
            f"connection to {where} failed: {without_secrets(str(exc.message), secret)}",
            model=model_id,
        )
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code >= 500:
            # LiteLLM's own "server error" with nothing under it: an answer it could not read
            # ("Empty or invalid response from LLM endpoint", a 200 with an HTML page).
            return answer_error(model_id, f"malformed response: {exc.message}", None, secret=secret)
        # LiteLLM refused the request itself (a parameter the provider does not take).
        return status_error(model_id, exc.status_code, {}, None, str(exc.message), secret=secret)
    if isinstance(exc, openai.APIError):
        return answer_error(
            model_id, f"error event in the stream: {exc.message}", repr(exc.body), secret=secret
        )
    if isinstance(exc, ValueError | KeyError | TypeError | AttributeError):
        # LiteLLM raises these when a body is not the JSON it expects.
        return _caused(
            answer_error(model_id, f"malformed response: {exc}", None, secret=secret), exc
        )
    return exc


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps, outermost first: its cause (or context), and the
    ``original_exception`` LiteLLM keeps on the errors of its streams."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        original = getattr(current, "original_exception", None)
        if isinstance(original, BaseException):
            pending.append(original)
        below = current.__cause__ or current.__context__
        if below is not None:
            pending.append(below)


def _connection_error(cause: BaseException, model_id: str, where: str) -> ProviderError:
    return _caused(
        ProviderConnectionError(f"connection to {where} failed: {_detail(cause)}", model=model_id),
        cause,
    )


def _caused(error: ProviderError, cause: BaseException) -> ProviderError:
    """``error`` with ``cause`` (the transport's or the parser's exception, not LiteLLM's)."""
    error.__cause__ = cause
    return error


def _body_of(response: Any) -> str | None:
    """The start of an error response's body, if it was read."""
    try:
        return str(response.text)[:2000]
    except Exception:  # httpx's ResponseNotRead, or a response that is not httpx's
        return None


def _detail(exc: BaseException) -> str:
    """The first informative message from ``exc`` down (httpx errors often have none)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if str(current):
            return f"{type(current).__name__}: {current}"
        current = current.__cause__ or current.__context__
    return type(exc).__name__


#: LiteLLM once imported by :func:`_import_litellm`, which every request calls: the environment
#: is changed for the first import only (once imported, never again, nor from other threads).
_litellm_module: Any = None
_importing = threading.Lock()


def _import_litellm() -> Any:
    global _litellm_module
    if _litellm_module is None:
        with _importing:
            if _litellm_module is None:
                _litellm_module = _first_import()
    return _litellm_module


def _first_import() -> Any:
    # At import, LiteLLM fetches its model cost map from GitHub (three tries, warnings on
    # stderr, seconds offline) unless told to use the copy it ships; Kagura prices calls with
    # genai-prices, and promises to run offline. A user's own setting is kept, and ours is
    # taken back after the import (the one time LiteLLM reads it, but for reloads the user
    # asks for), not left for the application's child processes to inherit.
    ours = "LITELLM_LOCAL_MODEL_COST_MAP" not in os.environ
    if ours:
        os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    try:
        import litellm
    except ImportError:
        raise UsageError(_INSTALL_HINT) from None
    finally:
        if ours:
            os.environ.pop("LITELLM_LOCAL_MODEL_COST_MAP", None)
    # Else LiteLLM prints "Give Feedback / Get Help" to stdout for every error it raises, the
    # ones Kagura handles (and retries) included.
    litellm.suppress_debug_info = True
    return litellm


def _set_up() -> None:
    _import_litellm()
    pricing.load()  # off the event loop too


_litellm = SharedSetUp(_set_up, "kagura-litellm-import")
