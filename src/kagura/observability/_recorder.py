"""The recorder: an instrumentation sink that writes every span and event to the event store.

On the event loop it only appends the finished (or started) :class:`~kagura._context.Span` to a
deque: the span already carries its subtree's tokens, cost, LLM calls and retries (see
:func:`kagura._instrument.close`), so nothing is built there. A writer thread turns a batch into
rows and writes it in one transaction. So recording never blocks the loop on disk I/O, never
touches the recorded function's result or exception, and nothing is lost on exit: an ``atexit``
hook flushes what is queued.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pydantic_core

from .. import _settings
from .._context import Span
from .._events import Event, SpanEvent, SpanFinished, SpanStarted
from .._instrument import close
from ._content import MAX_TEXT, ContentMode, encode, looks_secret, repr_of, scrub, truncated

_log = logging.getLogger("kagura.recorder")

_EMPTY: dict[str, Any] = {}

#: The spans table's columns in the order of the rows :meth:`Recorder._row` builds.
SPAN_COLUMNS = (
    "span_id",
    "run_id",
    "parent_id",
    "kind",
    "name",
    "step_key",
    "status",
    "started_at",
    "ended_at",
    "duration_ms",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "llm_calls",
    "retries",
    "error",
    "error_type",
    "inputs",
    "output",
    "attributes",
    "pid",
)
#: Where the columns holding recorded content (stored as JSON text) are in a row.
_CONTENT_AT = tuple(SPAN_COLUMNS.index(c) for c in ("inputs", "output", "attributes"))
_ATTRIBUTES_AT = SPAN_COLUMNS.index("attributes")  # not content: never hashed or dropped


class _FlushMarker:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class Recorder:
    """Writes instrumentation records to the store at ``url`` (a SQLite path or a database URL)
    from a background thread."""

    def __init__(
        self,
        url: str | Path,
        *,
        content: ContentMode | None = None,
        flush_interval: float = 0.05,
        batch_size: int = 5000,
    ) -> None:
        from ._engine import normalise_url

        self.url = normalise_url(url)
        #: Set when the store could not be opened: nothing is being recorded.
        self.broken = False
        self.content: ContentMode = content or _settings.record_content()  # type: ignore[assignment]
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self._queue: deque[Span | SpanEvent | _FlushMarker] = deque()
        self._wake = threading.Event()
        self._stopping = False
        # Spans given as records (handle), by id, until they finish: their children's totals
        # are added to them, as running code adds them to live spans.
        self._detached: dict[str, Span] = {}
        self._pid = os.getpid()
        self.written_spans = 0
        self.written_events = 0
        self.failed_batches = 0
        self._thread = threading.Thread(target=self._run, name="kagura-recorder", daemon=True)
        self._thread.start()

    # -- on the event loop ----------------------------------------------------------------

    def handle_span(self, item: Span | SpanEvent) -> None:
        if not self.broken:  # a store that cannot be opened must not grow the queue forever
            self._queue.append(item)

    def handle(self, event: Event) -> None:
        """Take a record object (for producers other than Kagura's own instrumentation)."""
        if isinstance(event, SpanStarted):
            span = self._span_of(event)
            span.attributes = dict(event.attributes)
            self._detached[event.span_id] = span
            self.handle_span(span)
        elif isinstance(event, SpanFinished):
            span = self._detached.pop(event.span_id, None) or self._span_of(event)  # type: ignore[arg-type]
            span.error, span.error_type = event.error, event.error_type
            close(
                span,
                event.status,
                None,
                event.usage,
                event.cost_usd,
                dict(event.attributes),
                end_ns=event.end_ns,
            )
            self.handle_span(span)
        else:
            if event.name == "retry_wait" and event.span_id in self._detached:
                self._detached[event.span_id].retries += 1
            self.handle_span(event)

    def _span_of(self, event: SpanStarted | SpanFinished) -> Span:
        parent = self._detached.get(event.parent_id) if event.parent_id else None
        return Span.detached(
            event.kind,  # type: ignore[arg-type]
            event.name,
            event.span_id,
            event.parent_id,
            event.run_id,
            event.step_key,
            event.start_ns,
            parent,
        )

    # -- anywhere -------------------------------------------------------------------------

    def flush(self, timeout: float = 30.0) -> bool:
        """Block until everything queued so far is written (or ``timeout`` passes)."""
        if not self._thread.is_alive():
            return False
        marker = _FlushMarker()
        self._queue.append(marker)
        self._wake.set()
        return marker.done.wait(timeout) and not self.broken

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    # -- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        from ._engine import engine_for

        try:
            engine = engine_for(self.url)
        except Exception:
            _log.exception("kagura: cannot open the event store; recording is off")
            self.broken = True
            self._fail_pending()
            return
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            self._drain(engine)
            if self._stopping and not self._queue:
                return

    def _fail_pending(self) -> None:
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, _FlushMarker):
                item.done.set()

    def _drain(self, engine: Any) -> None:
        queue = self._queue
        while queue:
            running: list[Span] = []
            finished: list[Span] = []
            events: list[SpanEvent] = []
            markers: list[_FlushMarker] = []
            count = 0
            while queue and count < self.batch_size:
                item = queue.popleft()
                count += 1
                if type(item) is Span:
                    # A span is queued when it starts and when it finishes; whichever sighting
                    # first finds it finished writes it whole, and the other is skipped.
                    state = item._recorded
                    if state == 2:
                        continue
                    if item.status != "running":
                        item._recorded = 2
                        finished.append(item)
                    elif state == 0:
                        item._recorded = 1
                        running.append(item)
                elif isinstance(item, _FlushMarker):
                    markers.append(item)
                    break  # write what came before the marker, then release its waiter
                else:
                    events.append(item)  # type: ignore[arg-type]
            try:
                self._write(engine, running, finished, events)
            except Exception:
                self.failed_batches += 1
                _log.exception(
                    "kagura: writing %d recorded rows failed; they are dropped",
                    len(running) + len(finished) + len(events),
                )
            for marker in markers:
                marker.done.set()

    def _rows(self, spans: list[Span]) -> list[tuple[Any, ...]]:
        """The spans' rows, their content as stored text (redacted, hashed or dropped)."""
        rows = [self._row(span) for span in spans]
        if self.content == "full" and self._serialise_checked(rows):
            return [tuple(row) for row in rows]
        # Something looked like a secret (or would not serialise): value by value, redacting.
        rows = [self._row(span) for span in spans]
        for row in rows:
            for at in _CONTENT_AT:
                value = row[at]
                if value is not None:
                    row[at] = encode(value, "full" if at == _ATTRIBUTES_AT else self.content)
        return [tuple(row) for row in rows]

    @staticmethod
    def _serialise_checked(rows: list[list[Any]]) -> bool:
        """Serialise the rows' content in place; ``False`` if it may hold a secret."""
        texts: list[str] = []
        try:
            for row in rows:
                for at in _CONTENT_AT:
                    value = row[at]
                    if value is not None:
                        text = pydantic_core.to_json(value, fallback=repr_of).decode()
                        if len(text) > MAX_TEXT:
                            text = truncated(text)
                        row[at] = text
                        texts.append(text)
        except Exception:
            return False
        # One search over the whole batch: most batches hold nothing that looks like a secret.
        return not looks_secret("\n".join(texts))

    def _row(self, span: Span) -> list[Any]:
        """The span's row, its content (inputs, output, attributes) as the values themselves."""
        attrs = span.attributes or _EMPTY
        inputs = attrs.get("inputs")
        if inputs is None:
            inputs = attrs.get("messages", attrs.get("arguments"))
        if span.status == "running":  # its totals and result are not all in yet
            return [
                span.span_id,
                span.run_id,
                span.parent_id,
                span.kind,
                span.name,
                span.step_key,
                "running",
                span.start_ns / 1e9,
                None,
                None,
                attrs.get("model"),
                0,
                0,
                0,
                None,
                0,
                0,
                None,
                None,
                inputs,
                None,
                None,
                self._pid,
            ]
        result = span.result or _EMPTY
        extra = {k: v for k, v in result.items() if k != "output"} if result else None
        end_ns = span.end_ns
        error = span.error
        return [
            span.span_id,
            span.run_id,
            span.parent_id,
            span.kind,
            span.name,
            span.step_key,
            span.status,
            span.start_ns / 1e9,
            end_ns / 1e9,
            (end_ns - span.start_ns) / 1e6,
            attrs.get("model") or result.get("model"),
            span.prompt_tokens,
            span.completion_tokens,
            span.prompt_tokens + span.completion_tokens,
            span.cost,
            span.llm_calls,
            span.retries,
            None if error is None else scrub(error),  # provider errors may quote a key
            span.error_type,
            inputs,
            result.get("output"),
            extra or None,
            self._pid,
        ]

    def _write(
        self,
        engine: Any,
        running: list[Span],
        finished: list[Span],
        events: list[SpanEvent],
    ) -> None:
        if not (running or finished or events):
            return
        statements = _statements(engine.dialect.name)
        # Straight to the driver's executemany: the rows are already plain values, and
        # SQLAlchemy's per-row processing would cost more than the insert itself.
        with engine.begin() as connection:
            if running:
                connection.exec_driver_sql(statements.insert_running, self._rows(running))
            if finished:
                connection.exec_driver_sql(statements.upsert_finished, self._rows(finished))
            if events:
                connection.exec_driver_sql(
                    statements.insert_events,
                    [
                        (
                            event.span_id,
                            event.run_id,
                            event.name,
                            event.time_ns / 1e9,
                            encode(event.attributes, "full"),
                        )
                        for event in events
                    ],
                )
        self.written_spans += len(finished)
        self.written_events += len(events)


