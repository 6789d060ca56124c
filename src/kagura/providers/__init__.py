"""Model adapters and how a model string picks one.

Model strings:

- ``"local/smollm2"``: the embedded SmolLM2-135M-Instruct (the default with no API key set).
- ``"gpt-4o-mini"`` or ``"openai/gpt-4o-mini"``: OpenAI (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``).
- ``"ollama/llama3.2"``, ``"vllm/..."``, ``"llamacpp/..."``, ``"openrouter/..."``: OpenAI-compatible
  endpoints; their base URLs come from ``OLLAMA_BASE_URL``, ``VLLM_BASE_URL``, ... or ``base_url=``.
- ``"litellm/<model>"``: anything LiteLLM speaks (the ``[litellm]`` extra).
- ``"fake"``: the deterministic fake model (:mod:`kagura.providers.fake`), for tests and benchmarks.

Any other ``"org/model"`` string goes to an OpenAI-compatible server when ``base_url`` is given.
"""

from __future__ import annotations

from contextvars import ContextVar
from functools import lru_cache

from .. import _settings
from ..errors import UsageError
from ._base import (
    OUTPUT_MODES,
    TOOL_MODES,
    Message,
    Model,
    ModelRequest,
    ModelResponse,
    OutputMode,
    OutputSchema,
    Profile,
    StreamChunk,
    ToolCall,
    ToolMode,
    ToolSpec,
)

__all__ = [
    "OUTPUT_MODES",
    "TOOL_MODES",
    "Message",
    "Model",
    "ModelRequest",
    "ModelResponse",
    "OutputMode",
    "OutputSchema",
    "Profile",
    "StreamChunk",
    "ToolCall",
    "ToolMode",
    "ToolSpec",
    "resolve_model",
]

# Set by kagura.testing.override_model(): a model instance every agent uses, whatever it names.
model_override_var: ContextVar[Model | None] = ContextVar("kagura_model_override", default=None)


def resolve_model(
    spec: str | Model | None, *, base_url: str | None = None, api_key: str | None = None
) -> Model:
    """The model an agent call uses, after the test override and ``KAGURA_MODEL_OVERRIDE``."""
    forced = model_override_var.get()
    if forced is not None:
        return forced
    override = _settings.model_override()
    if override is not None:
        # The override replaces the model, so endpoint settings meant for the old one don't apply.
        return _parse(override, None, None)
    # Asked about str rather than Model: isinstance against an ABC is slow, and every call asks.
    if spec is None or isinstance(spec, str):
        return _parse(spec or _settings.default_model(), base_url, api_key)
    return spec


@lru_cache(maxsize=256)
def _parse(spec: str, base_url: str | None, api_key: str | None) -> Model:
    from .openai import ENDPOINTS, OpenAIChatModel

    prefix, sep, rest = spec.partition("/")
    if not sep:
        if spec == "fake":
            from .fake import FakeModel

            # Shared by every agent naming "fake" (benchmarks): keep no request history.
            return FakeModel(record_requests=False)
        return OpenAIChatModel(spec, base_url=base_url, api_key=api_key)
    if not rest:
        raise UsageError(f"model string {spec!r} names no model after {prefix + '/'!r}")
    if prefix == "local":
        from .local import LocalModel

        return LocalModel(rest)
    if prefix == "fake":
        from .fake import FakeModel

        return FakeModel(name=rest, record_requests=False)
    if prefix == "litellm":
        from .litellm import LiteLLMModel

        return LiteLLMModel(rest, base_url=base_url, api_key=api_key)
    endpoint = ENDPOINTS.get(prefix)
    if endpoint is not None:
        return OpenAIChatModel(rest, endpoint=endpoint, base_url=base_url, api_key=api_key)
    if base_url is not None:
        return OpenAIChatModel(spec, base_url=base_url, api_key=api_key)
    known = ", ".join(sorted([*ENDPOINTS, "local", "litellm", "fake"]))
    raise UsageError(
        f"unknown model provider {prefix!r} in {spec!r}: use one of {known} as the prefix, "
        f"or pass base_url= to send {spec!r} to an OpenAI-compatible server"
    )
