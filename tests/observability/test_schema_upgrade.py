"""A store made by an earlier version opens with this one: it is upgraded on open (see
``kagura._storage._migrations``), its rows read as they were, and recording and durable runs
write new ones into it. On SQLite and PostgreSQL (see ``store_url``)."""

from __future__ import annotations

import asyncio
import logging
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, select

from kagura import _instrument as instrument
from kagura import _storage as engines
from kagura import agent, workflow
from kagura._encryption import ENV, decrypt, generate_key, is_encrypted
from kagura.durable._journal import journal_for
from kagura.errors import StoreError
from kagura.observability import EventStore, Recorder
from kagura.testing import FakeModel, override_model

from . import schema_cf3ef53 as old
from .conftest import child_env, rows

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


def _back_to_version_4(url: str) -> None:
    """Make the store at ``url`` (normalised) as version 4 left it: the index that version 5
    makes again as it was. (This process's engine stays open: ``engines.forget`` it to open the
    store again.)"""
    with engines.engine_for(url).begin() as connection:
        connection.exec_driver_sql("DROP INDEX ix_kagura_spans_name_started_duration")
        connection.exec_driver_sql(
            "CREATE INDEX ix_kagura_spans_name_started ON kagura_spans (name, started_at)"
        )
        connection.execute(engines.schema_version.update().values(version=4))


def test_the_name_index_of_a_version_4_store_is_made_with_the_durations(store_url: str) -> None:
    """Version 5 makes the index of spans by name and start time again, with their kind, status
    and duration: one agent's durations over part of a day are then read from the index alone
    (``stats(agent_name=..., since=...)``), not looked up span by span in the table."""
    url = engines.normalise_url(store_url)
    _back_to_version_4(url)
    engines.forget(url)

    engine = engines.engine_for(url)
    with engine.connect() as connection:
        assert engines.stored_version(connection) == engines.SCHEMA_VERSION
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


def test_a_version_5_store_gets_its_runs_indexed_by_time_of_update(store_url: str) -> None:
    """Version 6 indexes durable runs by their time of update alone: the last runs updated
    (``kagura runs list``) are read from the end of that index, not found by sorting them all."""
    url = engines.normalise_url(store_url)
    with engines.engine_for(url).begin() as connection:
        connection.exec_driver_sql("DROP INDEX ix_kagura_runs_updated")
        connection.execute(engines.schema_version.update().values(version=5))
    engines.forget(url)

    engine = engines.engine_for(url)
    with engine.connect() as connection:
        assert engines.stored_version(connection) == engines.SCHEMA_VERSION
    indexes = {i["name"]: i["column_names"] for i in inspect(engine).get_indexes("kagura_runs")}
    assert indexes["ix_kagura_runs_updated"] == ["updated_at"]
    if engine.dialect.name == "sqlite":
        last = "EXPLAIN QUERY PLAN SELECT * FROM kagura_runs ORDER BY updated_at DESC LIMIT 50"
        with engine.connect() as connection:
            plan = " ".join(row[-1] for row in connection.exec_driver_sql(last))
        assert "USING INDEX ix_kagura_runs_updated" in plan
        assert "TEMP B-TREE" not in plan  # no sort


def test_a_version_6_store_keeps_each_runs_lease_from_then_on(store_url: str) -> None:
    """Version 7 keeps each durable run's lease with it. Runs journaled before have none: they
    are judged by the reader's ``KAGURA_LEASE_SECONDS``, as they were."""
    url = engines.normalise_url(store_url)
    journal = journal_for(url)
    journal.start("before", "wf", None, "{}", owner="them")
    journal.flush()
    with engines.engine_for(url).begin() as connection:
        connection.exec_driver_sql("ALTER TABLE kagura_runs DROP COLUMN lease_seconds")
        connection.execute(engines.schema_version.update().values(version=6))
    engines.forget(url)

    engine = engines.engine_for(url)
    with engine.connect() as connection:
        assert engines.stored_version(connection) == engines.SCHEMA_VERSION == 7
    assert "lease_seconds" in {c["name"] for c in inspect(engine).get_columns("kagura_runs")}
    journal = journal_for(url)
    journal.start("after", "wf", None, "{}", owner="us")
    before, after = journal.get_run("before"), journal.get_run("after")
    assert before is not None and after is not None
    assert (before.lease_seconds, before.lease(30.0)) == (None, 30.0)
    assert (before.status, after.status, after.lease_seconds) == ("running", "running", 30.0)


