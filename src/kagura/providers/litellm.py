"""LiteLLM, for the providers the ``openai`` SDK does not speak (the ``[litellm]`` extra).

LiteLLM answers in the OpenAI response shape, so the OpenAI adapter's response reader is reused.
Its exceptions subclass the ``openai`` SDK's, and are translated the same way. Importing it takes
seconds, so it is imported by :meth:`LiteLLMModel.prepare`, off the event loop.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

from ..errors import ProviderConnectionError, ProviderError, ProviderTimeout, UsageError
from ._base import Model, ModelRequest, ModelResponse, StreamChunk
from ._chunks import read_chunks
from ._setup import SharedSetUp
from .openai import _error_message, _to_response

_INSTALL_HINT = "litellm/... models need LiteLLM: pip install 'kagura[litellm]'"


class LiteLLMModel(Model):
    provider = "litellm"
    supports_output_schema = True
    supports_tools = True

    def __init__(
        self, model_name: str, *, base_url: str | None = None, api_key: str | None = None
    ) -> None:
        self.model_name = model_name
        self._base_url = base_url
        self._api_key = api_key
        self.prepared = False

    def check_ready(self) -> None:
        # Found, not imported: the import is the slow part of set-up, left to prepare().
        if importlib.util.find_spec("litellm") is None:
            raise UsageError(_INSTALL_HINT)

    async def prepare(self) -> None:
        await _litellm()
        self.prepared = True

    async def request(self, request: ModelRequest) -> ModelResponse:
        litellm = _import_litellm()
        with self._errors_mapped():
            completion = await litellm.acompletion(**self._kwargs(request))
        return _to_response(completion, self.id)

    def _kwargs(self, request: ModelRequest) -> dict[str, Any]:
        """The keyword arguments of ``litellm.acompletion`` for ``request``."""
        kwargs: dict[str, Any] = {
            "model": self.model_name,
            "messages": request.messages,
            "num_retries": 0,
        }
        if self._base_url:
            kwargs["api_base"] = self._base_url
        if self._api_key:
            kwargs["api_key"] = self._api_key
        if request.temperature is not None:
            kwargs["temperature"] = request.temperature
        if request.max_tokens is not None:
            kwargs["max_tokens"] = request.max_tokens
        if request.output_schema is not None:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": request.output_schema.name,
                    "schema": request.output_schema.schema,
                },
            }
        if request.tools:
            kwargs["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters,
                    },
                }
                for t in request.tools
            ]
        kwargs.update(request.extra)
        return kwargs

    @contextlib.contextmanager
    def _errors_mapped(self) -> Iterator[None]:
        """LiteLLM's exceptions (subclasses of the ``openai`` SDK's) as Kagura's."""
        import openai

        try:
            yield
        except openai.APITimeoutError as exc:
            raise ProviderTimeout("request timed out", model=self.id) from exc
        except openai.APIConnectionError as exc:
            raise ProviderConnectionError(f"connection failed: {exc}", model=self.id) from exc
        except openai.APIStatusError as exc:
            raise ProviderError(
                _error_message(exc),
                model=self.id,
                status_code=exc.status_code,
                headers=dict(exc.response.headers),
            ) from exc

    supports_streaming = True

    def stream(self, request: ModelRequest) -> AsyncIterator[StreamChunk]:
        """``litellm.acompletion(stream=True)``: text deltas, then the whole answer (with usage
        when the provider reports it). The stream is closed however the iterator ends."""

        def open_stream() -> Awaitable[Any]:
            kwargs = self._kwargs(request)
            kwargs["stream"] = True
            kwargs.setdefault("stream_options", {"include_usage": True})
            return _import_litellm().acompletion(**kwargs)  # type: ignore[no-any-return]

        return read_chunks(open_stream, self.id, self._errors_mapped)


def _import_litellm() -> Any:
    try:
        import litellm
    except ImportError:
        raise UsageError(_INSTALL_HINT) from None
    return litellm


_litellm = SharedSetUp(_import_litellm, "kagura-litellm-import")
