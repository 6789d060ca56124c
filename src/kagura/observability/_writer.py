"""The event store's writer: rows in, one transaction per batch out.

The recorder builds each span's row where the span ends (its recorded values already JSON text)
and hands batches to a writer. By default the writer is a process of its own (:func:`main`, the
recorder's sidecar): checking the text for secrets, redacting it, encrypting it (with
``KAGURA_ENCRYPTION_KEY`` set, see :mod:`kagura._encryption`) and the inserts themselves then run
on another core, without the GIL, so recording costs the event loop little more than building the
rows. Every batch goes straight into the tables (:meth:`StoreWriter.write`), in one
transaction. If the sidecar cannot be started, or dies, the recorder writes from its own thread
with the same :class:`StoreWriter`.

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
import operator
import os
import signal
import struct
import sys
import threading
import time
from typing import IO, Any

from .. import _context, _encryption
from .._context import id_format
from .._process import this_process
from .._redact import looks_secret, repr_of, scrub
from .._settings import ContentMode
from .._storage import (
    ROLLUP_COLUMNS,
    is_store_fault,
    may_come_back,
    refused_values,
    scrub_url,
    store_error,
    store_name,
    tally_of,
    transaction,
    use_a_large_page_cache,
    write_rollups,
)
from ..errors import EncryptionKeyError, StoreError
from ._content import (
    MAX_TEXT,
    as_inputs_text,
    as_text,
    attributes_text,
    encode_text,
)
from ._handoff import let_go
from ._writer_log import WarningsHandler

_log = logging.getLogger("kagura.recorder")

#: The spans table's columns, in the order of the rows the writer stores.
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
    "host",
    "pid_start",
    "agent",
)
#: A span's row as the recorder sends it: what the span holds, as it holds it. The writer
#: derives the rest (see ``_table_rows``): ids given as numbers made text with the recording
#: process's prefix, ``step_key`` from ``key`` (with ``seq``, the parent's key), times in
#: seconds from nanoseconds, the duration, the total tokens and the process id.
WIRE_COLUMNS = (
    "span_id",
    "run_id",
    "parent_id",
    "kind",
    "name",
    "key",
    "seq",
    "status",
    "start_ns",
    "end_ns",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "llm_calls",
    "retries",
    "error",
    "error_type",
    "inputs",
    "output",
    "attributes",
    "agent",
)
#: Values in a span's row as the recorder sends it.
ROW_WIDTH = len(WIRE_COLUMNS)
EVENT_COLUMNS = ("span_id", "run_id", "name", "at", "attributes")
_ERROR_AT = SPAN_COLUMNS.index("error")
#: A stored row's values that the rollups count (see ``kagura._storage.write_rollups``).
_ROLLED_UP = operator.itemgetter(*(SPAN_COLUMNS.index(c) for c in ROLLUP_COLUMNS))

#: A span's row: the values of ``WIRE_COLUMNS``, with its recorded values (``inputs``,
#: ``output``, ``attributes``) as JSON bytes, or as they are when atomic (see
#: ``_content.recorded``): the writer makes them JSON text and redacts them. An event's row:
#: the values of ``EVENT_COLUMNS``. Only strings, bytes, numbers and ``None``, so :mod:`marshal`
#: sends a whole batch in one call. The recorder queues and sends finished spans' rows as one
#: flat list of values (see ``rows_of``), not a tuple each: every tuple would be an object the
#: garbage collector counts while it waits in the queue.
Row = tuple[Any, ...]
_INPUTS_AT = SPAN_COLUMNS.index("inputs")
_ATTRIBUTES_AT = SPAN_COLUMNS.index("attributes")
#: The columns encrypted when ``KAGURA_ENCRYPTION_KEY`` is set: users' data (prompts, outputs,
#: arguments, error texts, and attributes, which may hold more of them). The rest (names, kinds,
#: status, error type, model, times, tokens, cost) stays plain, for queries to read.
_SEALED_AT = tuple(SPAN_COLUMNS.index(c) for c in ("error", "inputs", "output", "attributes"))


def plain(rows: list[Row]) -> list[Row]:
    """``rows`` with every value marshal cannot carry (none, from the recorder) as its repr."""
    return [tuple(plain_values(row)) for row in rows]


def plain_values(values: list[Any] | Row) -> list[Any]:
    """``values`` with each one marshal cannot carry as its repr."""
    return [v if v is None or type(v) in (str, int, float, bool) else _plain(v) for v in values]


def _plain(value: Any) -> Any:
    try:
        marshal.dumps(value)
    except ValueError:
        return repr_of(value)
    return value


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
        attributes_text(row[_ATTRIBUTES_AT], content),  # not content, but for tool calls
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


def _sealed(rows: list[Row]) -> list[Row]:
    """Rows as stored with a key configured: their ``_SEALED_AT`` values encrypted, after
    redaction (a redacted value stays redacted once decrypted)."""
    encrypt = _encryption.encrypt
    sealed = []
    for row in rows:
        values = list(row)
        for at in _SEALED_AT:
            values[at] = encrypt(values[at])
        sealed.append(tuple(values))
    return sealed


#: How long a writer drops batches untried once writing failed because of the store (it is
#: read-only, full, damaged or unreachable); then the next batch tries again. Again at all,
#: because stores recover (a disk gets space, a database server comes back) and a process that
#: records for days should not lose the rest of its recordings to a minute's outage. Not at every
#: batch, because a failing attempt may take long (a server that does not answer, a lock held
#: past the busy timeout): batches would pile up in the recording process meanwhile.
RETRY_S = 30.0


class StoreWriter:
    """Writes batches of rows to the store at ``url``. Opening it opens (and creates) the store,
    or raises :class:`~kagura.errors.StoreError`; but a PostgreSQL server that is not there yet
    (or a database not made yet) is tried again, as a store that cannot be written is.

    When the store cannot be written, the writer says so once (a warning naming the store and
    the cause), then drops batches quietly, counting them in ``failed_batches``, and tries again
    every ``RETRY_S`` seconds; it says so again when writing works again.
    """

    def __init__(self, url: str, content: ContentMode) -> None:
        self.url = url
        self.content: ContentMode = content
        # A key that cannot be used fails the writer at once (recording is then off): never
        # written in plaintext when it was meant to be encrypted.
        _encryption.enabled()
        self.written_spans = 0
        self.written_events = 0
        self.failed_batches = 0
        #: While the store cannot be written: when (``time.monotonic()``) a batch tries again.
        self._retry_at: float | None = None
        self._dropped_batches = 0
        #: ``None`` until the store is opened.
        self.engine: Any = None
        try:
            self._open()
        except StoreError as error:
            # A service started beside its database meets it not up yet: turning recording
            # off for the process's whole life would lose everything after a moment's wait.
            if not may_come_back(error.__cause__):
                raise
            self._store_failed(error)

    def _open(self) -> None:
        from .._storage import engine_for

        engine = engine_for(self.url)
        if engine.dialect.name == "postgresql":
            _quiet_pipeline_warnings()
        self.engine = engine

    def _dropping(self) -> bool:
        """Whether to drop a batch untried: the store failed, and it is not time to try again."""
        if self._retry_at is None or time.monotonic() >= self._retry_at:
            return False
        self.failed_batches += 1
        self._dropped_batches += 1
        return True

    def _failed(self, error: Exception, doing: str, rows: int) -> None:
        """A batch of ``rows`` failed while ``doing`` something with it, and is dropped."""
        self.failed_batches += 1
        if not is_store_fault(error):  # a bug, or a value the database refuses: this batch only
            _log.exception("kagura: %s %d recorded rows failed; they are dropped", doing, rows)
            return
        self._store_failed(error)
        self._dropped_batches += 1

    def _store_failed(self, error: Exception) -> None:
        """``error``: a store fault, or the :class:`StoreError` that opening the store raised."""
        if self._retry_at is None:
            said = error if isinstance(error, StoreError) else store_error(self.url, "write", error)
            _log.warning(
                "kagura: %s; recordings are dropped until it can be written (tried again "
                "every %gs)",
                said,
                RETRY_S,
            )
        self._retry_at = time.monotonic() + RETRY_S

    def _succeeded(self) -> None:
        if self._retry_at is not None:
            _log.warning(
                "kagura: event store %s: writing again (%d batches of recordings were dropped)",
                store_name(self.url),
                self._dropped_batches,
            )
            self._retry_at = None
            self._dropped_batches = 0

    def write(
        self,
        running: list[Row],
        finished: list[Row],
        events: list[Row],
        sender: Sender | None = None,
    ) -> None:
        """Write one batch in one transaction. Rows hold their recorded values unencoded: here
        they are serialised, redacted (or hashed, or dropped). Ids given as numbers are made
        text with the id prefix of ``sender``, the recording process (by default, this one:
        see ``Recorder._row``)."""
        if not (running or finished or events):
            return
        if sender is None:
            sender = this_sender()
        if self._dropping():
            return
        if self.engine is None:
            try:
                self._open()
            except StoreError as error:
                self.failed_batches += 1
                self._dropped_batches += 1
                self._store_failed(error)
                return
        size = len(running) + len(finished) + len(events)
        try:
            self._write(running, finished, events, sender, fit=False)
        except Exception as error:
            if not refused_values(error):
                self._failed(error, "writing", size)
                return
            lost = self._write_refused(running, finished, events, sender, size)
            if lost is None:
                return
            finished_lost, events_lost = lost
        else:
            finished_lost = events_lost = 0
        self._succeeded()
        self.written_spans += len(finished) - finished_lost
        self.written_events += len(events) - events_lost

    def _write(
        self,
        running: list[Row],
        finished: list[Row],
        events: list[Row],
        sender: Sender,
        *,
        fit: bool,
    ) -> None:
        # Written again if PostgreSQL rolls it back for another transaction's sake (a
        # deadlock with one that is not a writer's: writers and rebuilds of the rollups take
        # the rollups' lock, see kagura._storage.lock_rollups).
        transaction(
            self.engine,
            lambda connection: self._insert(connection, running, finished, events, sender, fit),
        )

    def _write_refused(
        self,
        running: list[Row],
        finished: list[Row],
        events: list[Row],
        sender: Sender,
        size: int,
    ) -> tuple[int, int] | None:
        """The database refused something in a batch: a value longer than its column, a NUL
        character in text (PostgreSQL takes neither; SQLite both), which the user's values
        (a run id, a model's name, an exception's message) may hold. The batch is written again
        with every value made to fit (see ``_fitted``), then, if it is refused still, row by row:
        a row the database will not take is dropped alone, not with the others of its batch.
        How many finished rows and events were dropped; ``None`` if the store itself failed
        meanwhile (said, and the batch dropped, by ``_failed``)."""
        try:
            self._write(running, finished, events, sender, fit=True)
            return 0, 0
        except Exception as error:
            if not refused_values(error):
                self._failed(error, "writing", size)
                return None
        lost = [0, 0, 0]
        first: Exception | None = None
        for kind, rows in enumerate((running, finished, events)):
            for row in rows:
                one: list[list[Row]] = [[], [], []]
                one[kind] = [row]
                try:
                    self._write(one[0], one[1], one[2], sender, fit=True)
                except Exception as error:
                    if not refused_values(error):
                        self._failed(error, "writing", size)
                        return None
                    lost[kind] += 1
                    first = first or error
        if first is not None:
            _log.error(
                "kagura: the event store refused %d of a batch's %d recorded rows; they are "
                "dropped, the rest is written (%s)",
                sum(lost),
                size,
                _refusal(first),
            )
        return lost[1], lost[2]

    def _insert(
        self,
        connection: Any,
        running: list[Row],
        finished: list[Row],
        events: list[Row],
        sender: Sender,
        fit: bool,
    ) -> None:
        dialect = self.engine.dialect
        # Straight to the driver's executemany (see positional_sql): the rows are already
        # plain values.
        if running:
            insert_running = _insert_sql(dialect, "kagura_spans", SPAN_COLUMNS, "nothing")
            stored = self._stored(running, sender)
            connection.exec_driver_sql(insert_running, _fitted(stored, "spans") if fit else stored)
        if finished:
            upsert = _insert_sql(dialect, "kagura_spans", SPAN_COLUMNS, "update")
            stored = self._stored(finished, sender)
            if fit:
                stored = _fitted(stored, "spans")
            connection.exec_driver_sql(upsert, stored)
            write_rollups(connection, tally_of(map(_ROLLED_UP, stored)))
        if events:
            insert_events = _insert_sql(dialect, "kagura_events", EVENT_COLUMNS, "")
            stored = _event_rows(events)
            connection.exec_driver_sql(insert_events, _fitted(stored, "events") if fit else stored)

    def _stored(self, rows: list[Row], sender: Sender) -> list[Row]:
        rows = _table_rows(rows, *sender)
        stored = _fast_rows(rows) if self.content == "full" else None
        if stored is None:
            stored = [_span_row(row, self.content) for row in rows]
        return _sealed(stored) if _encryption.enabled() else stored

    def dispose(self) -> None:
        if self.engine is not None:
            self.engine.dispose()


#: The recorder's thread (see ``Recorder``): the thread that writes when there is no writer
#: process.
WRITER_THREAD = "kagura-recorder"
_in_writer_process = False
_quieted = False


class _NoPipelineWarnings(logging.Filter):
    """psycopg runs ``executemany`` in a pipeline, and when a statement in it fails, ending the
    pipeline fails too ("pipeline aborted"): psycopg then warns "error ignored terminating
    <Pipeline>" on its own logger. For the writer that is a second line about a failure it
    reports itself (once): dropped in the writer's thread and process, and nowhere else, so
    that an application's own psycopg logging is as it was."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            str(record.msg).startswith("error ignored terminating")
            and (_in_writer_process or threading.current_thread().name == WRITER_THREAD)
        )


