"""The recorder: an instrumentation sink that writes every span and event to the event store.

On the event loop it only appends the record to a deque. A writer thread does the rest in order:
it keeps the tree of open spans, adds each LLM attempt's tokens and cost (and each retry) to every
ancestor, and writes batches in one transaction. So recording never blocks the loop on disk I/O,
never touches the recorded function's result or exception, and nothing is lost on exit: an
``atexit`` hook flushes what is queued.
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

from .. import _settings
from .._events import Event, SpanEvent, SpanFinished, SpanStarted
from ._content import ContentMode, encode, scrub

_log = logging.getLogger("kagura.recorder")


@dataclass(slots=True)
class _Open:
    """A span that started and has not finished, with the totals of its finished descendants."""

    started: SpanStarted
    row: dict[str, Any]  # its "running" row, completed in place when it finishes
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = 0.0
    llm_calls: int = 0
    retries: int = 0


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
        batch_size: int = 2000,
    ) -> None:
        from ._engine import normalise_url

        self.url = normalise_url(url)
        #: Set when the store could not be opened: nothing is being recorded.
        self.broken = False
        self.content: ContentMode = content or _settings.record_content()  # type: ignore[assignment]
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self._queue: deque[Event | _FlushMarker] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._open: dict[str, _Open] = {}
        self._pid = os.getpid()
        self.written_spans = 0
        self.written_events = 0
        self.failed_batches = 0
        self._thread = threading.Thread(target=self._run, name="kagura-recorder", daemon=True)
        self._thread.start()

    # -- on the event loop ----------------------------------------------------------------

    def handle(self, event: Event) -> None:
        if not self.broken:  # a store that cannot be opened must not grow the queue forever
            self._queue.append(event)

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
        while self._queue:
            started: dict[str, dict[str, Any]] = {}
            finished: dict[str, dict[str, Any]] = {}
            events: list[dict[str, Any]] = []
            markers: list[_FlushMarker] = []
            count = 0
            while self._queue and count < self.batch_size:
                item = self._queue.popleft()
                count += 1
                if isinstance(item, _FlushMarker):
                    markers.append(item)
                    break  # write what came before the marker, then release its waiter
                try:
                    self._absorb(item, started, finished, events)
                except Exception:  # one bad record must not stop the writer thread
                    _log.exception("kagura: a recorded %s could not be stored", type(item).__name__)
            try:
                self._write(engine, list(started.values()), list(finished.values()), events)
            except Exception:
                self.failed_batches += 1
                _log.exception(
                    "kagura: writing %d recorded rows failed; they are dropped",
                    len(started) + len(finished) + len(events),
                )
            for marker in markers:
                marker.done.set()

    def _absorb(
        self,
        event: Event,
        started: dict[str, dict[str, Any]],
        finished: dict[str, dict[str, Any]],
        events: list[dict[str, Any]],
    ) -> None:
        if isinstance(event, SpanStarted):
            row = self._start_row(event)
            self._open[event.span_id] = _Open(event, row)
            started[event.span_id] = row
        elif isinstance(event, SpanFinished):
            row = self._finish_row(event)
            started.pop(event.span_id, None)
            finished[event.span_id] = row
        elif isinstance(event, SpanEvent):
            if event.name == "retry_wait" and event.span_id is not None:
                self._add_to_ancestors(event.span_id, retries=1)
            events.append(
                {
                    "span_id": event.span_id,
                    "run_id": event.run_id,
                    "name": event.name,
                    "at": event.time_ns / 1e9,
                    "attributes": encode(event.attributes, "full"),
                }
            )

    def _add_to_ancestors(
        self,
        span_id: str | None,
        *,
        prompt: int = 0,
        completion: int = 0,
        cost: float | None = 0.0,
        llm_calls: int = 0,
        retries: int = 0,
    ) -> None:
        seen = 0
        while span_id is not None and seen < 64:
            node = self._open.get(span_id)
            if node is None:
                return
            node.prompt_tokens += prompt
            node.completion_tokens += completion
            node.cost = None if cost is None or node.cost is None else node.cost + cost
            node.llm_calls += llm_calls
            node.retries += retries
            span_id = node.started.parent_id
            seen += 1

    def _start_row(self, event: SpanStarted) -> dict[str, Any]:
        attrs = event.attributes
        return {
            "span_id": event.span_id,
            "run_id": event.run_id,
            "parent_id": event.parent_id,
            "kind": event.kind,
            "name": event.name,
            "step_key": event.step_key,
            "status": "running",
            "started_at": event.start_ns / 1e9,
            "ended_at": None,
            "duration_ms": None,
            "model": attrs.get("model"),
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
            "cost_usd": None,
            "llm_calls": 0,
            "retries": 0,
            "error": None,
            "error_type": None,
            "inputs": self._content(
                attrs.get("inputs", attrs.get("messages", attrs.get("arguments")))
            ),
            "output": None,
            "attributes": None,
            "pid": self._pid,
        }

    def _finish_row(self, event: SpanFinished) -> dict[str, Any]:
        node = self._open.pop(event.span_id, None)
        if event.kind == "llm":
            usage = event.usage
            prompt = usage.prompt_tokens if usage else 0
            completion = usage.completion_tokens if usage else 0
            cost = event.cost_usd if event.status == "completed" or usage else 0.0
            if node is not None:
                node.prompt_tokens += prompt
                node.completion_tokens += completion
                node.cost = cost
                node.llm_calls += 1
            self._add_to_ancestors(
                event.parent_id, prompt=prompt, completion=completion, cost=cost, llm_calls=1
            )
        if node is not None:
            row = node.row
            prompt, completion = node.prompt_tokens, node.completion_tokens
            cost, llm_calls, retries = node.cost, node.llm_calls, node.retries
        else:  # started before this recorder was installed: only the finish is known
            row = self._start_row(
                SpanStarted(
                    event.span_id,
                    event.parent_id,
                    event.run_id,
                    event.kind,
                    event.name,
                    event.step_key,
                    event.start_ns,
                )
            )
            usage = event.usage
            prompt = usage.prompt_tokens if usage else 0
            completion = usage.completion_tokens if usage else 0
            cost, llm_calls, retries = event.cost_usd, int(event.kind == "llm"), 0
        attrs = dict(event.attributes)
        output = attrs.pop("output", None)
        if row["model"] is None:
            row["model"] = attrs.get("model")
        row.update(
            status=event.status,
            ended_at=event.end_ns / 1e9,
            duration_ms=(event.end_ns - event.start_ns) / 1e6,
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            cost_usd=cost,
            llm_calls=llm_calls,
            retries=retries,
            error=scrub(event.error),  # provider errors may quote a key
            error_type=event.error_type,
            output=self._content(output),
            attributes=encode(attrs, "full") if attrs else None,
        )
        return row

    def _content(self, value: Any) -> str | None:
        return encode(value, self.content)

    def _write(
        self,
        engine: Any,
        started: list[dict[str, Any]],
        finished: list[dict[str, Any]],
        events: list[dict[str, Any]],
    ) -> None:
        if not (started or finished or events):
            return
        statements = _statements(engine.dialect.name)
        # Straight to the driver's executemany with the row dicts: the rows are already plain
        # values, and SQLAlchemy's per-row processing would cost more than the insert itself.
        with engine.begin() as connection:
            if started:
                connection.exec_driver_sql(statements.insert_running, started)
            if finished:
                connection.exec_driver_sql(statements.upsert_finished, finished)
            if events:
                connection.exec_driver_sql(statements.insert_events, events)
        self.written_spans += len(finished)
        self.written_events += len(events)


@dataclass(frozen=True, slots=True)
class _Statements:
    insert_running: str
    upsert_finished: str
    insert_events: str


@lru_cache(maxsize=4)
def _statements(dialect: str) -> _Statements:
    """The recorder's SQL, in the driver's named-parameter style. ``INSERT ... ON CONFLICT``
    is the same on SQLite and PostgreSQL."""
    from ._schema import events, spans

    def param(name: str) -> str:
        return f"%({name})s" if dialect == "postgresql" else f":{name}"

    columns = [c.name for c in spans.columns]
    insert = (
        f"INSERT INTO {spans.name} ({', '.join(columns)}) "
        f"VALUES ({', '.join(param(c) for c in columns)})"
    )
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != "span_id")
    event_columns = [c.name for c in events.columns if c.name != "id"]
    return _Statements(
        insert_running=f"{insert} ON CONFLICT (span_id) DO NOTHING",
        upsert_finished=f"{insert} ON CONFLICT (span_id) DO UPDATE SET {updates}",
        insert_events=(
            f"INSERT INTO {events.name} ({', '.join(event_columns)}) "
            f"VALUES ({', '.join(param(c) for c in event_columns)})"
        ),
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
