"""OpenAI and every OpenAI-compatible endpoint (Ollama, vLLM, llama.cpp server, OpenRouter, ...).

One adapter, many endpoints: an :class:`Endpoint` owns where to connect and which credentials to
use; :class:`OpenAIChatModel` owns the chat-completions wire format. The ``openai`` SDK is imported
on first use so that ``import kagura`` stays fast, in a thread of its own (see :meth:`prepare`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import (
    MissingCredentialsError,
    ProviderError,
)
from . import _chat
from ._base import Model, ModelRequest, ModelResponse, OutputMode, Profile, StreamChunk
from ._chunks import read_chunks
from ._setup import SharedSetUp

if TYPE_CHECKING:
    import ssl

    from openai import AsyncOpenAI


DEFAULT_PROFILE = Profile()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A named OpenAI-compatible service and where its settings come from."""

    name: str
    default_base_url: str | None
    base_url_env: str
    key_env: str | None
    key_required: bool
    #: How to ask this kind of server for structured output and tools (a per-agent override:
    #: ``@agent(output_mode=..., tool_mode=...)``).
    profile: Profile = DEFAULT_PROFILE


ENDPOINTS: dict[str, Endpoint] = {
    "openai": Endpoint("openai", None, "OPENAI_BASE_URL", "OPENAI_API_KEY", True),
    "openrouter": Endpoint(
        "openrouter",
        "https://openrouter.ai/api/v1",
        "OPENROUTER_BASE_URL",
        "OPENROUTER_API_KEY",
        True,
    ),
    "ollama": Endpoint("ollama", "http://localhost:11434/v1", "OLLAMA_BASE_URL", None, False),
    "vllm": Endpoint("vllm", "http://localhost:8000/v1", "VLLM_BASE_URL", "VLLM_API_KEY", False),
    # llama.cpp's servers (llama-server and llama-cpp-python's) turn a JSON schema given with
    # json_object into a grammar; llama-cpp-python's refuses json_schema. With their default chat
    # formats they ignore native tools, so tools go through the prompt, held to a schema.
    "llamacpp": Endpoint(
        "llamacpp",
        "http://localhost:8080/v1",
        "LLAMACPP_BASE_URL",
        "LLAMACPP_API_KEY",
        False,
        Profile(output="json_object_schema", tools="prompted"),
    ),
}

# Clients hold an HTTP connection pool bound to the event loop that created it, so one client is
# kept per (endpoint settings, loop) and shared by every agent using them, with the async
# generator that closes it when the loop shuts down (see _closed_with_the_loop).
_clients: dict[
    tuple[str | None, str, int],
    tuple[asyncio.AbstractEventLoop, AsyncOpenAI, AsyncGenerator[None, None]],
] = {}

#: The connection pool of each client: as many connections as calls in flight, up to this many
#: (more calls wait for a free connection), and every idle one kept for KEEPALIVE_SECONDS, so
#: that the next burst of a fan-out reuses them rather than opening as many again.
MAX_CONNECTIONS = 1000
KEEPALIVE_SECONDS = 30.0


def _cached_client(base_url: str | None, api_key: str) -> AsyncOpenAI | None:
    loop = asyncio.get_running_loop()
    cached = _clients.get((base_url, api_key, id(loop)))
    if cached is not None and cached[0] is loop and not loop.is_closed():
        return cached[1]
    return None


async def _client(base_url: str | None, api_key: str) -> AsyncOpenAI:
    client = _cached_client(base_url, api_key)
    if client is not None:
        return client
    import httpx2
    from openai import AsyncOpenAI, DefaultAioHttpClient

    # The SDK's aiohttp transport: with its default (httpx2) client, a fan-out of 1,000 calls
    # spends about 8 ms of client CPU per call, most of it in the connection pool's bookkeeping
    # (benchmarks/bench_fanout.py).
    http_client = DefaultAioHttpClient(
        verify=_tls(),
        limits=httpx2.Limits(
            max_connections=MAX_CONNECTIONS,
            max_keepalive_connections=MAX_CONNECTIONS,
            keepalive_expiry=KEEPALIVE_SECONDS,
        ),
    )
    # Kagura's own policies own retries and timeouts; the SDK's would multiply them.
    client = AsyncOpenAI(
        api_key=api_key,
        max_retries=0,
        timeout=600.0,
        http_client=http_client,
        **_address(base_url),
    )
    for stale in [k for k, (lp, _, _) in _clients.items() if lp.is_closed()]:
        del _clients[stale]
    loop = asyncio.get_running_loop()
    closer = _closed_with_the_loop(client)
    await anext(closer)
    _clients[(base_url, api_key, id(loop))] = (loop, client, closer)
    return client


