"""The writer: each batch the recorder sends goes straight into the tables, in one transaction,
redacted; readers never write anything in for it.
"""

from __future__ import annotations

import json
import marshal
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from kagura import agent
from kagura._storage import engine_for, normalise_url
from kagura._storage._rollups import _ROLLUPS_LOCK
from kagura.observability import EventStore, Recorder
from kagura.observability._writer import WIRE_COLUMNS, StoreWriter, rows_of, sender_of
from kagura.testing import FakeModel, override_model

from .conftest import is_postgres, rows, wait_for_lock_waits

KEY_SHAPED = "sk-proj-AbCdEfGhIjKlMnOp1234567890"


def span_row(span_id: str | int, **values: Any) -> tuple[Any, ...]:
    """A finished span's row as the recorder sends it (recorded values as they are)."""
    fields: dict[str, Any] = dict.fromkeys(WIRE_COLUMNS)
    fields.update(span_id=span_id, run_id=span_id, kind="agent", name="summarise")
    fields.update(key="summarise", status="completed", start_ns=10**9, end_ns=2 * 10**9)
    fields.update(prompt_tokens=1, completion_tokens=2, llm_calls=1, retries=0)
    fields.update(inputs=b'{"text":"doc"}', output="summary")
    fields.update(values)
    return tuple(fields[column] for column in WIRE_COLUMNS)


#: The id prefix of the recording process the batches come from (not this one's).
PREFIX = "0f0f0f0f0f0f"


def batch_of(*span_ids: str | int, **values: Any) -> tuple[tuple[Any, ...], bytes]:
    """A recorder message of finished spans (flat values, as it queues them) and its bytes."""
    finished = [value for span_id in span_ids for value in span_row(span_id, **values)]
    events = [(str(span_ids[0]), str(span_ids[0]), "retry_wait", 1.5, '{"seconds": 0.5}')]
    message = ("rows", [], finished, events, PREFIX, 7, "elsewhere", None)
    return message, marshal.dumps(message)


def raw_spans(url: str) -> list[dict[str, Any]]:
    """``kagura_spans`` as it is on disk."""
    with engine_for(normalise_url(url)).connect() as connection:
        return [dict(r._mapping) for r in connection.execute(text("SELECT * FROM kagura_spans"))]


def take(writer: StoreWriter, message: tuple[Any, ...], batch: bytes) -> None:
    """What the writer process does with a batch of the recorder's (see ``_writer.serve``)."""
    assert marshal.loads(batch) == message
    writer.write(message[1], rows_of(message[2]), message[3], sender_of(message))


@pytest.fixture
def writer(store_url: str) -> Iterator[StoreWriter]:
    opened = StoreWriter(normalise_url(store_url), "full")
    yield opened
    opened.dispose()


def test_a_batch_is_in_the_tables_once_written_and_a_query_writes_nothing(
    writer: StoreWriter, store_url: str
) -> None:
    take(writer, *batch_of("a", "b"))
    assert {r["span_id"] for r in raw_spans(store_url)} == {"a", "b"}
    assert [e["name"] for e in rows(store_url, "kagura_events")] == ["retry_wait"]
    assert (writer.written_spans, writer.written_events) == (2, 1)
    store = EventStore(store_url)
    assert sorted(e["id"] for e in store.get_executions("summarise")) == ["a", "b"]


def test_ids_sent_as_numbers_are_the_recording_processes_ids(
    writer: StoreWriter, store_url: str
) -> None:
    # The recorder sends the ids no one has read as text as their numbers: the writer (another
    # process than the recording one) makes the text with the recording process's prefix.
    take(writer, *batch_of(7, 8, parent_id=7))
    assert {r["span_id"]: (r["run_id"], r["parent_id"]) for r in rows(store_url)} == {
        f"{PREFIX}0000000007": (f"{PREFIX}0000000007", f"{PREFIX}0000000007"),
        f"{PREFIX}0000000008": (f"{PREFIX}0000000008", f"{PREFIX}0000000007"),
    }
    assert {(r["pid"], r["host"]) for r in rows(store_url)} == {(7, "elsewhere")}


def test_a_batch_that_may_hold_a_secret_is_redacted_before_it_is_written(
    writer: StoreWriter, store_url: str
) -> None:
    take(writer, *batch_of("a", inputs=f'{{"text":"key {KEY_SHAPED}"}}'.encode()))
    (stored,) = raw_spans(store_url)
    assert stored["inputs"] == '{"text":"key [REDACTED]"}'


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        # Key shapes of other providers than OpenAI's.
        ("groq gsk_abcdefghijklmnopqrstuvwxyz", "groq [REDACTED]"),
        ("aws AKIAABCDEFGHIJKLMNOP", "aws [REDACTED]"),
        ("gh ghp_abcdefghijklmnopqrstuvwxyz0123", "gh [REDACTED]"),
        # A value given to a secret's name, in a URL or a sentence: the name stays.
        ("https://x/?api_key=AKIA-or-any&b=1", "https://x/?api_key=[REDACTED]&b=1"),
        ("use Password: correct-horse now", "use Password: [REDACTED] now"),
        # A password in a URL: the user and the host stay.
        ("postgresql://app:hunter2@db/prod", "postgresql://app:[REDACTED]@db/prod"),
        # Ordinary text stays as it is.
        ("at 10:30, see https://example.com/a:b", "at 10:30, see https://example.com/a:b"),
    ],
)
def test_secrets_written_as_text_in_values_are_redacted(
    writer: StoreWriter, store_url: str, text: str, stored: str
) -> None:
    take(writer, *batch_of("a", inputs=json.dumps({"text": text}).encode()))
    (span,) = raw_spans(store_url)
    assert json.loads(span["inputs"]) == {"text": stored}


