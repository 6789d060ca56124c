"""OpenTelemetry export: Kagura's spans as OTel spans, following the GenAI semantic conventions.

Needs the ``otel`` extra (``pip install 'kagura[otel]'``). Install it once, next to your own OTel
setup::

    from kagura.observability.otel import instrument

    exporter = instrument()                 # the global tracer provider
    exporter = instrument(provider)         # or a provider of your own
    ...
    uninstrument(exporter)

Every workflow run, agent call, LLM attempt and tool call becomes one OTel span, with the same
parent/child tree (a root Kagura span joins whatever OTel span is current where it starts, e.g. a
web request). Retry waits, fallbacks, breaker changes and rate-limit waits become span events.

Span names and attributes:

==================  =======================  ===================================================
Kagura span         OTel span name           attributes
==================  =======================  ===================================================
workflow run        ``workflow {name}``      ``gen_ai.operation.name=invoke_workflow``,
                                             ``gen_ai.workflow.name``
agent call          ``invoke_agent {name}``  ``gen_ai.operation.name=invoke_agent``,
                                             ``gen_ai.agent.name``, ``gen_ai.provider.name``,
                                             ``gen_ai.request.model``, ``gen_ai.usage.*``
                                             (totals over the call's attempts)
LLM attempt         ``chat {model}``         ``gen_ai.operation.name=chat``,
(kind CLIENT)                                ``gen_ai.provider.name`` (and the older
                                             ``gen_ai.system``), ``gen_ai.request.model``,
                                             ``gen_ai.response.model``,
                                             ``gen_ai.response.finish_reasons``,
                                             ``gen_ai.usage.input_tokens``,
                                             ``gen_ai.usage.output_tokens``
tool call           ``execute_tool {name}``  ``gen_ai.operation.name=execute_tool``,
                                             ``gen_ai.tool.name``, ``gen_ai.tool.type=function``
==================  =======================  ===================================================

Every span also carries ``kagura.kind``, ``kagura.span_id`` (the id in Kagura's event store),
``kagura.run_id``, ``kagura.step_key``, ``kagura.status`` and, when the price is known,
``kagura.cost_usd``.

Status: a completed span leaves the OTel status unset (as the OTel spec asks of
instrumentation libraries). A failed or timed-out span gets status ERROR with the error message as
its description, ``error.type`` (the exception's class name) and an ``exception`` event. A
cancelled span is *not* an error: cancellation is how asyncio stops work that is no longer wanted
(a hedged or raced call's losers, a caller's timeout), so its status stays unset and only
``kagura.status="cancelled"`` tells it apart.

Prompts, completions, tool arguments and results, and agent inputs and outputs are exported only
with ``capture_content=True``, as ``gen_ai.input.messages`` / ``gen_ai.output.messages`` (the
conventions' JSON message format), ``gen_ai.tool.call.arguments`` / ``gen_ai.tool.call.result``
and ``kagura.inputs`` / ``kagura.output``; secret-looking keys and values are redacted first.

The model id ``"provider/model"`` gives ``gen_ai.provider.name`` (``openai``, ``openrouter``,
``ollama``, ...; for ``litellm/<provider>/<model>`` the LiteLLM provider, mapped to the
conventions' well-known names) and ``gen_ai.request.model`` (the rest).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._events import Event, SpanEvent, SpanFinished, SpanStarted
from .._instrument import add_sink, remove_sink
from .._redact import scrub
from .._version import __version__
from ..errors import UsageError
from ._content import MAX_TEXT, encode


class OpenTelemetryMissing(UsageError, ImportError):
    """The ``otel`` extra is not installed. Also an ``ImportError``, for ``try: import ...``."""


try:
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.trace import Span as OtelSpan
    from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, TracerProvider
    from opentelemetry.util.types import AttributeValue
except ImportError as _exc:  # pragma: no cover - exercised by a test that hides the package
    raise OpenTelemetryMissing(
        "OpenTelemetry export needs the opentelemetry packages: pip install 'kagura[otel]'"
    ) from _exc

__all__ = ["OpenTelemetryExporter", "OpenTelemetryMissing", "instrument", "uninstrument"]

_log = logging.getLogger("kagura.otel")

# Kagura span kind -> gen_ai.operation.name and the span name's prefix.
_OPERATIONS: dict[str, tuple[str | None, str]] = {
    "workflow": ("invoke_workflow", "workflow"),
    "agent": ("invoke_agent", "invoke_agent"),
    "llm": ("chat", "chat"),
    "tool": ("execute_tool", "execute_tool"),
}
# LiteLLM's provider prefixes -> the conventions' well-known gen_ai.provider.name values.
_LITELLM_PROVIDERS = {
    "anthropic": "anthropic",
    "azure": "azure.ai.openai",
    "azure_ai": "azure.ai.inference",
    "bedrock": "aws.bedrock",
    "cohere": "cohere",
    "deepseek": "deepseek",
    "gemini": "gcp.gemini",
    "groq": "groq",
    "mistral": "mistral_ai",
    "openai": "openai",
    "perplexity": "perplexity",
    "vertex_ai": "gcp.vertex_ai",
    "watsonx": "ibm.watsonx.ai",
    "xai": "x_ai",
}
_MAX_DESCRIPTION = 4096


@dataclass(slots=True)
class _Open:
    span: OtelSpan
    context: Context  # the span as the current span: its children's parent context


def split_model_id(model_id: str) -> tuple[str | None, str]:
    """``("provider", "model")`` from a Kagura model id ``"provider/model"``.

    ``litellm/anthropic/claude-3-5-haiku`` gives ``("anthropic", "claude-3-5-haiku")``: the
    provider LiteLLM talks to, under the conventions' name where there is one.
    """
    provider, sep, name = model_id.partition("/")
    if not sep:
        return None, model_id
    if provider == "litellm":
        inner, sep, rest = name.partition("/")
        if sep and rest:
            return _LITELLM_PROVIDERS.get(inner, inner), rest
    return provider, name


class OpenTelemetryExporter:
    """A Kagura sink that turns spans and span events into OpenTelemetry spans.

    Each OTel span is started when Kagura's span starts (at the same start time, under its
    parent's OTel span) and ended when it finishes; open spans are kept by Kagura span id and
    dropped at their end. At most ``max_open_spans`` are tracked: a span started beyond that (or
    before the exporter was installed) is exported whole when it finishes, without its start
    attributes, and its children do not link to it. It never raises: a failure is logged and the
    record is dropped.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        *,
        capture_content: bool = False,
        max_open_spans: int = 10_000,
    ) -> None:
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        self.tracer: Tracer = provider.get_tracer("kagura", __version__)
        self.capture_content = capture_content
        self.max_open_spans = max_open_spans
        self._open: dict[str, _Open] = {}
        self._warned_full = False

    @property
    def open_spans(self) -> int:
        """How many exported spans have started and not yet finished."""
        return len(self._open)

    def handle(self, event: Event) -> None:
        """Export one record as OpenTelemetry spans and span events (failures are logged)."""
        try:
            if isinstance(event, SpanStarted):
                self._started(event)
            elif isinstance(event, SpanFinished):
                self._finished(event)
            elif isinstance(event, SpanEvent):
                self._event(event)
        except Exception:
            _log.exception("OpenTelemetry export failed; %s dropped", type(event).__name__)

    def close(self) -> None:
        """End the spans still open (marked ``kagura.status="running"``) and forget them."""
        pending, self._open = self._open, {}
        for entry in pending.values():
            try:
                entry.span.set_attribute("kagura.status", "running")
                entry.span.end()
            except Exception:
                _log.exception("OpenTelemetry export failed while closing a span")

    # -- records ------------------------------------------------------------------------------

    def _started(self, event: SpanStarted) -> None:
        if len(self._open) >= self.max_open_spans:
            if not self._warned_full:
                self._warned_full = True
                _log.warning(
                    "OpenTelemetry export: %d spans open; spans starting now are exported only "
                    "when they finish, unlinked from their children",
                    self.max_open_spans,
                )
            return
        attributes = self._base_attributes(event)
        attributes.update(self._start_attributes(event))
        self._open[event.span_id] = self._begin(event, attributes)

    def _begin(
        self, event: SpanStarted | SpanFinished, attributes: dict[str, AttributeValue]
    ) -> _Open:
        parent = self._open.get(event.parent_id) if event.parent_id is not None else None
        span = self.tracer.start_span(
            _span_name(event),
            context=parent.context if parent is not None else None,  # None: the current context
            kind=SpanKind.CLIENT if event.kind == "llm" else SpanKind.INTERNAL,
            attributes=attributes,
            start_time=event.start_ns,
        )
        return _Open(span, trace.set_span_in_context(span))

    def _finished(self, event: SpanFinished) -> None:
        entry = self._open.pop(event.span_id, None)
        if entry is None:
            # Started before this exporter was installed (or while it was full): export it whole.
            if len(self._open) >= self.max_open_spans:
                return
            entry = self._begin(event, self._base_attributes(event))
        span = entry.span
        try:
            span.set_attributes(self._finish_attributes(event))
            if event.status in ("failed", "timed_out"):
                error_type = event.error_type or event.status
                description = _clip(scrub(event.error or error_type), _MAX_DESCRIPTION)
                span.set_attribute("error.type", error_type)
                span.add_event(
                    "exception",
                    {"exception.type": error_type, "exception.message": description},
                    timestamp=event.end_ns,
                )
                span.set_status(Status(StatusCode.ERROR, description))
        finally:
            span.end(end_time=event.end_ns)

    def _event(self, event: SpanEvent) -> None:
        entry = self._open.get(event.span_id) if event.span_id is not None else None
        if entry is None:
            return  # outside any exported span
        span = entry.span
        span.add_event(event.name, _plain_attributes(event.attributes), timestamp=event.time_ns)

    # -- attributes ---------------------------------------------------------------------------

    @staticmethod
    def _base_attributes(event: SpanStarted | SpanFinished) -> dict[str, AttributeValue]:
        attributes: dict[str, AttributeValue] = {
            "kagura.kind": event.kind,
            "kagura.span_id": event.span_id,
            "kagura.run_id": event.run_id,
            "kagura.step_key": event.step_key,
        }
        operation = _OPERATIONS.get(event.kind, (None, ""))[0]
        if operation is not None:
            attributes["gen_ai.operation.name"] = operation
        if event.kind == "workflow":
            attributes["gen_ai.workflow.name"] = event.name
        elif event.kind == "agent":
            attributes["gen_ai.agent.name"] = event.name
        elif event.kind == "tool":
            attributes["gen_ai.tool.name"] = event.name
            attributes["gen_ai.tool.type"] = "function"
        elif event.kind == "llm":
            model_id = str(event.attributes.get("model") or event.name)
            attributes.update(_model_attributes(model_id, legacy=True))
        return attributes

    def _start_attributes(self, event: SpanStarted) -> dict[str, AttributeValue]:
        source = event.attributes
        attributes: dict[str, AttributeValue] = {}
        if event.kind == "agent" and isinstance(source.get("model"), str):
            attributes.update(_model_attributes(source["model"]))
        if not self.capture_content:
            return attributes
        if event.kind == "llm" and "messages" in source:
            attributes["gen_ai.input.messages"] = _json(_input_messages(source["messages"]))
        elif event.kind == "tool" and "arguments" in source:
            attributes["gen_ai.tool.call.arguments"] = _text(source["arguments"])
        elif event.kind in ("agent", "workflow") and "inputs" in source:
            attributes["kagura.inputs"] = _json(source["inputs"])
        return attributes

    def _finish_attributes(self, event: SpanFinished) -> dict[str, AttributeValue]:
        source = event.attributes
        attributes: dict[str, AttributeValue] = {"kagura.status": event.status}
        if event.cost_usd is not None:
            attributes["kagura.cost_usd"] = event.cost_usd
        if event.usage is not None and event.kind in ("llm", "agent"):
            attributes["gen_ai.usage.input_tokens"] = event.usage.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = event.usage.completion_tokens
        if event.kind == "llm":
            response_model = source.get("response_model")
            if isinstance(response_model, str) and response_model:
                attributes["gen_ai.response.model"] = _response_model(
                    response_model, str(source.get("model") or event.name)
                )
            finish_reason = source.get("finish_reason")
            if isinstance(finish_reason, str) and finish_reason:
                attributes["gen_ai.response.finish_reasons"] = (finish_reason,)
        elif event.kind == "agent" and isinstance(source.get("answered_by"), str):
            attributes["kagura.answered_by"] = source["answered_by"]
        if self.capture_content and event.status == "completed" and "output" in source:
            output = source["output"]
            if event.kind == "llm":
                attributes["gen_ai.output.messages"] = _json(
                    [_output_message(output, source.get("finish_reason"), source.get("tool_calls"))]
                )
            elif event.kind == "tool":
                attributes["gen_ai.tool.call.result"] = _text(output)
            else:
                attributes["kagura.output"] = _json(output)
        return attributes