def _quiet_pipeline_warnings() -> None:
    global _quieted
    if not _quieted:
        _quieted = True
        logging.getLogger("psycopg").addFilter(_NoPipelineWarnings())


#: The process that recorded a batch: its span id prefix, pid, host and pid start (see
#: :mod:`kagura._process`), sent with every batch: the writer that stores it may be another
#: process.
Sender = tuple[str, int, "str | None", "str | None"]


def this_sender() -> Sender:
    """This process, as the sender of the batches it records."""
    pid, host, start = this_process()
    return (_context.PREFIX, pid, host, start)


def sender_of(message: tuple[Any, ...]) -> Sender:
    """The sender of a ``rows`` message."""
    prefix, pid, host, start = message[4:8]
    return (prefix, pid, host, start)


def _table_rows(
    rows: list[Row], prefix: str, pid: int, host: str | None, start: str | None
) -> list[Row]:
    """Rows of ``WIRE_COLUMNS`` as rows of ``SPAN_COLUMNS`` (recorded values as JSON text, not
    redacted yet)."""
    text_id = id_format(prefix)
    table = []
    for row in rows:
        (span_id, run_id, parent_id, kind, name, key, seq, status, start_ns, end_ns) = row[:10]
        model, prompt, completion, cost, llm_calls, retries, error, error_type = row[10:18]
        table.append(
            (
                span_id if type(span_id) is str else text_id % span_id,
                run_id if type(run_id) is str else text_id % run_id,
                parent_id if parent_id is None or type(parent_id) is str else text_id % parent_id,
                kind,
                name,
                key if seq is None else f"{key}/{name}#{seq}",
                status,
                start_ns / 1e9,
                None if end_ns is None else end_ns / 1e9,
                None if end_ns is None else (end_ns - start_ns) / 1e6,
                model,
                prompt,
                completion,
                prompt + completion,
                cost,
                llm_calls,
                retries,
                error,
                error_type,
                as_inputs_text(row[18], kind),
                as_text(row[19]),
                as_text(row[20]),
                pid,
                host,
                start,
                row[21],
            )
        )
    return table


