"""Where instrumentation records go. With no sink installed, emitting costs one tuple check."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ._context import Span
from ._events import Event, Sink, SpanEvent, SpanFinished, SpanStarted, Status
from ._usage import Usage

_log = logging.getLogger("kagura.instrument")

_sinks: tuple[Sink, ...] = ()


def add_sink(sink: Sink) -> None:
    """Send every future instrumentation record to ``sink`` as well."""
    global _sinks
    if sink not in _sinks:
        _sinks = (*_sinks, sink)


def remove_sink(sink: Sink) -> None:
    global _sinks
    _sinks = tuple(s for s in _sinks if s is not sink)


def sinks() -> tuple[Sink, ...]:
    return _sinks


def emit(event: Event) -> None:
    for sink in _sinks:
        # Recording must never change the outcome of the code it records.
        try:
            sink.handle(event)
        except Exception:
            _log.exception("instrumentation sink %r failed; event dropped", sink)


def span_started(span: Span, attributes: dict[str, Any] | None = None) -> None:
    if _sinks:
        emit(
            SpanStarted(
                span.span_id,
                span.parent_id,
                span.run_id,
                span.kind,
                span.name,
                span.step_key,
                span.start_ns,
                attributes if attributes is not None else {},
            )
        )


def span_finished(
    span: Span,
    status: Status,
    error: BaseException | None = None,
    *,
    usage: Usage | None = None,
    cost_usd: float | None = None,
    attributes: dict[str, Any] | None = None,
) -> None:
    if _sinks:
        emit(
            SpanFinished(
                span.span_id,
                span.parent_id,
                span.run_id,
                span.kind,
                span.name,
                span.step_key,
                span.start_ns,
                time.time_ns(),
                status,
                None if error is None else (str(error) or type(error).__name__),
                None if error is None else type(error).__qualname__,
                usage,
                cost_usd,
                attributes or {},
            )
        )


def span_event(span: Span | None, name: str, /, **attributes: Any) -> None:
    if _sinks:
        emit(
            SpanEvent(
                span.span_id if span else None,
                span.run_id if span else None,
                name,
                time.time_ns(),
                attributes,
            )
        )


def status_of(error: BaseException) -> Status:
    """The recorded status for a span that ended by raising ``error``."""
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    if isinstance(error, TimeoutError):
        return "timed_out"
    return "failed"


_recording_checked = False


def ensure_recording() -> None:
    """Install the default recorder on the first agent or workflow call, unless turned off.

    Deferred to the first call so that ``import kagura`` stays light; after that it is one global
    check per call.
    """
    global _recording_checked
    if _recording_checked:
        return
    _recording_checked = True
    from . import _settings

    if _settings.recording_enabled():
        from .observability._recorder import install_default

        install_default()


def reset_recording_check() -> None:
    """Let the next call decide again whether to record (after changing KAGURA_RECORD)."""
    global _recording_checked
    _recording_checked = False
