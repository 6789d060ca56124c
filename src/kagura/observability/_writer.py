"""The event store's writer: rows in, one transaction per batch out.

The recorder builds each span's row where the span ends (its recorded values already JSON text)
and hands batches to a writer. By default the writer is a process of its own (:func:`main`, the
recorder's sidecar): checking the text for secrets, redacting it and the inserts themselves then
run on another core, without the GIL, so recording costs the event loop little more than building
the rows. If the sidecar cannot be started, or dies, the recorder writes from its own thread with
the same :class:`StoreWriter`.

The sidecar speaks a small protocol over its stdin and stdout: frames of a 4-byte length and a
:mod:`marshal` payload (the same interpreter is at both ends, and rows are plain values, so
marshal is the fastest codec there is). It writes everything it has read, then exits, when its
stdin closes: also when the recording process is killed.
"""

from __future__ import annotations

import functools
import gc
import logging
import marshal
import os
import signal
import struct
import sys
from typing import IO, Any

from ._content import MAX_TEXT, ContentMode, encode_text, looks_secret, repr_of, scrub
from ._engine import use_a_large_page_cache

_log = logging.getLogger("kagura.recorder")

#: The spans table's columns, in the order of the rows the recorder builds.
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
#: Values in a span's row.
ROW_WIDTH = len(SPAN_COLUMNS)
EVENT_COLUMNS = ("span_id", "run_id", "name", "at", "attributes")
_ERROR_AT = SPAN_COLUMNS.index("error")

#: A span's row: the values of ``SPAN_COLUMNS``, with its recorded values (``inputs``,
#: ``output``, ``attributes``) as JSON text not redacted yet (see ``_content.to_text`` and
#: ``result_texts``); an event's, of ``EVENT_COLUMNS``. Only strings, numbers and ``None``, so
#: :mod:`marshal` sends a whole batch in one call. The recorder queues and sends finished spans'
#: rows as one flat list of values (see ``rows_of``), not a tuple each: every tuple would be an
#: object the garbage collector counts while it waits in the queue.
Row = tuple[Any, ...]
_INPUTS_AT = SPAN_COLUMNS.index("inputs")
_ATTRIBUTES_AT = SPAN_COLUMNS.index("attributes")


def plain(rows: list[Row]) -> list[Row]:
    """``rows`` with every value marshal cannot carry (none, from the recorder) as its repr."""
    return [tuple(plain_values(row)) for row in rows]


def plain_values(values: list[Any] | Row) -> list[Any]:
    """``values`` with each one marshal cannot carry as its repr."""
    return [v if v is None or type(v) in (str, int, float, bool) else repr_of(v) for v in values]


def rows_of(values: list[Any]) -> list[Row]:
    """Finished spans' rows from the flat list the recorder queues them in (see
    ``Recorder._rows``): every ``ROW_WIDTH`` values, one row."""
    each = iter(values)
    return list(zip(*[each] * ROW_WIDTH, strict=True))


def _span_row(row: Row, content: ContentMode) -> Row:
    """A span's row as stored: its error redacted and its recorded values redacted (or hashed,
    or dropped) value by value. The careful path."""
    error = row[_ERROR_AT]
    return (
        *row[:_ERROR_AT],
        None if error is None else scrub(error),  # provider errors may quote a key
        *row[_ERROR_AT + 1 : _INPUTS_AT],
        encode_text(row[_INPUTS_AT], content),
        encode_text(row[_INPUTS_AT + 1], content),
        encode_text(row[_ATTRIBUTES_AT], "full"),  # not content: never hashed or dropped
        *row[_ATTRIBUTES_AT + 1 :],
    )