def _refusal(error: Exception) -> str:
    """What the database said, without the statement and values SQLAlchemy adds (the user's
    data)."""
    orig = getattr(error, "orig", None) or error
    said = str(orig).strip().splitlines()
    cause: str = scrub(f"{type(orig).__name__}: {said[0] if said else ''}")
    return cause


@functools.cache
def _limits(table: str) -> tuple[tuple[int, int], ...]:
    """(position, length) of each column of the ``spans`` or ``events`` table's rows (as the
    writer stores them) that has a declared length."""
    from .. import _storage

    columns = SPAN_COLUMNS if table == "spans" else EVENT_COLUMNS
    schema = getattr(_storage, table)
    limits = []
    for at, name in enumerate(columns):
        length = getattr(schema.c[name].type, "length", None)
        if length is not None:
            limits.append((at, length))
    return tuple(limits)


def _fitted(rows: list[Row], table: str) -> list[Row]:
    """The rows with every text value made storable anywhere: NUL characters replaced (with
    U+FFFD), and a value longer than its column cut to its length. Only for a batch the
    database refused: the common batch is stored as it came."""
    limits = _limits(table)
    fitted = []
    for row in rows:
        values = [v.replace("\x00", "\ufffd") if type(v) is str and "\x00" in v else v for v in row]
        for at, length in limits:
            value = values[at]
            if type(value) is str and len(value) > length:
                values[at] = value[:length]
        fitted.append(tuple(values))
    return fitted


