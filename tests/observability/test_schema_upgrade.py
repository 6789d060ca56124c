"""A store made by an earlier version opens with this one: it is upgraded on open (see
``kagura._storage._migrations``), its rows read as they were, and recording and durable runs
write new ones into it. On SQLite and PostgreSQL (see ``store_url``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, select

from kagura import _storage as engines
from kagura import agent, workflow
from kagura._encryption import ENV, decrypt, generate_key, is_encrypted
from kagura.durable._journal import journal_for
from kagura.observability import EventStore, Recorder
from kagura.testing import FakeModel, override_model

from . import schema_cf3ef53 as old

#: Columns added to tables after the first stores were made (which process wrote a span, and
#: which process a run's pid named).
ADDED = {"kagura_spans": ("host", "pid_start"), "kagura_runs": ("pid_start",)}


@agent
async def draft(topic: str) -> str:
    """Draft {{ topic }}."""


@workflow(durable=True)
async def note(topic: str) -> str:
    return await draft(topic)


def _make_old_store(url: str) -> None:
    """The store as commit cf3ef53 left it: its tables, and a finished run's rows in each."""
    engine = create_engine(url)
    now = time.time()
    try:
        old.metadata.create_all(engine)
        with engine.begin() as connection:
            connection.execute(
                old.spans.insert(),
                {
                    "span_id": "old-span",
                    "run_id": "old-span",
                    "kind": "workflow",
                    "name": "old_note",
                    "step_key": "old_note",
                    "status": "completed",
                    "started_at": now - 60,
                    "ended_at": now - 59,
                    "duration_ms": 1000.0,
                    "output": '"kept"',
                    "host": "elsewhere",
                    "pid": 1,
                },
            )
            connection.execute(
                old.events.insert(),
                {"span_id": "old-span", "run_id": "old-span", "name": "retry_wait", "at": now},
            )
            connection.execute(
                old.runs.insert(),
                {
                    "run_id": "old-run",
                    "workflow": "old_note",
                    "status": "completed",
                    "result": '"kept"',
                    "created_at": now - 60,
                    "updated_at": now - 59,
                },
            )
            connection.execute(
                old.steps.insert(),
                {
                    "run_id": "old-run",
                    "step_key": "old_note/draft#0",
                    "name": "draft",
                    "kind": "agent",
                    "input_hash": "0" * 64,
                    "output": '"kept"',
                    "created_at": now - 60,
                    "position": 0,
                },
            )
    finally:
        engine.dispose()


async def test_a_store_made_by_cf3ef53_is_upgraded_on_open(
    store_url: str, record_to: Callable[..., Recorder]
) -> None:
    url = engines.normalise_url(store_url)
    _make_old_store(url)
    engine = engines.engine_for(url)  # opening it upgrades it
    with engine.connect() as connection:
        assert engines.stored_version(connection) == engines.SCHEMA_VERSION

    # Its rows read as they were...
    (span,) = EventStore(store_url).get_executions(kind="workflow")
    assert (span["name"], span["status"], span["output"]) == ("old_note", "completed", "kept")
    assert [e["name"] for e in EventStore(store_url).get_execution("old-span")["events"]] == [
        "retry_wait"
    ]
    journal = journal_for(url)
    old_run = journal.get_run("old-run")
    assert old_run is not None and (old_run.status, old_run.steps) == ("completed", 1)
    assert list(journal.load_steps("old-run")) == ["old_note/draft#0"]

    # ... and new ones write.
    record_to(store_url)
    with override_model(FakeModel()):
        assert await note.run("tides", run_id="upgraded") == "Draft tides."
    names = {run["name"] for run in EventStore(store_url).get_executions(kind="workflow")}
    assert names == {"old_note", "note"}
    new_run = journal.get_run("upgraded")
    assert new_run is not None and new_run.status == "completed"


async def test_a_store_older_than_the_version_table_gets_the_columns_added_since(
    store_url: str, record_to: Callable[..., Recorder]
) -> None:
    url = engines.normalise_url(store_url)
    engine = engines.engine_for(url)
    with engine.begin() as connection:  # the store as a version before those columns left it
        connection.exec_driver_sql("DROP TABLE kagura_schema")
        connection.exec_driver_sql("DROP INDEX ix_kagura_spans_running")
        for table, columns in ADDED.items():
            for column in columns:
                connection.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
    engines.forget(url)

    record_to(store_url)
    with override_model(FakeModel()):
        assert await note.run("tides", run_id="upgraded") == "Draft tides."
    engine = engines.engine_for(url)
    found = inspect(engine)
    for table, columns in ADDED.items():
        assert set(columns) <= {c["name"] for c in found.get_columns(table)}
    assert "ix_kagura_spans_running" in {i["name"] for i in found.get_indexes("kagura_spans")}
    with engine.connect() as connection:
        assert engines.stored_version(connection) == engines.SCHEMA_VERSION
    (run,) = EventStore(store_url).get_executions(kind="workflow")
    assert (run["name"], run["status"]) == ("note", "completed")


def test_a_store_opened_again_is_not_migrated_again(store_url: str) -> None:
    url = engines.normalise_url(store_url)
    engine = engines.engine_for(url)
    assert engines.upgrade(engine) == engines.SCHEMA_VERSION  # found at the latest version


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_span_and_event_ids_are_as_long_as_run_ids_once_upgraded(store_url: str) -> None:
    """Stores made before version 4 have 64-character span and event ids, and PostgreSQL
    enforces it: a run whose id was longer had its spans refused. (A run id has up to 200, and a
    resumed attempt's span ``~2`` after it.)"""
    url = engines.normalise_url(store_url)
    _make_old_store(url)
    found = inspect(engines.engine_for(url))
    for table, columns in (
        ("kagura_spans", ("span_id", "run_id", "parent_id")),
        ("kagura_events", ("span_id", "run_id")),
    ):
        lengths = {c["name"]: getattr(c["type"], "length", None) for c in found.get_columns(table)}
        assert [lengths[c] for c in columns] == [255] * len(columns)