def _fast_rows(rows: list[Row]) -> list[Row] | None:
    """The rows as stored with ``content="full"``; ``None`` when the batch needs the careful
    path: something may be a secret, or is too long to keep whole.

    The common case of every batch: a row arrives as it is stored, and the batch's text is
    searched for secrets in one go (most batches hold nothing that looks like one).
    """
    stored = []
    texts: list[str] = []
    for row in rows:
        for text in row[_INPUTS_AT : _ATTRIBUTES_AT + 1]:
            if text is not None:
                if len(text) > MAX_TEXT:
                    return None
                texts.append(text)
        if row[_ERROR_AT] is not None:  # provider errors may quote a key
            row = (*row[:_ERROR_AT], scrub(row[_ERROR_AT]), *row[_ERROR_AT + 1 :])
        stored.append(row)
    # Each distinct text once: an agent's output is its last attempt's, and attributes repeat
    # from call to call (the model that answered, finish reasons).
    return None if looks_secret("\n".join(dict.fromkeys(texts))) else stored


class StoreWriter:
    """Writes batches of rows to the store at ``url``. Opening it opens (and creates) the store."""

    def __init__(self, url: str, content: ContentMode) -> None:
        from ._engine import engine_for

        self.url = url
        self.content: ContentMode = content
        self.engine = engine_for(url)
        self.written_spans = 0
        self.written_events = 0
        self.failed_batches = 0

    def write(self, running: list[Row], finished: list[Row], events: list[Row]) -> None:
        """Write one batch in one transaction. Rows hold their recorded values as the values
        themselves: here they are redacted, serialised (or hashed, or dropped)."""
        if not (running or finished or events):
            return
        try:
            dialect = self.engine.dialect.name
            statements = _statements(dialect)
            # Straight to the driver's executemany: the rows are already plain values, and
            # SQLAlchemy's per-row processing would cost more than the insert itself.
            with self.engine.begin() as connection:
                if running:
                    connection.exec_driver_sql(statements.insert_running, self._stored(running))
                if finished:
                    connection.exec_driver_sql(*_upsert_finished(dialect, self._stored(finished)))
                if events:
                    connection.exec_driver_sql(statements.insert_events, _event_rows(events))
        except Exception:
            self.failed_batches += 1
            _log.exception(
                "kagura: writing %d recorded rows failed; they are dropped",
                len(running) + len(finished) + len(events),
            )
            return
        self.written_spans += len(finished)
        self.written_events += len(events)

    def _stored(self, rows: list[Row]) -> list[Row]:
        if self.content == "full":
            stored = _fast_rows(rows)
            if stored is not None:
                return stored
        return [_span_row(row, self.content) for row in rows]

    def dispose(self) -> None:
        self.engine.dispose()


def _event_rows(rows: list[Row]) -> list[Row]:
    return [(*event[:-1], encode_text(event[-1], "full")) for event in rows]


class _Statements:
    __slots__ = ("insert_events", "insert_running", "upsert_finished")

    def __init__(self, insert_running: str, upsert_finished: str, insert_events: str) -> None:
        self.insert_running = insert_running
        self.upsert_finished = upsert_finished
        self.insert_events = insert_events


_statement_cache: dict[str, _Statements] = {}


def _statements(dialect: str) -> _Statements:
    """The writer's SQL, with positional parameters in the driver's style. ``INSERT ... ON
    CONFLICT`` is the same on SQLite and PostgreSQL."""
    cached = _statement_cache.get(dialect)
    if cached is not None:
        return cached
    from ._schema import events, spans

    if tuple(c.name for c in spans.columns) != SPAN_COLUMNS:
        raise RuntimeError("the writer's columns do not match the kagura_spans table")
    if tuple(c.name for c in events.columns if c.name != "id") != EVENT_COLUMNS:
        raise RuntimeError("the writer's columns do not match the kagura_events table")
    statements = _Statements(
        insert_running=(
            f"{_insert(dialect, spans.name, SPAN_COLUMNS)} ON CONFLICT (span_id) DO NOTHING"
        ),
        upsert_finished=_span_upsert(dialect, SPAN_COLUMNS),
        insert_events=_insert(dialect, events.name, EVENT_COLUMNS),
    )
    _statement_cache[dialect] = statements
    return statements


def _insert(dialect: str, table: str, columns: tuple[str, ...]) -> str:
    mark = "%s" if dialect == "postgresql" else "?"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(mark for _ in columns)})"