def _event_rows(rows: list[Row]) -> list[Row]:
    """Events as stored: their attributes redacted, and encrypted with a key configured (retry
    waits and fallbacks carry error texts)."""
    if _encryption.enabled():
        encrypt = _encryption.encrypt
        return [(*event[:-1], encrypt(encode_text(event[-1], "full"))) for event in rows]
    return [(*event[:-1], encode_text(event[-1], "full")) for event in rows]


@functools.lru_cache(maxsize=256)
def _insert_sql(dialect: Any, table: str, columns: tuple[str, ...], on_conflict: str) -> str:
    """The SQL of an insert of ``columns`` into ``table`` (``kagura_spans`` or
    ``kagura_events``) in the driver's positional style, for rows of those columns' values in
    that order. ``on_conflict`` (spans only): ``"nothing"`` keeps the row there (a running
    row written twice), ``"update"`` replaces it (a finished row replaces its running one; a
    column left out of ``columns`` is stored as NULL)."""
    from sqlalchemy import bindparam, null

    from .._storage import events, insert, positional_sql, spans

    target = spans if table == spans.name else events
    # NULL, not the column's default, for a column left out (every row's value was None).
    values: dict[str, Any] = {c.name: null() for c in target.columns if c.default is not None}
    values.update({c: bindparam(c) for c in columns})
    statement = insert(dialect, target).values(values)
    if on_conflict == "nothing":
        statement = statement.on_conflict_do_nothing(index_elements=["span_id"])
    elif on_conflict == "update":
        statement = statement.on_conflict_do_update(
            index_elements=["span_id"],
            set_={c: statement.excluded[c] for c in SPAN_COLUMNS if c != "span_id"},
        )
    sql, order = positional_sql(statement, dialect)
    if order != columns:  # a default SQLAlchemy added, say: the rows would not fit
        raise RuntimeError(f"the writer's columns do not match the {table} table")
    return sql