def test_a_store_a_newer_version_changed_says_so_when_it_cannot_be_read(store_url: str) -> None:
    """A newer version may change what this one reads: the error said only "no such column"."""
    url = engines.normalise_url(store_url)
    with engines.engine_for(url).begin() as connection:
        connection.exec_driver_sql("ALTER TABLE kagura_spans RENAME COLUMN model TO model_name")
        connection.execute(engines.schema_version.update().values(version=99))
    engines.forget(url)
    with pytest.raises(StoreError) as raised:
        EventStore(store_url).get_executions()
    message = str(raised.value)
    assert message.startswith(f"event store {engines.store_name(url)}: cannot read: ")
    assert message.endswith(
        "the store was made by a newer version of Kagura (schema version 99; this one knows "
        f"up to {engines.SCHEMA_VERSION}): upgrade kagura to use it"
    )


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


#: A process opening a store, as any does (``engine_for``), whose last step of the upgrade stands
#: still before its commit, holding the locks it took, until the process reads a line.
SLOW_UPGRADER = """
import sys
from kagura import _storage as engines
from kagura._storage import _migrations

last = _migrations.STEPS[-1]

def slow(connection):
    last(connection)
    print("upgrading", flush=True)
    sys.stdin.readline()

_migrations.STEPS = (*_migrations.STEPS[:-1], slow)
engines.engine_for(sys.argv[1])
print("upgraded", flush=True)
"""


class _SlowUpgrader:
    """``SLOW_UPGRADER`` on the store at ``url``, in a process of its own. Made, it stands still
    in the upgrade's last step; :meth:`go_on` lets it finish, :meth:`kill` kills it there. Left
    running at the end of the ``with`` block, it is killed."""

    def __init__(self, url: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SLOW_UPGRADER, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env({}),
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline() != "upgrading\n":
            self.process.kill()
            raise AssertionError(self.process.communicate(timeout=60))

    def go_on(self) -> None:
        out, err = self.process.communicate("go on\n", timeout=90)
        assert (self.process.returncode, out) == (0, "upgraded\n"), err

    def kill(self) -> None:
        self.process.kill()
        assert self.process.wait(timeout=90) == -signal.SIGKILL

    def __enter__(self) -> _SlowUpgrader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=90)


class _Said(logging.Handler):
    """The messages of ``kagura.storage`` (from INFO up) while it is in a ``with`` block;
    ``waiting`` is set once one says that it waits for an upgrade (or by the test, when what
    should wait did not)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.waiting = threading.Event()
        self.logger = logging.getLogger("kagura.storage")
        monkeypatch.setattr(self.logger, "level", logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if "is upgrading" in self.messages[-1]:
            self.waiting.set()

    def __enter__(self) -> _Said:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.logger.removeHandler(self)


class _Opener(threading.Thread):
    """Opens the store at ``url`` as any process does (``engine_for``), in a thread of this
    one: ``ended`` holds ``None`` once it has, or the error it failed with; ``then`` is called
    either way."""

    def __init__(self, url: str, then: Callable[[], object] = lambda: None) -> None:
        super().__init__()
        self.url = url
        self.then = then
        self.ended: list[BaseException | None] = []

    def run(self) -> None:
        try:
            engines.engine_for(self.url)
            self.ended.append(None)
        except BaseException as error:
            self.ended.append(error)
        finally:
            self.then()


@pytest.mark.parametrize("upgrader_ends", ["finishing", "killed"])
def test_a_process_opening_a_store_another_is_upgrading_waits_for_it(
    store_url: str, upgrader_ends: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade takes minutes on a store of millions of calls. A process that opened the
    store meanwhile gave up after SQLite's busy timeout ("database is locked"), its recording
    turned off or its durable run failed. It now waits for the upgrader however long it takes,
    and says so. It takes no step itself when the upgrader finishes; when the upgrader is killed
    mid-step, it takes that step. (The busy timeout is made short here: it is not what the
    process waits on.)"""
    from kagura._storage import _engine, _migrations

    url = engines.normalise_url(store_url)
    _back_to_version_4(url)
    engines.forget(url)
    monkeypatch.setattr(_engine, "_BUSY_TIMEOUT_S", 0.5)
    taken: list[str] = []

    def counted(step: Callable[[Any], None]) -> Callable[[Any], None]:
        def take(connection: Any) -> None:
            taken.append(step.__name__)
            step(connection)

        return take

    last_step = _migrations.STEPS[-1].__name__  # where the upgrader stands still
    monkeypatch.setattr(_migrations, "STEPS", tuple(counted(s) for s in _migrations.STEPS))
    with _Said(monkeypatch) as said, _SlowUpgrader(url) as upgrader:
        opener = _Opener(url, then=said.waiting.set)
        opener.start()
        try:
            assert said.waiting.wait(timeout=90)
            assert not opener.ended, opener.ended  # it waits, and has not failed
            (waiting,) = said.messages
            assert engines.store_name(url) in waiting
            # The upgrader stands in the last step, the ones before it committed.
            last = engines.SCHEMA_VERSION
            assert f"from schema version {last - 1} to {last}" in waiting
            if upgrader_ends == "killed":
                upgrader.kill()
            else:
                upgrader.go_on()
        finally:
            opener.join(timeout=90)
    assert opener.ended == [None]
    # Finished, the upgrader took the step and this process found it taken; killed mid-step,
    # it left the step to this process.
    assert taken == ([] if upgrader_ends == "finishing" else [last_step])
    assert said.messages[-1].startswith("kagura: waited ")
    with engines.engine_for(url).connect() as connection:
        assert engines.stored_version(connection) == engines.SCHEMA_VERSION
    if (path := engines.sqlite_path(url)) is not None:
        lock = Path(path).with_name(".events.db.upgrade.lock")
        assert lock.exists() and lock.stat().st_size == 0