def _address(base_url: str | None) -> dict[str, Any]:
    """The client's ``base_url``, and for a URL with credentials in it (``user:password@``) the
    HTTP basic authentication they stand for, in place of the API key's bearer token: what
    httpx made of such a URL. aiohttp refuses to send a request to it with an Authorization
    header of its own."""
    if base_url is None:
        return {"base_url": None}
    parts = urllib.parse.urlsplit(base_url)
    if parts.username is None and parts.password is None:
        return {"base_url": base_url}
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return {
        "base_url": _without_credentials(base_url),
        "default_headers": {"Authorization": f"Basic {token}"},
    }


async def _closed_with_the_loop(client: AsyncOpenAI) -> AsyncGenerator[None, None]:
    """Closes ``client`` (its connections) when its event loop shuts down.

    An aiohttp session left open when its loop ends says so on stderr ("Unclosed client
    session") when it is collected, and asyncio has no callback for a loop's end. What it does
    have: ``loop.shutdown_asyncgens()``, which ``asyncio.run`` (and ``asyncio.Runner``) call
    before closing the loop, finalises every async generator still suspended in it. This one
    is suspended for the client's lifetime (the loop keeps a weak reference, ``_clients`` the
    strong one), and its ``finally`` closes the client.
    """
    try:
        yield
    finally:
        await client.close()


def _load_sdk() -> None:
    import openai  # noqa: F401 - with it, aiohttp (the transport's)
    from openai.types.chat import ChatCompletion  # noqa: F401 - imported for what _create needs

    _tls()


#: The TLS settings of every client: the system's certificates (or SSL_CERT_FILE and
#: SSL_CERT_DIR), loaded once per process. A transport left to make its own loads them for each
#: client, that is for each event loop: 25 ms each time.
_tls_context: ssl.SSLContext | None = None


def _tls() -> ssl.SSLContext:
    global _tls_context
    if _tls_context is None:
        import httpx2

        _tls_context = httpx2.create_ssl_context()
    return _tls_context


# Shared by every model: the import takes most of a second, and is done once per process.
_sdk = SharedSetUp(_load_sdk, "kagura-openai-import")