# -- the sidecar's protocol --------------------------------------------------------------------

LENGTH = struct.Struct(">I")


def send(stream: IO[bytes], message: tuple[Any, ...] | bytes) -> None:
    """Write one frame: a message, or one already marshalled. Raises ``ValueError`` if the
    message holds a value marshal cannot carry."""
    payload = message if type(message) is bytes else marshal.dumps(message)
    stream.write(LENGTH.pack(len(payload)))
    stream.write(payload)  # not concatenated: a batch is large, and a copy is not free
    stream.flush()


def receive(stream: IO[bytes]) -> tuple[Any, ...] | None:
    """Read one frame; ``None`` at the end of the stream."""
    payload = receive_bytes(stream)
    if payload is None:
        return None
    message: tuple[Any, ...] = marshal.loads(payload)
    return message


def receive_bytes(stream: IO[bytes]) -> bytes | None:
    """Read one frame's payload, as marshal made it; ``None`` at the end of the stream."""
    head = _read_exactly(stream, LENGTH.size)
    if head is None:
        return None
    (length,) = LENGTH.unpack(head)
    return _read_exactly(stream, length)


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
    """The sidecar: open the store the first frame names, then write every batch as it comes,
    answering each ``sync`` once everything before it is committed; end when ``inbox`` ends."""
    opening = receive(inbox)
    if opening is None or opening[0] != "open":
        return 2
    _, url, content, lock_path = opening
    try:
        return _serve(url, content, inbox, outbox)
    finally:
        if lock_path is not None:  # everything is committed: readers may go on
            let_go(lock_path)