def _span_name(event: SpanStarted | SpanFinished) -> str:
    if event.kind == "llm":
        _, model = split_model_id(str(event.attributes.get("model") or event.name))
        return f"chat {model}"
    prefix = _OPERATIONS.get(event.kind, (None, event.kind))[1]
    return f"{prefix} {event.name}"


def _model_attributes(model_id: str, *, legacy: bool = False) -> dict[str, AttributeValue]:
    provider, model = split_model_id(model_id)
    attributes: dict[str, AttributeValue] = {"gen_ai.request.model": model}
    if provider is not None:
        attributes["gen_ai.provider.name"] = provider
        if legacy:  # the name before semantic conventions 1.37, still read by many backends
            attributes["gen_ai.system"] = provider
    return attributes


def _response_model(response_model: str, model_id: str) -> str:
    """The model that answered, without the Kagura provider prefix that some adapters add."""
    prefix = model_id.partition("/")[0] + "/"
    return response_model.removeprefix(prefix) if "/" in model_id else response_model


def _input_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI-format chat messages in the conventions' ``{"role", "parts"}`` format."""
    converted: list[dict[str, Any]] = []
    for message in messages if isinstance(messages, Sequence) else ():
        if not isinstance(message, Mapping):
            continue
        role = str(message.get("role") or "user")
        parts: list[dict[str, Any]] = []
        if role == "tool":
            parts.append(
                {
                    "type": "tool_call_response",
                    "id": message.get("tool_call_id"),
                    "response": message.get("content"),
                }
            )
        else:
            parts.extend(_content_parts(message.get("content")))
            for call in message.get("tool_calls") or ():
                if not isinstance(call, Mapping):
                    continue
                function = call.get("function")
                if not isinstance(function, Mapping):
                    function = {}
                parts.append(
                    _tool_call_part(call.get("id"), function.get("name"), function.get("arguments"))
                )
        converted.append({"role": role, "parts": parts})
    return converted


