"""Observability: every workflow run, agent call, LLM attempt and tool call, recorded.

Recording is automatic: the first agent or workflow call starts a recorder that writes to
``KAGURA_DB`` (a SQLite path or a ``postgresql://`` URL), else ``KAGURA_HOME/events.db``
(``~/.kagura/events.db``). ``KAGURA_RECORD=0`` turns it off; ``KAGURA_RECORD_CONTENT=hash`` or
``none`` keeps prompts and outputs out of the store. Query it with :class:`EventStore`, or from the
terminal with ``kagura monitor``.

Sinks: anything with a ``handle(event)`` method (the :class:`Sink` protocol) receives every
instrumentation record once installed with :func:`add_sink` (and until :func:`remove_sink`):

- :class:`SpanStarted` when a workflow run, agent call, LLM attempt or tool call starts (its ids,
  kind, name, step key, start time and start attributes: model, inputs);
- :class:`SpanFinished` when it ends (status, error, token usage, cost, end attributes);
- :class:`SpanEvent` for what happens inside a span (a retry wait, a breaker changing state).

:data:`Event` is their union. The records are frozen dataclasses; a sink is called on the
event loop, so it must only enqueue (see :mod:`kagura.observability.otel` for one that exports
to OpenTelemetry).
"""

from .._events import Event, Sink, SpanEvent, SpanFinished, SpanStarted, Status
from .._instrument import add_sink, remove_sink
from ._recorder import Recorder, default_recorder, install_default, uninstall_default
from ._store import EventStore

__all__ = [
    "Event",
    "EventStore",
    "Recorder",
    "Sink",
    "SpanEvent",
    "SpanFinished",
    "SpanStarted",
    "Status",
    "add_sink",
    "default_recorder",
    "install_default",
    "remove_sink",
    "uninstall_default",
]