def _serve(url: str, content: ContentMode, inbox: IO[bytes], outbox: IO[bytes]) -> int:
    reply = _Replies(outbox)
    try:
        writer = StoreWriter(url, content)
    except (StoreError, EncryptionKeyError) as exc:  # the store's, or the key's: no bug
        refuse(reply, inbox, str(exc))
        return 1
    except Exception as exc:  # a bug of ours: its traceback helps
        _log.exception("kagura: the writer process cannot open the event store")
        cause = f"{type(exc).__name__}: {scrub(scrub_url(str(exc), url))}"
        reply(("opened", False, f"event store {store_name(url)}: cannot open: {cause}"))
        return 1
    reply(("opened", True, ""))
    if writer.engine is not None:  # else PostgreSQL, not up yet: no page cache there
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
                writer.write(message[1], rows_of(message[2]), message[3], sender_of(message))
            elif message[0] == "sync":
                counts = (writer.written_spans, writer.written_events, writer.failed_batches)
                reply(("synced", message[1], *counts))
    finally:
        writer.dispose()
    return 0


def refuse(reply: _Replies, inbox: IO[bytes], why: str) -> None:
    """The store cannot be opened: have it said once. The recording process says it and answers
    ``said``, unless it is leaving (it has handed its last rows off at exit, see _handoff, or
    gone): its end of the pipe then closes without that answer, and this process says it."""
    if reply(("opened", False, why)):
        while (message := receive(inbox)) is not None:
            if message[0] == "said":
                return
    _log.warning("kagura: recording is off: %s", why)


class _Replies:
    """Answers to the recording process, which may have left already (it hands its last rows
    off at exit and does not wait: see _handoff); then they go nowhere."""

    def __init__(self, outbox: IO[bytes]) -> None:
        self.outbox = outbox
        self.gone = False

    def __call__(self, message: tuple[Any, ...]) -> bool:
        """Whether the answer reached the pipe."""
        if not self.gone:
            try:
                send(self.outbox, message)
                return True
            except (BrokenPipeError, ValueError):
                self.gone = True
        return False


def main(recording_pid: int | None = None) -> None:
    global _in_writer_process
    _in_writer_process = True
    # Ctrl-C reaches the whole process group: the recording process decides when to stop, and
    # the end of stdin tells this one to finish writing and exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Stderr while the recording process reads it, then a log file (see _writer_log).
    logging.basicConfig(level=logging.WARNING, handlers=[WarningsHandler(recording_pid)])
    inbox = os.fdopen(sys.stdin.fileno(), "rb", buffering=1 << 16)
    outbox = os.fdopen(sys.stdout.fileno(), "wb", buffering=0)
    sys.exit(serve(inbox, outbox))
