"""The records that instrumentation hands to sinks: small, slotted and frozen.

They are built only while a :class:`Sink` is installed (the event store's recorder takes the
spans themselves, see :class:`SpanSink`), so being frozen costs the default path nothing.

Every span (workflow run, agent call, LLM attempt, tool call) produces one :class:`SpanStarted`
and one :class:`SpanFinished`; things that happen inside a span (a retry wait, a breaker changing
state) are :class:`SpanEvent`. Sinks receive them synchronously on the event loop thread, so a
sink must only enqueue: the event store's writer does its I/O elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from ._context import SpanKind
from ._usage import Usage

if TYPE_CHECKING:
    from ._context import Span

Status = Literal["running", "completed", "failed", "cancelled", "timed_out"]


@dataclass(frozen=True, slots=True)
class SpanStarted:
    """Emitted when a span starts."""

    span_id: str
    parent_id: str | None
    run_id: str
    kind: SpanKind
    name: str
    step_key: str
    start_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SpanFinished:
    """Emitted when a span ends: how it ended, its usage and its cost."""

    span_id: str
    parent_id: str | None
    run_id: str
    kind: SpanKind
    name: str
    step_key: str
    start_ns: int
    end_ns: int
    status: Status
    error: str | None = None
    error_type: str | None = None
    usage: Usage | None = None
    cost_usd: float | None = None
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


@dataclass(frozen=True, slots=True)
class SpanEvent:
    """Something that happened inside a span: a retry wait, a breaker state change, ..."""

    span_id: str | None
    run_id: str | None
    name: str
    time_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)


Event = SpanStarted | SpanFinished | SpanEvent


@runtime_checkable
class Sink(Protocol):
    """Receives every instrumentation record (install one with
    :func:`kagura.observability.add_sink`). Called on the event loop: must not block, and what
    it raises is logged and dropped, never seen by the recorded code."""

    def handle(self, event: Event) -> None:
        """Take one instrumentation record."""
        ...


@runtime_checkable
class SpanSink(Protocol):
    """Receives each :class:`~kagura._context.Span` when it starts and when it finishes, and each
    :class:`SpanEvent`.

    Called on the event loop: must not block. Cheaper than :class:`Sink` because nothing is built
    per record. The span must be treated as read-only, and its start ``attributes`` are not kept
    on it: a sink takes what it needs from them when the span starts.
    """

    def span_started(self, span: Span, attributes: dict[str, Any] | None) -> None:
        """Take ``span`` as it starts, with the attributes it was started with."""
        ...

    def span_finished(self, span: Span) -> None:
        """Take ``span`` once it has ended, its status, totals and result filled in."""
        ...

    def span_event(self, event: SpanEvent) -> None:
        """Take something that happened inside a span."""
        ...