def _tool_call_part(call_id: Any, name: Any, arguments: Any) -> dict[str, Any]:
    return {"type": "tool_call", "id": call_id, "name": name, "arguments": _maybe_json(arguments)}


def _content_parts(content: Any) -> list[dict[str, Any]]:
    if content is None or content == "":
        return []
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    if isinstance(content, Sequence):
        parts: list[dict[str, Any]] = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                parts.append({"type": "text", "content": part.get("text")})
            elif isinstance(part, Mapping):
                parts.append({"type": str(part.get("type") or "unknown")})
            else:
                parts.append({"type": "text", "content": str(part)})
        return parts
    return [{"type": "text", "content": content}]


def _output_message(text: Any, finish_reason: Any, tool_calls: Any) -> dict[str, Any]:
    parts = _content_parts(text)
    for call in tool_calls if isinstance(tool_calls, Sequence) else ():
        if isinstance(call, Mapping):
            parts.append(_tool_call_part(call.get("id"), call.get("name"), call.get("arguments")))
    message: dict[str, Any] = {"role": "assistant", "parts": parts}
    if isinstance(finish_reason, str) and finish_reason:
        message["finish_reason"] = finish_reason
    return message


def _maybe_json(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _json(value: Any) -> str:
    """Redacted JSON text of a recorded value (truncated like the event store's)."""
    return encode(value, "full") or "null"


def _text(value: Any) -> str:
    """Redacted text: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return _clip(scrub(value), MAX_TEXT)
    return _json(value)


def _clip(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _plain_attributes(source: Mapping[str, Any]) -> dict[str, AttributeValue]:
    """Span-event attributes as OTel accepts them: scalars, or text; ``None`` values left out."""
    attributes: dict[str, AttributeValue] = {}
    for key, value in source.items():
        if value is None:
            continue
        if isinstance(value, bool | int | float):
            attributes[key] = value
        elif isinstance(value, str):
            attributes[key] = _clip(scrub(value), _MAX_DESCRIPTION)
        else:
            attributes[key] = _json(value)
    return attributes


def instrument(
    tracer_provider: TracerProvider | None = None, *, capture_content: bool = False
) -> OpenTelemetryExporter:
    """Export every Kagura span from now on to OpenTelemetry; returns the installed exporter.

    ``tracer_provider`` defaults to the global one (``opentelemetry.trace.set_tracer_provider``).
    ``capture_content=True`` also exports prompts, completions, tool arguments and results and
    agent inputs and outputs, with secrets redacted. Each call installs another exporter: call it
    once, and pass the result to :func:`uninstrument` to stop.
    """
    exporter = OpenTelemetryExporter(tracer_provider, capture_content=capture_content)
    add_sink(exporter)
    return exporter


def uninstrument(exporter: OpenTelemetryExporter) -> None:
    """Stop exporting through ``exporter``; spans still open are ended as they are."""
    remove_sink(exporter)
    exporter.close()
