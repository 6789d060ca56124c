"""Where instrumentation records go. With no sink installed, emitting costs one global check.

Two kinds of sink: a :class:`~kagura._events.Sink` gets a record object per start, finish and
event; a :class:`~kagura._events.SpanSink` (the event store's recorder) gets the :class:`Span`
itself, which already holds everything, so the hot path builds nothing for it. A span sink's
methods are called directly, one loop per hand-over, with no dispatch on the kind of item.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ._context import Span, SpanKind, past_call_deadline
from ._events import Event, Sink, SpanEvent, SpanFinished, SpanSink, SpanStarted, Status
from ._redact import str_of
from ._usage import Usage

_log = logging.getLogger("kagura.instrument")

_sinks: tuple[Sink, ...] = ()
#: Sinks that take the finished :class:`Span` itself (see :class:`SpanSink`): no record is built.
_span_sinks: tuple[SpanSink, ...] = ()
_on_start: tuple[Callable[[Span, dict[str, Any] | None], None], ...] = ()
_on_finish: tuple[Callable[[Span], None], ...] = ()
_on_event: tuple[Callable[[SpanEvent], None], ...] = ()
#: Is anyone listening? Attributes for records are only built when someone will read them.
recording = False
#: Is a :class:`~kagura._events.Sink` installed? It gets record objects, which it may keep, so
#: what they hold must not change after they are made (a span sink takes what it needs at once).
record_sinks = False


def add_sink(sink: Sink | SpanSink) -> None:
    """Send every future instrumentation record to ``sink`` as well."""
    global _sinks, _span_sinks
    if sink in _sinks or sink in _span_sinks:
        return
    if isinstance(sink, SpanSink):
        _span_sinks = (*_span_sinks, sink)
    else:
        _sinks = (*_sinks, sink)
    _refresh()


def remove_sink(sink: Sink | SpanSink) -> None:
    """Stop sending instrumentation records to ``sink`` (nothing happens if it was not added)."""
    global _sinks, _span_sinks
    _sinks = tuple(s for s in _sinks if s is not sink)
    _span_sinks = tuple(s for s in _span_sinks if s is not sink)
    _refresh()


def _refresh() -> None:
    global _on_start, _on_finish, _on_event, recording, record_sinks
    _on_start = tuple(s.span_started for s in _span_sinks)
    _on_finish = tuple(s.span_finished for s in _span_sinks)
    _on_event = tuple(s.span_event for s in _span_sinks)
    recording = bool(_sinks or _span_sinks)
    record_sinks = bool(_sinks)


def sinks() -> tuple[Sink | SpanSink, ...]:
    return (*_span_sinks, *_sinks)


def emit(event: Event) -> None:
    for sink in _sinks:
        # Recording must never change the outcome of the code it records.
        try:
            sink.handle(event)
        except Exception:
            _log.exception("instrumentation sink %r failed; event dropped", sink)


def _failed(handler: Callable[..., None]) -> None:
    # Recording must never change the outcome of the code it records.
    _log.exception("instrumentation sink %r failed; record dropped", handler)


def span_started(span: Span, attributes: dict[str, Any] | None = None) -> None:
    """Open ``span``. Its ``attributes`` (model, inputs, ...) go to the sinks now and are not
    kept on the span: a call in flight keeps nothing alive for the sake of recording it."""
    if recording:
        for handler in _on_start:
            try:
                handler(span, attributes)
            except Exception:
                _failed(handler)
        if _sinks:
            emit(SpanStarted(*_identity(span), attributes if attributes is not None else {}))


def _identity(span: Span) -> tuple[str, str | None, str, SpanKind, str, str, int]:
    """What every record of ``span`` starts with: its ids, kind, name, step key and start."""
    return (
        span.span_id,
        span.parent_id,
        span.run_id,
        span.kind,
        span.name,
        span.step_key,
        span.start_ns,
    )


#: What a span cut short by its agent call's total timeout records as its error.
CUT_SHORT = "cut short by the agent call's total_timeout"


def span_finished(
    span: Span,
    status: Status,
    error: BaseException | None = None,
    *,
    usage: Usage | None = None,
    cost_usd: float | None = None,
    attributes: dict[str, Any] | None = None,
) -> None:
    """Close ``span``: how it ended, and (for an LLM attempt) its tokens and cost, which are
    added to its parent's totals. Called whether or not anyone records: agents read the totals."""
    if status == "cancelled" and past_call_deadline():
        # The agent call's total timeout cancelled what was under way (an LLM attempt, a tool):
        # it is that timeout the record should name, as it does on the agent call's own span.
        status = "timed_out"
        error = TimeoutError(CUT_SHORT)
    close(span, status, error, usage, cost_usd, attributes)
    if recording:
        for handler in _on_finish:
            try:
                handler(span)
            except Exception:
                _failed(handler)
        if _sinks:
            if span.kind == "agent":  # an agent's record carries its attempts' totals
                usage = Usage(span.prompt_tokens, span.completion_tokens)
                cost_usd = span.cost
            emit(
                SpanFinished(
                    *_identity(span),
                    span.end_ns,
                    status,
                    span.error,
                    span.error_type,
                    usage,
                    cost_usd,
                    attributes or {},
                )
            )


def close(
    span: Span,
    status: str,
    error: BaseException | None,
    usage: Usage | None,
    cost_usd: float | None,
    attributes: dict[str, Any] | None,
    end_ns: int | None = None,
) -> None:
    """Fill in how ``span`` ended and add its totals to its parent's."""
    span.end_ns = time.time_ns() if end_ns is None else end_ns
    if error is not None:
        span.error = str_of(error) or type(error).__name__
        span.error_type = type(error).__qualname__
    if span.kind == "llm":
        if usage is not None:
            span.prompt_tokens += usage.prompt_tokens
            span.completion_tokens += usage.completion_tokens
        # A failed attempt with no usage cost nothing; with usage, its price (maybe unknown).
        span.cost = cost_usd if status == "completed" or usage is not None else 0.0
        span.llm_calls += 1
    parent = span.parent
    if parent is not None:
        parent.prompt_tokens += span.prompt_tokens
        parent.completion_tokens += span.completion_tokens
        cost = span.cost
        parent.cost = None if cost is None or parent.cost is None else parent.cost + cost
        parent.llm_calls += span.llm_calls
        parent.retries += span.retries
    span.result = attributes
    span.status = status  # last: a sink on another thread reads "not running" as "all set"


def span_event(span: Span | None, name: str, /, **attributes: Any) -> None:
    if span is not None and name == "retry_wait":
        span.retries += 1
    if recording:
        event = SpanEvent(
            span.span_id if span else None,
            span.run_id if span else None,
            name,
            time.time_ns(),
            attributes,
        )
        for handler in _on_event:
            try:
                handler(event)
            except Exception:
                _failed(handler)
        if _sinks:
            emit(event)


def status_of(error: BaseException) -> Status:
    """The recorded status for a span that ended by raising ``error``."""
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    if isinstance(error, TimeoutError):
        return "timed_out"
    return "failed"


#: Whether the first agent or workflow call has decided to record (see
#: :func:`kagura._recording.ensure_recording`, which reads and sets it through the functions
#: below).
_recording_checked = False


def recording_checked() -> bool:
    """Whether a call has decided whether to record: the default recorder is installed, or
    turned off."""
    return _recording_checked


def mark_recording_checked() -> None:
    """Note that the decision is made: later calls do not make it again."""
    global _recording_checked
    _recording_checked = True


def reset_recording_check() -> None:
    """Let the next call decide again whether to record (after changing KAGURA_RECORD)."""
    global _recording_checked
    _recording_checked = False