#: A process opening a store, as any does, that says when it waits for the store's own lock
#: (see ``_migrations._locked_version``), and when it has opened the store.
OPENER = """
import sys
from kagura import _storage as engines
from kagura._storage import _migrations

locked_version = _migrations._locked_version

def parked(connection):
    print("parked", flush=True)
    return locked_version(connection)

_migrations._locked_version = parked
engines.engine_for(sys.argv[1])
print("opened", flush=True)
"""


def test_processes_opening_a_store_another_is_making_wait_without_a_word(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new store is made in one transaction. Made step by step, processes that opened it
    meanwhile found it part made and took it for an older store being upgraded: the first took
    the upgraders' lock to go on with it, and the next logged a warning that it waited for that
    one's upgrade (four processes starting together on a new store did)."""
    from kagura._storage import _migrations

    url = engines.normalise_url(store_url)  # nothing made there yet
    parked: queue.Queue[str] = queue.Queue()  # what this process waits for first
    locked_version = _migrations._locked_version

    def waiting_for_the_lock(connection: Any) -> int:
        parked.put("the store's lock")
        return locked_version(connection)

    monkeypatch.setattr(_migrations, "_locked_version", waiting_for_the_lock)
    with _Said(monkeypatch) as said, _SlowUpgrader(url) as maker:
        # Meanwhile: one process that waits for the store (to make it, or to go on with it),
        # then this one; then the maker goes on.
        first = subprocess.Popen(
            [sys.executable, "-c", OPENER, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env({}),
        )
        opener = _Opener(url)
        try:
            assert first.stdout is not None
            assert first.stdout.readline() == "parked\n", first.communicate(timeout=60)
            monkeypatch.setattr(said, "emit", lambda record: parked.put(record.getMessage()))
            opener.start()
            waited_for = parked.get(timeout=90)
            maker.go_on()
            out, err = first.communicate(timeout=90)
        finally:
            if first.poll() is None:
                first.kill()
                first.communicate()
            if opener.ident is not None:  # started
                opener.join(timeout=90)
    assert waited_for == "the store's lock"
    assert (first.returncode, out, opener.ended) == (0, "opened\n", [None]), err
    assert "kagura:" not in err
    with engines.engine_for(url).connect() as connection:
        assert engines.stored_version(connection) == engines.SCHEMA_VERSION


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("writing", ["recordings", "a durable run"])
async def test_writes_of_a_process_that_had_the_store_open_wait_for_an_upgrade_of_it(
    store_url: str,
    writing: str,
    record_to: Callable[..., Recorder],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process that had the store open before another began to upgrade it (of a newer
    version, whose upgrade may take minutes) found it locked for the whole of SQLite's busy
    timeout: its writer dropped the batch of recordings, its durable run failed. Its writes now
    wait for the upgrade, say so, and are written once it is done. (On PostgreSQL a write waits
    for the upgrade's locks by itself.)"""
    from kagura._storage import _engine

    url = engines.normalise_url(store_url)
    monkeypatch.setattr(_engine, "_BUSY_TIMEOUT_S", 0.5)
    engines.engine_for(url)  # open, at this version
    _back_to_version_4(url)  # then behind, as a newer version finds it
    recorder = Recorder(url, process=False, flush_interval=3600)
    written: asyncio.Future[Any]
    try:
        with (
            _Said(monkeypatch) as said,
            _SlowUpgrader(url) as upgrader,
            override_model(FakeModel()),
        ):
            if writing == "recordings":
                instrument.add_sink(recorder)
                await asyncio.gather(*(draft(f"topic {i}") for i in range(10)))
                written = asyncio.ensure_future(asyncio.to_thread(recorder.flush, 90))
            else:
                record_to(url)
                written = asyncio.ensure_future(note.run("tides", run_id="meanwhile"))
            written.add_done_callback(lambda _: said.waiting.set())
            assert await asyncio.to_thread(said.waiting.wait, 90)
            assert not written.done(), written  # it waits, and has not failed
            assert "is upgrading the store" in said.messages[0]
            await asyncio.to_thread(upgrader.go_on)
            outcome = await asyncio.wait_for(written, 90)
    finally:
        instrument.remove_sink(recorder)
        recorder.close()
    if writing == "recordings":
        assert outcome is True
        assert (recorder.written_spans, recorder.failed_batches) == (20, 0)
        assert len([r for r in rows(url) if r["name"] == "draft"]) == 10
    else:
        assert outcome == "Draft tides."
        run = journal_for(url).get_run("meanwhile")
        assert run is not None and (run.status, run.steps) == ("completed", 1)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_a_store_locked_by_anything_but_an_upgrade_fails_a_write_after_the_busy_timeout(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only an upgrade is waited for without limit: a write to a store that another
    connection holds locked fails after the busy timeout, as it did, even where an earlier
    upgrade left its lock file."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from kagura._storage import _engine

    url = engines.normalise_url(store_url)
    monkeypatch.setattr(_engine, "_BUSY_TIMEOUT_S", 0.2)
    engines.forget(url)
    engine = engines.engine_for(url)
    path = Path(store_url)
    path.with_name(f".{path.name}.upgrade.lock").touch()  # as an earlier upgrade left it
    holder = sqlite3.connect(store_url)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(OperationalError, match="database is locked"):
            engines.transaction(
                engine, lambda c: c.execute(engines.schema_version.update().values(version=5))
            )
    finally:
        holder.close()


#: Agent calls, recorded (the default recorder, its writer process), once this process reads a
#: line; then it exits, leaving its writer to finish.
RECORDING = """
import asyncio, sys
from kagura import agent
from kagura.testing import FakeModel

@agent(model=FakeModel())
async def summarise(text: str) -> str:
    '''Summarise: {{ text }}'''

async def main():
    await asyncio.gather(*(summarise(str(i)) for i in range(int(sys.argv[1]))))

asyncio.run(main())
print("called", flush=True)
sys.stdin.readline()
"""


def test_calls_recorded_while_another_process_upgrades_the_store_are_all_written(
    store_url: str,
) -> None:
    """The whole way: a process records agent calls while another upgrades the store. Its
    writer process waits for the upgrade (and says so, relayed to the process's stderr), then
    writes every call: none is lost, and recording was never turned off."""
    url = engines.normalise_url(store_url)
    _back_to_version_4(url)
    engines.forget(url)
    calls = 50
    with _SlowUpgrader(url) as upgrader:
        recording = subprocess.Popen(
            [sys.executable, "-c", RECORDING, str(calls)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env({"KAGURA_DB": url}),
        )
        try:
            assert recording.stderr is not None
            said: list[str] = []
            while not any(m in "".join(said[-1:]) for m in ("is upgrading", "recording is off")):
                said.append(recording.stderr.readline())
                assert said[-1], ("".join(said), recording.communicate(timeout=60))
            assert "recording is off" not in said[-1], said
            upgrader.go_on()
            out, err = recording.communicate("exit\n", timeout=90)
            assert (recording.returncode, out) == (0, "called\n"), err
            assert "recording is off" not in err
        finally:
            if recording.poll() is None:
                recording.kill()
                recording.communicate()
    summaries = [r for r in rows(url) if r["name"] == "summarise"]
    assert len(summaries) == calls
    assert {r["status"] for r in summaries} == {"completed"}


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