class OpenAIChatModel(Model):
    """Chat completions over the ``openai`` SDK, against OpenAI or any compatible base URL.

    ``profile`` says how the server is asked for structured output and tools (by default the
    endpoint's). A server that rejects the response format gets the next, less constrained one,
    and one that rejects native tools gets them through the prompt; both are remembered for the
    endpoint and model.
    """

    supports_output_schema = True

    def __init__(
        self,
        model_name: str,
        *,
        endpoint: Endpoint = ENDPOINTS["openai"],
        base_url: str | None = None,
        api_key: str | None = None,
        profile: Profile | None = None,
    ) -> None:
        self.provider = endpoint.name
        self.model_name = model_name
        self.endpoint = endpoint
        self.profile = profile or endpoint.profile
        self._base_url = base_url
        self._api_key = api_key
        self.prepared = False
        self._learned: _chat.Endpoint | None = None

    @property
    def supports_tools(self) -> bool:  # type: ignore[override]
        return self.profile.tools == "native" and not self._endpoint().native_tools_rejected

    def _endpoint(self) -> _chat.Endpoint:
        """What this endpoint and model accepted so far (shared by every model object naming
        them). Rebuilt when the base URL's environment variable changed."""
        base_url = self.base_url
        learned = self._learned
        if learned is None or learned.key[1] != base_url:
            learned = _chat.Endpoint(self.provider, base_url, self.model_name, self.profile.output)
            self._learned = learned
        return learned

    @property
    def base_url(self) -> str | None:
        return (
            self._base_url
            or os.environ.get(self.endpoint.base_url_env)
            or self.endpoint.default_base_url
        )

    def _resolve_key(self) -> str:
        key = self._api_key
        if key is None and self.endpoint.key_env is not None:
            key = os.environ.get(self.endpoint.key_env)
        if key:
            return key
        # A self-hosted base URL usually needs no key; the real OpenAI always does.
        custom_base = self._base_url or os.environ.get(self.endpoint.base_url_env)
        if self.endpoint.key_required and not custom_base:
            raise MissingCredentialsError(self.id, self.endpoint.key_env or "an API key")
        return "not-needed"

    def check_ready(self) -> None:
        self._resolve_key()

    async def prepare(self) -> None:
        """Import the SDK (off the event loop) and build the client for the running loop. On an
        event loop started later, the first request builds that loop's client (tens of
        milliseconds: the CA bundle is read; nothing is imported)."""
        await _sdk()
        await _client(self.base_url, self._resolve_key())
        self.prepared = True

    def _chat_kwargs(self, request: ModelRequest, mode: OutputMode | None = None) -> dict[str, Any]:
        """The keyword arguments of ``chat.completions.create`` for ``request``, its output
        schema asked for in ``mode`` (by default what the endpoint accepts)."""
        if mode is None:
            mode = self._endpoint().output_mode(request)
        return _chat.chat_kwargs(self.model_name, request, mode)

    def _errors_mapped(self) -> contextlib.AbstractContextManager[None]:
        """The SDK's exceptions as Kagura's :class:`~kagura.errors.ProviderError` family."""
        return _chat.errors_mapped(self.id, self._where(), self._hint())

    def _where(self) -> str:
        """The base URL requests go to, without any credentials in it."""
        return _without_credentials(self.base_url or "https://api.openai.com/v1")

    def _hint(self) -> str:
        """For a connection failure: where the base URL came from and how to change it."""
        if self._base_url is not None:
            return " (the agent's base_url)"
        env = self.endpoint.base_url_env
        if env in os.environ:
            return f" (from {env})"
        if self.endpoint.default_base_url is not None:
            return f" ({self.provider}'s default: set {env} or pass base_url= if it runs elsewhere)"
        return ""

    async def request(self, request: ModelRequest) -> ModelResponse:
        client = await _client(self.base_url, self._resolve_key())

        async def send(mode: OutputMode) -> Any:
            with self._errors_mapped():
                response = await _create(client, self._chat_kwargs(request, mode))
                return response.json()

        completion = await self._endpoint().send(request, send)
        return _chat.to_response(completion, self.id)

    supports_streaming = True

    def stream(self, request: ModelRequest) -> AsyncIterator[StreamChunk]:
        """Chat completions with ``stream=True`` (server-sent events): text deltas as the server
        sends them, then the whole answer. Usage is asked for with
        ``stream_options={"include_usage": True}``; a server that ignores it (llama.cpp's)
        leaves the answer's usage unreported. However the iterator ends (finished, closed early,
        cancelled), the HTTP response is closed: a server stops generating when its client goes.
        """

        async def send(mode: OutputMode) -> Any:
            client = await _client(self.base_url, self._resolve_key())
            kwargs = self._chat_kwargs(request, mode)
            kwargs["stream"] = True
            kwargs.setdefault("stream_options", {"include_usage": True})
            with self._errors_mapped():
                return await _create(client, kwargs)

        # Opened through the endpoint, which steps down a response format the server rejects.
        return read_chunks(
            lambda: self._endpoint().send(request, send), self.id, self._stream_errors_mapped
        )

    @contextlib.contextmanager
    def _stream_errors_mapped(self) -> Iterator[None]:
        """:meth:`_errors_mapped`, and the error events a stream can carry part-way."""
        import openai

        try:
            with self._errors_mapped():
                yield
        except openai.APIError as exc:  # the ones with a status or a connection are mapped above
            raise ProviderError(
                f"error event in the stream: {_chat.error_message(exc)}",
                model=self.id,
                body=repr(exc.body)[:2000],
            ) from exc


#: The keyword arguments of ``chat.completions.create`` that are options of the request rather
#: than fields of its body, and the request option each one is.
_REQUEST_OPTIONS = {
    "extra_headers": "headers",
    "extra_query": "params",
    "extra_body": "extra_json",
    "timeout": "timeout",
}


async def _create(client: AsyncOpenAI, kwargs: dict[str, Any]) -> Any:
    """``client.chat.completions.create(**kwargs)``, without the SDK's transform of the body,
    and (unless streaming) without its model of the answer: the HTTP response, body read.

    ``create`` walks every field of the body against the type annotations of its parameters
    (``_transform.py``) to rename aliases and convert iterables: a quarter of the client's CPU
    per call in a fan-out of 1,000 (cProfile, benchmarks/bench_fanout.py), for a body that Kagura
    builds as plain JSON values already. ``client.post`` is the SDK's public way to send a body
    as it is. Keywords ``create`` does not know go into the body (a server's own sampling
    options, say), where ``create`` would refuse them. The SDK's ``ChatCompletion`` built from
    the answer took 120 µs a call, a tenth of that CPU, for the five fields
    :func:`kagura.providers._chat.to_response` reads from the JSON as it is.
    """
    import httpx2
    from openai import AsyncStream
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    body = dict(kwargs)
    options: dict[str, Any] = {}
    for keyword, option in _REQUEST_OPTIONS.items():
        if keyword in body:
            options[option] = body.pop(keyword)
    # The options' keys are those of the SDK's RequestOptions (a TypedDict of a private module).
    return await client.post(  # type: ignore[call-overload]
        "/chat/completions",
        body=body,
        cast_to=ChatCompletion if body.get("stream") else httpx2.Response,
        options=options,
        stream=bool(body.get("stream")),
        stream_cls=AsyncStream[ChatCompletionChunk],
    )


def _without_credentials(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=host))