@dataclass(frozen=True, slots=True)
class _Statements:
    insert_running: str
    upsert_finished: str
    insert_events: str


@lru_cache(maxsize=4)
def _statements(dialect: str) -> _Statements:
    """The recorder's SQL, with positional parameters in the driver's style. ``INSERT ... ON
    CONFLICT`` is the same on SQLite and PostgreSQL."""
    from ._schema import events, spans

    if [c.name for c in spans.columns] != list(SPAN_COLUMNS):
        raise RuntimeError("the recorder's columns do not match the kagura_spans table")
    mark = "%s" if dialect == "postgresql" else "?"

    def insert(table: str, columns: tuple[str, ...]) -> str:
        return (
            f"INSERT INTO {table} ({', '.join(columns)}) "
            f"VALUES ({', '.join(mark for _ in columns)})"
        )

    spans_insert = insert(spans.name, SPAN_COLUMNS)
    updates = ", ".join(f"{c} = excluded.{c}" for c in SPAN_COLUMNS if c != "span_id")
    event_columns = tuple(c.name for c in events.columns if c.name != "id")
    if event_columns != ("span_id", "run_id", "name", "at", "attributes"):
        raise RuntimeError("the recorder's columns do not match the kagura_events table")
    return _Statements(
        insert_running=f"{spans_insert} ON CONFLICT (span_id) DO NOTHING",
        upsert_finished=f"{spans_insert} ON CONFLICT (span_id) DO UPDATE SET {updates}",
        insert_events=insert(events.name, event_columns),
    )


def _dialect_insert(engine: Any) -> Any:
    """The dialect's INSERT, which (unlike the generic one) has ON CONFLICT for upserts."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    from sqlalchemy.dialects import sqlite

    return sqlite.insert


# -- the process-wide default recorder ----------------------------------------------------

_default: Recorder | None = None
_default_lock = threading.Lock()


def default_recorder() -> Recorder | None:
    return _default


def install_default() -> Recorder:
    """Start recording to the default store (``KAGURA_DB`` or ``KAGURA_HOME/events.db``)."""
    global _default
    from .._instrument import add_sink
    from ._engine import default_url

    with _default_lock:
        if _default is None:
            _default = Recorder(default_url())
            add_sink(_default)
            atexit.register(_close_default)
        return _default


def _close_default() -> None:
    recorder = _default
    if recorder is not None:
        started = time.monotonic()
        recorder.close(timeout=30.0)
        _log.debug("kagura: recorder flushed in %.3fs", time.monotonic() - started)


def uninstall_default() -> None:
    """Flush and stop the default recorder (tests; or to switch stores)."""
    global _default
    from .._instrument import remove_sink

    with _default_lock:
        if _default is not None:
            remove_sink(_default)
            _default.close()
            _default = None
