"""Model adapters and how a model string picks one.

Model strings:

- ``"local/smollm2"``: the embedded SmolLM2-135M-Instruct (the default with no API key set).
- ``"gpt-4o-mini"`` or ``"openai/gpt-4o-mini"``: OpenAI (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``).
- ``"ollama/llama3.2"``, ``"vllm/..."``, ``"llamacpp/..."``, ``"openrouter/..."``: OpenAI-compatible
  endpoints; their base URLs come from ``OLLAMA_BASE_URL``, ``VLLM_BASE_URL``, ... or ``base_url=``.
- ``"litellm/<model>"``: anything LiteLLM speaks (the ``[litellm]`` extra).
- ``"fake"``: the deterministic fake model (:mod:`kagura.providers.fake`), for tests and benchmarks.

Any other ``"org/model"`` string goes to an OpenAI-compatible server when ``base_url`` is given.

A runtime that serves a provider its own way claims its prefix in its process with
:func:`register_provider` (kagura.ray's workers send ``local/...`` to their model actors).
"""

from __future__ import annotations

from collections.abc import Callable
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
    "model_id",
    "register_provider",
    "resolve_model",
]

# Set by kagura.testing.override_model(): a model instance every agent uses, whatever it names.
model_override_var: ContextVar[Model | None] = ContextVar("kagura_model_override", default=None)

# Prefixes claimed by register_provider(), asked before the built-in providers.
_registered: dict[str, Callable[[str], Model]] = {}


def register_provider(prefix: str, factory: Callable[[str], Model] | None) -> None:
    """In this process, make ``"<prefix>/<name>"`` model strings resolve to ``factory(name)``,
    before any built-in provider of that prefix; ``None`` gives the prefix back to them.

    For a runtime that serves a provider its own way: kagura.ray's workers claim ``local`` so
    that the embedded model runs in its model actors. The default model and
    ``KAGURA_MODEL_OVERRIDE`` resolve through it too. A model string resolves to one model per
    process, so models resolved before the call are forgotten: agents get the new ones from
    their next call on. ``factory`` must be cheap (it runs at agent definition, to check the
    string) and raise :class:`~kagura.errors.UsageError` for a name it does not serve.
    """
    if not prefix or "/" in prefix:
        raise UsageError(f"a provider prefix is a name without '/', got {prefix!r}")
    if factory is None:
        _registered.pop(prefix, None)
    else:
        _registered[prefix] = factory
    _parse.cache_clear()


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
        # A blank string names no model, as None does.
        return _parse(_name(spec) or _settings.default_model(), base_url, api_key)
    return spec


def model_id(spec: str) -> str:
    """The ``provider/model`` id of the model a model string names, as an agent resolves it:
    ``"gpt-4o-mini"`` is ``"openai/gpt-4o-mini"``. For settings kept by model (rate limits),
    which must find the model whatever string an agent named it by. Neither override applies:
    they replace the model of a call, not the names settings are kept under."""
    name = _name(spec) if isinstance(spec, str) else None
    if not name:
        raise UsageError(
            f"a model string names a model, such as 'openai/gpt-4o-mini', got {spec!r}"
        )
    return _parse(name, None, None).id


def _known_providers() -> frozenset[str]:
    """The provider prefixes a model string can name in this process: the built-in ones and
    those claimed with :func:`register_provider`."""
    from .openai import ENDPOINTS

    return frozenset({*ENDPOINTS, *_registered, "local", "litellm", "fake"})


def _name(spec: str | None) -> str | None:
    # Surrounding spaces are no part of a name (" gpt-4o-mini" was "openai/ gpt-4o-mini").
    return spec and spec.strip()


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
    factory = _registered.get(prefix)
    if factory is not None:
        return factory(rest)
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
    known = ", ".join(sorted(_known_providers()))
    raise UsageError(
        f"unknown model provider {prefix!r} in {spec!r}: use one of {known} as the prefix, "
        f"or pass base_url= to send {spec!r} to an OpenAI-compatible server"
    )