@functools.lru_cache(maxsize=256)
def _span_upsert(dialect: str, columns: tuple[str, ...]) -> str:
    """A span's row written whatever was there: its ``running`` row, if any, is replaced. A
    column left out of ``columns`` is stored as NULL (``excluded`` holds its default)."""
    from ._schema import spans

    updates = ", ".join(f"{c} = excluded.{c}" for c in SPAN_COLUMNS if c != "span_id")
    insert = _insert(dialect, spans.name, columns)
    return f"{insert} ON CONFLICT (span_id) DO UPDATE SET {updates}"


def _upsert_finished(dialect: str, rows: list[Row]) -> tuple[str, list[Row]]:
    """The upsert of finished spans' ``rows`` and its parameters, leaving out the columns that
    no row has a value in (stored as NULL all the same). Binding a ``None`` costs sqlite3 an
    adapter lookup, about 220 ns (measured), and most rows leave the same columns empty:
    ``error``, ``error_type``, often ``attributes``, ``parent_id`` and ``model`` of a run."""
    columns = list(zip(*rows, strict=True))
    count = len(rows)
    kept = tuple(i for i, values in enumerate(columns) if values.count(None) != count)
    if len(kept) == len(columns):
        return _statements(dialect).upsert_finished, rows
    names = tuple(SPAN_COLUMNS[i] for i in kept)
    return _span_upsert(dialect, names), list(zip(*(columns[i] for i in kept), strict=True))


# -- the sidecar's protocol --------------------------------------------------------------------

_LENGTH = struct.Struct(">I")


def send(stream: IO[bytes], message: tuple[Any, ...] | bytes) -> None:
    """Write one frame: a message, or one already marshalled. Raises ``ValueError`` if the
    message holds a value marshal cannot carry."""
    payload = message if type(message) is bytes else marshal.dumps(message)
    stream.write(_LENGTH.pack(len(payload)))
    stream.write(payload)  # not concatenated: a batch is large, and a copy is not free
    stream.flush()


def receive(stream: IO[bytes]) -> tuple[Any, ...] | None:
    """Read one frame; ``None`` at the end of the stream."""
    head = _read_exactly(stream, _LENGTH.size)
    if head is None:
        return None
    (length,) = _LENGTH.unpack(head)
    payload = _read_exactly(stream, length)
    if payload is None:
        return None
    message: tuple[Any, ...] = marshal.loads(payload)
    return message


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    chunks: list[bytes] = []
    while size:
        chunk = stream.read(size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def serve(inbox: IO[bytes], outbox: IO[bytes]) -> int:
    """The sidecar: open the store the first frame names, then write every batch, answering
    each ``sync`` once everything before it is committed. Ends when ``inbox`` ends."""
    opening = receive(inbox)
    if opening is None or opening[0] != "open":
        return 2
    _, url, content = opening
    try:
        writer = StoreWriter(url, content)
    except Exception as exc:
        _log.exception("kagura: cannot open the event store; recording is off")
        send(outbox, ("opened", False, f"{type(exc).__name__}: {scrub(str(exc))}"))
        return 1
    send(outbox, ("opened", True, ""))
    use_a_large_page_cache(writer.engine)
    # Every batch makes thousands of short-lived objects (rows, texts) that reference counting
    # frees; at the default threshold the collector walked each batch's live rows many times
    # over (11% of this process's time, profiled under load). What the imports and the engine
    # made is frozen out of the collector's way, and it runs after 100,000 objects, not 700.
    gc.freeze()
    gc.set_threshold(100_000, 20, 20)
    try:
        while (message := receive(inbox)) is not None:
            if message[0] == "rows":
                writer.write(message[1], rows_of(message[2]), message[3])
            elif message[0] == "sync":
                counts = (writer.written_spans, writer.written_events, writer.failed_batches)
                send(outbox, ("synced", message[1], *counts))
    finally:
        writer.dispose()
    return 0


def main() -> None:
    # Ctrl-C reaches the whole process group: the recording process decides when to stop, and
    # the end of stdin tells this one to finish writing and exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    inbox = os.fdopen(sys.stdin.fileno(), "rb", buffering=1 << 16)
    outbox = os.fdopen(sys.stdout.fileno(), "wb", buffering=0)
    sys.exit(serve(inbox, outbox))
