"""LiteLLM, for the providers the ``openai`` SDK does not speak (the ``[litellm]`` extra).

LiteLLM answers in the OpenAI response shape, so the OpenAI adapter's response reader is reused.
Its exceptions subclass the ``openai`` SDK's, and are translated the same way. Importing it takes
seconds, so it is imported by :meth:`LiteLLMModel.prepare`, off the event loop.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import AsyncIterator
from typing import Any

from ..errors import UsageError
from ._base import Model, ModelRequest, ModelResponse, OutputMode, StreamChunk
from ._chat import Endpoint, chat_kwargs, errors_mapped, to_response
from ._chunks import read_chunks
from ._setup import SharedSetUp

_INSTALL_HINT = "litellm/... models need LiteLLM: pip install 'kagura[litellm]'"


class LiteLLMModel(Model):
    provider = "litellm"
    supports_output_schema = True

    def __init__(
        self, model_name: str, *, base_url: str | None = None, api_key: str | None = None
    ) -> None:
        self.model_name = model_name
        self._base_url = base_url
        self._api_key = api_key
        self.prepared = False
        # LiteLLM translates the json_schema response format for the providers it speaks.
        self._endpoint = Endpoint(self.provider, base_url, model_name, "json_schema")

    @property
    def supports_tools(self) -> bool:  # type: ignore[override]
        return not self._endpoint.native_tools_rejected

    def check_ready(self) -> None:
        # Found, not imported: the import is the slow part of set-up, left to prepare().
        if importlib.util.find_spec("litellm") is None:
            raise UsageError(_INSTALL_HINT)

    async def prepare(self) -> None:
        await _litellm()
        self.prepared = True

    async def request(self, request: ModelRequest) -> ModelResponse:
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
        return errors_mapped(self.id, f"LiteLLM ({self.model_name})")

    supports_streaming = True

    def stream(self, request: ModelRequest) -> AsyncIterator[StreamChunk]:
        """``litellm.acompletion(stream=True)``: text deltas, then the whole answer (with usage
        when the provider reports it). The stream is closed however the iterator ends."""

        async def send(mode: OutputMode) -> Any:
            kwargs = self._kwargs(request, mode)
            kwargs["stream"] = True
            kwargs.setdefault("stream_options", {"include_usage": True})
            with self._errors_mapped():
                return await _import_litellm().acompletion(**kwargs)

        return read_chunks(lambda: self._endpoint.send(request, send), self.id, self._errors_mapped)


def _import_litellm() -> Any:
    try:
        import litellm
    except ImportError:
        raise UsageError(_INSTALL_HINT) from None
    return litellm


_litellm = SharedSetUp(_import_litellm, "kagura-litellm-import")
