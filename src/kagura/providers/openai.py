"""OpenAI and every OpenAI-compatible endpoint (Ollama, vLLM, llama.cpp server, OpenRouter, ...).

One adapter, many endpoints: an :class:`Endpoint` owns where to connect and which credentials to
use; :class:`OpenAIChatModel` owns the chat-completions request and its answer; the HTTP is
:mod:`kagura.providers._http`'s (aiohttp), imported on first use so that ``import kagura`` stays
fast, in a thread of its own (see :meth:`prepare`).
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from ..errors import MissingCredentialsError
from . import _chat, _http
from ._base import Model, ModelRequest, ModelResponse, OutputMode, Profile, StreamChunk
from ._chunks import read_chunks
from ._http import KEEPALIVE_SECONDS as KEEPALIVE_SECONDS  # each client's pool, re-exported
from ._http import MAX_CONNECTIONS as MAX_CONNECTIONS
from ._setup import SharedSetUp

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

# Shared by every model: the import of aiohttp (and the TLS context) is done once per process.
_wire = SharedSetUp(_http.load, "kagura-http-import")


class OpenAIChatModel(Model):
    """Chat completions over HTTP, against OpenAI or any compatible base URL.

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
        self.provider: str = endpoint.name
        self.model_name = model_name
        self.endpoint = endpoint
        self.profile: Profile = profile or endpoint.profile
        self._base_url = base_url
        self._api_key = api_key
        self.prepared: bool = False
        self._learned: _chat.Endpoint | None = None
        self._credentials: _http.Auth | None = None

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

    def _auth(self) -> _http.Auth:
        """The credentials of this model's requests, rebuilt when the base URL's or the key's
        environment variable changed."""
        base_url, key = self.base_url, self._resolve_key()
        auth = self._credentials
        if auth is None or auth.base_url != base_url or auth.api_key != key:
            auth = self._credentials = _http.Auth(base_url, key)
        return auth

    def check_ready(self) -> None:
        """Raise :class:`~kagura.errors.MissingCredentialsError` if the endpoint needs an API key
        and none is given or set."""
        self._resolve_key()

    async def prepare(self) -> None:
        """Import aiohttp and load the TLS certificates (off the event loop), and make the
        client of the running loop. On an event loop started later, the first request makes
        that loop's client (a millisecond: nothing is imported or loaded)."""
        await _wire()
        self._auth()  # a missing key is refused here, before any request
        await _http.client(self.base_url)
        self.prepared = True

    def _chat_kwargs(self, request: ModelRequest, mode: OutputMode | None = None) -> dict[str, Any]:
        """The keyword arguments of ``chat.completions.create`` for ``request``, its output
        schema asked for in ``mode`` (by default what the endpoint accepts)."""
        if mode is None:
            mode = self._endpoint().output_mode(request)
        return _chat.chat_kwargs(self.model_name, request, mode)

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
        """Send ``request`` to the chat-completions endpoint and return its answer."""
        auth = self._auth()
        client = await _http.client(self.base_url)

        async def send(mode: OutputMode) -> Any:
            kwargs = self._chat_kwargs(request, mode)
            return await client.complete(kwargs, self.id, self._hint(), auth)

        completion = await self._endpoint().send(request, send)
        return _chat.to_response(completion, self.id, secret=auth.secrets_for(request.extra))

    supports_streaming = True

    def stream(self, request: ModelRequest) -> AsyncIterator[StreamChunk]:
        """Chat completions with ``stream=True`` (server-sent events): text deltas as the server
        sends them, then the whole answer. Usage is asked for with
        ``stream_options={"include_usage": True}``; a server that ignores it (llama.cpp's)
        leaves the answer's usage unreported. However the iterator ends (finished, closed early,
        cancelled), the HTTP response is closed: a server stops generating when its client goes.
        """

        async def send(mode: OutputMode) -> AsyncGenerator[dict[str, Any], None]:
            auth = self._auth()
            client = await _http.client(self.base_url)
            kwargs = self._chat_kwargs(request, mode)
            kwargs["stream"] = True
            kwargs.setdefault("stream_options", {"include_usage": True})
            return await client.stream(kwargs, self.id, self._hint(), auth)

        # Opened through the endpoint, which steps down a response format the server rejects.
        return read_chunks(lambda: self._endpoint().send(request, send), self.id)
