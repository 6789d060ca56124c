"""Staged batches: the writer makes a burst's batches durable in one insert each and writes their
rows into the tables later. Nothing recorded is ever missing from what users read, no secret is
ever on disk, and several processes catching up at once write every row exactly once.
"""

from __future__ import annotations

import marshal
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from kagura import agent
from kagura._storage import engine_for, normalise_url
from kagura.observability import EventStore, Recorder
from kagura.observability import _writer as writer_module
from kagura.observability._writer import WIRE_COLUMNS, StoreWriter
from kagura.testing import FakeModel, override_model

from .conftest import rows

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
    message = ("rows", [], finished, events, PREFIX, 7)
    return message, marshal.dumps(message)


def raw_spans(url: str) -> list[dict[str, Any]]:
    """``kagura_spans`` as it is on disk, staged batches not written in."""
    with engine_for(normalise_url(url)).connect() as connection:
        return [dict(r._mapping) for r in connection.execute(text("SELECT * FROM kagura_spans"))]


def staged_count(url: str) -> int:
    with engine_for(normalise_url(url)).connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM kagura_staged")).scalar_one())


@pytest.fixture
def writer(store_url: str) -> Iterator[StoreWriter]:
    opened = StoreWriter(normalise_url(store_url), "full")
    yield opened
    opened.dispose()


def test_a_staged_batch_is_durable_and_every_query_sees_its_rows(
    writer: StoreWriter, store_url: str
) -> None:
    writer.take(*batch_of("a", "b"))
    # On disk as one staged batch, counted as written; not in the spans table yet.
    assert (staged_count(store_url), raw_spans(store_url)) == (1, [])
    assert (writer.written_spans, writer.written_events) == (2, 1)
    store = EventStore(store_url)
    assert sorted(e["id"] for e in store.get_executions("summarise")) == ["a", "b"]
    assert staged_count(store_url) == 0  # the query wrote it in first
    assert {r["span_id"] for r in raw_spans(store_url)} == {"a", "b"}
    assert [e["name"] for e in rows(store_url, "kagura_events")] == ["retry_wait"]


def test_ids_sent_as_numbers_are_the_recording_processes_ids(
    writer: StoreWriter, store_url: str
) -> None:
    # The recorder sends the ids no one has read as text as their numbers: whoever writes the
    # batch in (here a reader, in another process than the recording one) makes the same text.
    writer.take(*batch_of(7, 8, parent_id=7))
    assert {r["span_id"]: (r["run_id"], r["parent_id"]) for r in rows(store_url)} == {
        f"{PREFIX}0000000007": (f"{PREFIX}0000000007", f"{PREFIX}0000000007"),
        f"{PREFIX}0000000008": (f"{PREFIX}0000000008", f"{PREFIX}0000000007"),
    }


def test_a_batch_that_may_hold_a_secret_is_never_staged(
    writer: StoreWriter, store_url: str
) -> None:
    writer.take(*batch_of("a", inputs=f'{{"text":"key {KEY_SHAPED}"}}'.encode()))
    assert staged_count(store_url) == 0  # written at once, redacted: the key is never on disk
    (stored,) = raw_spans(store_url)
    assert stored["inputs"] == '{"text":"key [REDACTED]"}'


def test_staged_batches_are_written_in_before_one_written_at_once(
    writer: StoreWriter, store_url: str
) -> None:
    writer.take(*batch_of("a"))
    writer.take(*batch_of("b", error=f"HTTP 401: {KEY_SHAPED}"))
    assert staged_count(store_url) == 0
    assert [r["span_id"] for r in rows(store_url, "kagura_events")] == ["a", "b"]
    errors = {r["span_id"]: r["error"] for r in raw_spans(store_url)}
    assert errors == {"a": None, "b": "HTTP 401: [REDACTED]"}


def test_a_writer_stages_at_most_its_limit(
    writer: StoreWriter, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "STAGED_ROWS_MAX", 6)  # two batches of 3 rows
    for n in range(5):
        writer.take(*batch_of(f"s{n}-a", f"s{n}-b"))
        assert writer.staged_rows <= 6
        assert staged_count(store_url) <= 2
    # The oldest went in first: what is left staged is the latest.
    assert {r["span_id"] for r in raw_spans(store_url)} == {
        f"s{n}-{x}" for n in (0, 1, 2) for x in "ab"
    }
    assert len(EventStore(store_url).get_executions("summarise", limit=100)) == 10


def test_a_staged_batch_that_cannot_be_written_is_dropped_and_the_rest_go_in(
    writer: StoreWriter, store_url: str
) -> None:
    writer.take(*batch_of("a"))
    with engine_for(normalise_url(store_url)).begin() as connection:
        connection.execute(
            text("INSERT INTO kagura_staged (spans, batch) VALUES (1, :batch)"),
            {"batch": b"not marshal"},
        )
    writer.take(*batch_of("b"))
    assert writer.catch_up() == 3
    assert writer.failed_batches == 1
    assert staged_count(store_url) == 0
    assert {r["span_id"] for r in raw_spans(store_url)} == {"a", "b"}


def test_readers_catching_up_at_once_write_every_row_once(
    writer: StoreWriter, store_url: str
) -> None:
    for n in range(30):
        writer.take(*batch_of(f"r{n}-a", f"r{n}-b", f"r{n}-c"))
    readers = [StoreWriter(normalise_url(store_url), "full") for _ in range(3)]
    errors: list[BaseException] = []

    def read(reader: StoreWriter) -> None:
        try:
            reader.catch_up()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(reader,)) for reader in readers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert not any(thread.is_alive() for thread in threads)
    assert sum(reader.failed_batches for reader in readers) == 0
    assert staged_count(store_url) == 0
    spans = raw_spans(store_url)
    assert len(spans) == 90 and len({s["span_id"] for s in spans}) == 90
    assert len(rows(store_url, "kagura_events")) == 30


@agent
async def summarise(text: str) -> str:
    """Summarise: {{ text }}"""


async def test_the_tables_are_complete_once_the_recording_process_is_done(
    recorder: Recorder, store_url: str
) -> None:
    with override_model(FakeModel()):
        for n in range(20):
            await summarise(f"doc {n}")
    recorder.close()  # as at exit: the writer process writes in what it staged, then ends
    assert staged_count(store_url) == 0
    spans = raw_spans(store_url)
    assert sorted(s["kind"] for s in spans) == ["agent"] * 20 + ["llm"] * 20
    assert all(s["status"] == "completed" for s in spans)