def test_batches_are_written_in_the_order_they_came(writer: StoreWriter, store_url: str) -> None:
    take(writer, *batch_of("a"))
    take(writer, *batch_of("b", error=f"HTTP 401: {KEY_SHAPED}"))
    assert [r["span_id"] for r in rows(store_url, "kagura_events")] == ["a", "b"]
    errors = {r["span_id"]: r["error"] for r in raw_spans(store_url)}
    assert errors == {"a": None, "b": "HTTP 401: [REDACTED]"}


@agent
async def summarise(text: str) -> str:
    """Summarise: {{ text }}"""


async def test_the_tables_are_complete_once_the_recording_process_is_done(
    recorder: Recorder, store_url: str
) -> None:
    with override_model(FakeModel()):
        for n in range(20):
            await summarise(f"doc {n}")
    recorder.close()  # as at exit: the writer process writes what it was sent, then ends
    spans = raw_spans(store_url)
    assert sorted(s["kind"] for s in spans) == ["agent"] * 20 + ["llm"] * 20
    assert all(s["status"] == "completed" for s in spans)


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_batch_rolled_back_by_a_deadlock_is_written_again(
    writer: StoreWriter, store_url: str, conflicts: list[BaseException]
) -> None:
    """PostgreSQL ends a deadlock by rolling one of its transactions back. When that is the
    writer's, the batch is written again rather than dropped. A real deadlock, made in this
    order: the writer has inserted span "b" and waits for the rollups' lock (held here); another
    transaction, holding the rollup rows the batch adds to, waits to insert "b" too; the lock
    goes, the writer waits for those rows, and finds the deadlock (the other side's
    ``deadlock_timeout`` is an hour, so the writer's check, a second in, is the one that
    runs)."""
    take(writer, *batch_of("a"))  # the rollup rows of the hour exist from here on
    engine = engine_for(normalise_url(store_url))
    lock = engine.connect()
    lock.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_ROLLUPS_LOCK})")
    written = threading.Thread(target=take, args=(writer, *batch_of("b")))
    written.start()
    other = engine.connect()
    other.exec_driver_sql("SET deadlock_timeout = '1h'")
    other.exec_driver_sql("UPDATE kagura_rollups SET calls = calls")

    def insert_b_then_give_up() -> None:
        other.exec_driver_sql(
            "INSERT INTO kagura_spans (span_id, run_id, kind, name, status, started_at, "
            "prompt_tokens, completion_tokens, total_tokens, llm_calls, retries) "
            "VALUES ('b', 'b', 'agent', 'other', 'running', 0, 0, 0, 0, 0, 0)"
        )
        other.rollback()

    inserting = threading.Thread(target=insert_b_then_give_up)
    try:
        wait_for_lock_waits(engine, 1)  # the writer, for the rollups' lock
        inserting.start()
        wait_for_lock_waits(engine, 2)  # and the other transaction, for "b"
        lock.rollback()  # the rollups' lock goes
        inserting.join(60)
        written.join(60)
        assert not written.is_alive() and not inserting.is_alive()
    finally:
        lock.close()
        other.close()
    # At least the deadlock made here. Once the writer's transaction is rolled back, its retry
    # may insert "b" before the other transaction's waiting insert does, and deadlock with it
    # again (rolled back and retried again): how many times is the scheduler's choice.
    assert conflicts
    assert all("deadlock detected" in str(error) for error in conflicts)
    assert writer.failed_batches == 0
    assert {(r["span_id"], r["name"]) for r in raw_spans(store_url)} == {
        ("a", "summarise"),
        ("b", "summarise"),
    }
    assert EventStore(store_url).stats()["executions"] == 2  # the rollups count both


def _message(*finished: tuple[Any, ...]) -> tuple[tuple[Any, ...], bytes]:
    message = ("rows", [], [v for row in finished for v in row], [], PREFIX, 7, "elsewhere", None)
    return message, marshal.dumps(message)


def test_values_the_database_refuses_are_made_to_fit_and_the_batch_is_written_whole(
    writer: StoreWriter, store_url: str
) -> None:
    """A NUL character in an error's text, a model's name longer than its column: SQLite takes
    both as they are. PostgreSQL takes neither, and refused the whole batch they were in (every
    row of it was lost); now the batch is written again with those values made to fit."""
    take(
        writer,
        *_message(span_row("a", error="HTTP 400: bad\x00byte", model="m" * 300), span_row("b")),
    )
    stored = {r["span_id"]: r for r in raw_spans(store_url)}
    assert set(stored) == {"a", "b"}
    assert (writer.failed_batches, writer.written_spans) == (0, 2)
    fitted = stored["a"]["error"], stored["a"]["model"]
    if is_postgres(store_url):
        assert fitted == ("HTTP 400: bad\ufffdbyte", "m" * 255)
    else:
        assert fitted == ("HTTP 400: bad\x00byte", "m" * 300)


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_row_the_database_refuses_still_is_dropped_alone(
    writer: StoreWriter, store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A token count beyond PostgreSQL's integer column cannot be made to fit: that row is
    dropped, said once with the database's reason (and none of the row's values), and the
    rest of its batch is written."""
    bad = span_row("a", prompt_tokens=2**40, inputs=b'{"text":"private words"}')
    take(writer, *_message(bad, span_row("b"), span_row("c")))
    assert {r["span_id"] for r in raw_spans(store_url)} == {"b", "c"}
    assert (writer.failed_batches, writer.written_spans) == (0, 2)
    (said,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "refused 1 of a batch's 3 recorded rows" in said
    assert "NumericValueOutOfRange" in said and "private" not in said