def test_the_name_index_of_a_version_4_store_is_made_with_the_durations(store_url: str) -> None:
    """Version 5 makes the index of spans by name and start time again, with their kind, status
    and duration: one agent's durations over part of a day are then read from the index alone
    (``stats(agent_name=..., since=...)``), not looked up span by span in the table."""
    url = engines.normalise_url(store_url)
    engine = engines.engine_for(url)
    with engine.begin() as connection:  # the store as version 4 left it
        connection.exec_driver_sql("DROP INDEX ix_kagura_spans_name_started_duration")
        connection.exec_driver_sql(
            "CREATE INDEX ix_kagura_spans_name_started ON kagura_spans (name, started_at)"
        )
        connection.execute(engines.schema_version.update().values(version=4))
    engines.forget(url)

    engine = engines.engine_for(url)
    with engine.connect() as connection:
        assert engines.stored_version(connection) == engines.SCHEMA_VERSION == 5
    indexes = {i["name"]: i["column_names"] for i in inspect(engine).get_indexes("kagura_spans")}
    assert "ix_kagura_spans_name_started" not in indexes
    assert indexes["ix_kagura_spans_name_started_duration"] == [
        "name",
        "started_at",
        "kind",
        "status",
        "duration_ms",
    ]
    if engine.dialect.name == "sqlite":
        durations = (
            "EXPLAIN QUERY PLAN SELECT duration_ms FROM kagura_spans WHERE name = 'a' "
            "AND kind = 'agent' AND started_at >= 1 AND started_at < 2 "
            "AND status NOT IN ('running', 'interrupted')"
        )
        with engine.connect() as connection:
            (plan,) = [row[-1] for row in connection.exec_driver_sql(durations)]
        assert "COVERING INDEX ix_kagura_spans_name_started_duration" in plan


def test_steps_another_process_took_meanwhile_are_not_taken_again(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that read an old version just before another finished upgrading (stood in for
    by a first read that says 0) reads it again under the lock for upgrades, and takes no step:
    step 3 would have rebuilt the rollups from the spans, under a writer already adding to them
    (on PostgreSQL the two deadlocked, and the writer's batch was lost)."""
    from kagura._storage import _migrations

    url = engines.normalise_url(store_url)
    engine = engines.engine_for(url)
    rollups = engines.rollups
    row = {"kind": "agent", "agent": "", "hour": 1, "name": "kept", "status": "completed"}
    sums = dict.fromkeys(("calls", "prompt_tokens", "completion_tokens", "total_tokens"), 1)
    with engine.begin() as connection:  # no span backs it: a rebuild would drop it
        connection.execute(rollups.insert().values(**row, **sums, cost_usd=0.0, unpriced=0))
    read = _migrations.stored_version
    reads = 0

    def stale_first(connection: Any) -> int:
        nonlocal reads
        reads += 1
        return 0 if reads == 1 else read(connection)

    monkeypatch.setattr(_migrations, "stored_version", stale_first)
    assert engines.upgrade(engine) == 0  # what it found first
    with engine.connect() as connection:
        assert [r.name for r in connection.execute(select(rollups))] == ["kept"]
        assert read(connection) == engines.SCHEMA_VERSION
    assert reads == 2  # the second, under the lock


def _stage_an_old_batch(url: str) -> None:
    """A batch in ``kagura_staged`` as cf3ef53's writer process left it when killed in a burst:
    the recorder's message, a finished agent span's row (ids as numbers) and an event."""
    import marshal

    finished = [7, 7, None, "agent", "staged_agent", "staged_agent", None, "completed"]
    finished += [10**9, 2 * 10**9, "m", 1, 2, None, 1, 0, None, None, b'{"t":"doc"}', "ok", None]
    events = [("0f0f0f0f0f0f0000000007", "0f0f0f0f0f0f0000000007", "retry_wait", 1.5, "{}")]
    message = ("rows", [], finished, events, "0f0f0f0f0f0f", 7, "elsewhere", None)
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(old.staged.insert(), {"spans": 2, "batch": marshal.dumps(message)})
    finally:
        engine.dispose()


def test_batches_an_earlier_version_left_staged_are_written_in_on_open(store_url: str) -> None:
    url = engines.normalise_url(store_url)
    _make_old_store(url)
    _stage_an_old_batch(url)
    engine = engines.engine_for(url)
    assert not inspect(engine).has_table("kagura_staged")
    execution = EventStore(store_url).get_execution("0f0f0f0f0f0f0000000007")
    assert execution is not None
    assert (execution["name"], execution["status"]) == ("staged_agent", "completed")
    assert (execution["inputs"], execution["output"]) == ({"t": "doc"}, "ok")
    assert execution["metrics"]["total_tokens"] == 3
    assert [e["name"] for e in execution["events"]] == ["retry_wait"]


def test_with_a_key_staged_batches_are_encrypted_when_written_in(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = engines.normalise_url(store_url)
    _make_old_store(url)
    _stage_an_old_batch(url)
    monkeypatch.setenv(ENV, generate_key())
    engines.engine_for(url)
    with engines.engine_for(url).connect() as connection:
        (stored,) = connection.execute(
            select(engines.spans).where(engines.spans.c.name == "staged_agent")
        ).all()
    assert is_encrypted(stored.inputs) and is_encrypted(stored.output)
    assert decrypt(stored.output) == '"ok"'
