"""LiteLLM, for the providers that do not speak the OpenAI chat-completions API (the
``[litellm]`` extra).

LiteLLM answers in the OpenAI response shape, so the OpenAI adapter's response and chunk readers
are reused. Its exceptions subclass the ``openai`` SDK's (which LiteLLM brings), and are mapped
to Kagura's here. Importing it takes seconds, so it is imported by
:meth:`LiteLLMModel.prepare`, off the event loop.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

from ..errors import ProviderConnectionError, ProviderError, ProviderTimeout, UsageError
from ._base import Model, ModelRequest, ModelResponse, OutputMode, StreamChunk
from ._chat import Endpoint, chat_kwargs, error_message, status_error, to_response
from ._chunks import read_chunks
from ._setup import SharedSetUp

_INSTALL_HINT = "litellm/... models need LiteLLM: pip install 'kagura[litellm]'"


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

    @property
    def supports_tools(self) -> bool:  # type: ignore[override]
        return not self._endpoint.native_tools_rejected

    def check_ready(self) -> None:
        """Raise :class:`~kagura.errors.UsageError` if LiteLLM is not installed."""
        # Found, not imported: the import is the slow part of set-up, left to prepare().
        if importlib.util.find_spec("litellm") is None:
            raise UsageError(_INSTALL_HINT)

    async def prepare(self) -> None:
        """Import LiteLLM (once per process, off the event loop)."""
        await _litellm()
        self.prepared = True

    async def request(self, request: ModelRequest) -> ModelResponse:
        """Send ``request`` through ``litellm.acompletion``, its errors mapped to Kagura's."""
        litellm = _import_litellm()

        async def send(mode: OutputMode) -> Any:
            with self._errors_mapped():
                return await litellm.acompletion(**self._kwargs(request, mode))

        completion = await self._endpoint.send(request, send)
        return to_response(completion, self.id)

    def _kwargs(self, request: ModelRequest, mode: OutputMode) -> dict[str, Any]:
        """The keyword arguments of ``litellm.acompletion`` for ``request``."""
        kwargs = chat_kwargs(self.model_name, request, mode)
        kwargs["num_retries"] = 0
        if self._base_url:
            kwargs["api_base"] = self._base_url
        if self._api_key:
            kwargs["api_key"] = self._api_key
        return kwargs

    def _errors_mapped(self) -> contextlib.AbstractContextManager[None]:
        """LiteLLM's exceptions (subclasses of the ``openai`` SDK's) as Kagura's."""
        return _errors_mapped(self.id, f"LiteLLM ({self.model_name})")

    supports_streaming = True

    def stream(self, request: ModelRequest) -> AsyncIterator[StreamChunk]:
        """``litellm.acompletion(stream=True)``: text deltas, then the whole answer (with usage
        when the provider reports it). The stream is closed however the iterator ends."""

        async def send(mode: OutputMode) -> AsyncGenerator[dict[str, Any], None]:
            kwargs = self._kwargs(request, mode)
            kwargs["stream"] = True
            kwargs.setdefault("stream_options", {"include_usage": True})
            with self._errors_mapped():
                stream = await _import_litellm().acompletion(**kwargs)
            return self._chunks(stream)

        return read_chunks(lambda: self._endpoint.send(request, send), self.id)

    async def _chunks(self, stream: Any) -> AsyncGenerator[dict[str, Any], None]:
        """LiteLLM's stream as the JSON objects of its chunks, closed however it ends."""
        try:
            while True:
                with self._errors_mapped():
                    try:
                        chunk = await anext(stream)
                    except StopAsyncIteration:
                        return
                yield chunk.model_dump()
        finally:
            await stream.aclose()


@contextlib.contextmanager
def _errors_mapped(model_id: str, where: str) -> Iterator[None]:
    """The ``openai`` SDK's exceptions, which LiteLLM's subclass, as Kagura's
    :class:`~kagura.errors.ProviderError` family. ``where`` names the endpoint."""
    import openai

    try:
        yield
    except openai.APITimeoutError as exc:
        dropped = _dropped_connection(exc)
        if dropped is None:
            raise ProviderTimeout(f"request to {where} timed out", model=model_id) from exc
        raise ProviderConnectionError(
            f"connection to {where} failed: {type(dropped).__name__}: {dropped}", model=model_id
        ) from exc
    except openai.APIConnectionError as exc:
        raise ProviderConnectionError(
            f"connection to {where} failed: {_connection_detail(exc)}", model=model_id
        ) from exc
    except openai.APIStatusError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        raise status_error(
            model_id,
            exc.status_code,
            exc.response.headers,
            _body_of(exc.response),
            error_message(body) or str(exc.message),
        ) from exc
    except openai.APIError as exc:  # an error event part-way through a stream
        raise ProviderError(
            f"error event in the stream: {exc.message}", model=model_id, body=repr(exc.body)[:2000]
        ) from exc
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # LiteLLM raises these when a body is not the JSON it expects.
        raise ProviderError(f"malformed response: {exc}", model=model_id) from exc


def _dropped_connection(exc: BaseException) -> BaseException | None:
    """A "timeout" that is a connection the server closed or reset. An aiohttp transport under
    the SDK maps every ``aiohttp.ClientConnectionError`` to a connect timeout, a server that
    hung up without answering and a reset included; aiohttp's own timeouts are
    ``TimeoutError``s. Returns aiohttp's error, if so."""
    seen: set[int] = set()
    current: BaseException | None = exc.__cause__ or exc.__context__
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TimeoutError):
            return None
        if type(current).__module__.startswith("aiohttp"):
            return current
        current = current.__cause__ or current.__context__
    return None


def _body_of(response: Any) -> str | None:
    """The start of an error response's body, if it was read (LiteLLM makes up responses)."""
    try:
        return str(response.text)[:2000]
    except Exception:  # httpx's ResponseNotRead, or a response that is not httpx's
        return None


def _connection_detail(exc: BaseException) -> str:
    """The first informative message down the cause chain (httpx errors often have none)."""
    seen: set[int] = set()
    current: BaseException | None = exc.__cause__ or exc.__context__
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if str(current):
            return f"{type(current).__name__}: {current}"
        current = current.__cause__ or current.__context__
    return type(exc.__cause__ or exc).__name__


def _import_litellm() -> Any:
    try:
        import litellm
    except ImportError:
        raise UsageError(_INSTALL_HINT) from None
    return litellm


def _set_up() -> None:
    _import_litellm()
    import genai_prices  # noqa: F401  # kagura.pricing's, off the event loop too


_litellm = SharedSetUp(_set_up, "kagura-litellm-import")
