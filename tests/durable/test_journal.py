"""The journal's own guarantees, below the workflow level."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kagura._storage import runs
from kagura.durable import Journal
from kagura.durable._journal import _CHUNK, _Flush, _Request
from kagura.errors import RunTakenOverError, StoreError
from kagura.testing import FakeModel
from tests.observability.conftest import wait_for_lock_waits

from . import workflows
from .conftest import wait_until


def test_flush_waits_for_steps_the_writer_is_still_committing(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``finish`` and ``load_steps`` flush first: with the queue already emptied by the writer
    thread, flush must still wait until those rows are committed."""
    taken, release = threading.Event(), threading.Event()
    committed: list[bool] = []
    write = Journal._write_batch

    def held_write(self: Journal, batch: list[Any]) -> None:
        taken.set()
        assert release.wait(10)
        write(self, batch)
        committed.append(True)

    journal.start("run-1", "wf", None, "{}", owner="me")
    monkeypatch.setattr(Journal, "_write_batch", held_write)

    async def commit() -> None:
        await journal.commit_step("run-1", "me", "wf/step#0", "step", "step", "hash", "1")

    step = threading.Thread(target=asyncio.run, args=(commit(),))
    step.start()
    assert taken.wait(10)  # the writer has taken the row off the queue, not committed it

    seen: list[bool] = []

    def flush() -> None:
        journal.flush(10)
        seen.append(bool(committed))

    flusher = threading.Thread(target=flush)
    flusher.start()
    # Either flush returned at once (the bug) or it queued its marker and waits behind the row.
    wait_until(
        lambda: not flusher.is_alive() or any(isinstance(i, _Flush) for i in list(journal._queue)),
        "flush to return or to wait",
    )
    release.set()
    flusher.join(10)
    step.join(10)
    assert seen == [True]
    assert set(journal.load_steps("run-1")) == {"wf/step#0"}


def test_a_late_heartbeat_does_not_revive_a_released_lease(journal: Journal) -> None:
    """A cancelled run gives its lease up; a heartbeat already on its way (its thread cannot be
    cancelled) must not take it back, or the run could not be resumed for a whole lease."""
    outcome, _ = journal.start("run-1", "wf", None, "{}", owner="me")
    assert outcome == "started"
    assert journal.heartbeat("run-1", "me")
    journal.release("run-1", "me")
    assert not journal.heartbeat("run-1", "me")
    assert [r.run_id for r in journal.list_runs(status="interrupted")] == ["run-1"]
    assert journal.claim("run-1", "you")
    assert journal.heartbeat("run-1", "you")
    assert not journal.heartbeat("run-1", "me")


# PostgreSQL syncs every commit as its server is configured to (by default, it does).
@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_journal_commits_are_synced_to_disk(journal: Journal) -> None:
    """A step the workflow has seen survives the machine going down, not only the process: on
    SQLite, the journal's connections sync every commit (the recorder's need not)."""
    from kagura._storage import engine_for

    with journal.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar_one() == 2  # FULL
    with engine_for(journal.url).connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar_one() == 1  # NORMAL


def waits_for_the_disk(dialect: str, dbapi_connection: Any) -> bool:
    """Whether a commit on this connection, now, returns only once it is on disk."""
    if dialect == "sqlite":
        return bool(dbapi_connection.execute("PRAGMA synchronous").fetchone()[0] == 2)  # FULL
    return bool(dbapi_connection.execute("SHOW synchronous_commit").fetchone()[0] == "on")


@pytest.fixture
def batches(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[tuple[set[str], bool | None]]]:
    """Each batch the journal's writer commits from now on: the kinds of its writes, and whether
    its commit waited for the disk (read on its connection as it commits)."""
    from sqlalchemy import event

    seen: list[tuple[set[str], bool | None]] = []
    kinds: list[set[str]] = []  # the batch being written (a heartbeat commits between them)

    def on_commit(connection: Any) -> None:
        if kinds:
            dbapi_connection = connection.connection.dbapi_connection
            # Before the batch's callers are answered: they may look at once.
            seen.append(
                (kinds.pop(), waits_for_the_disk(connection.dialect.name, dbapi_connection))
            )

    write = Journal._write_batch

    def spy(self: Journal, batch: list[_Request]) -> None:
        # Only the writer's thread calls this. No assert here: an error would end that thread.
        kinds[:] = [{request.kind for request in batch}]
        write(self, batch)
        if kinds:
            seen.append((kinds.pop(), None))  # not committed

    syncing_every_commit(journal)
    monkeypatch.setattr(Journal, "_write_batch", spy)
    event.listen(journal.engine, "commit", on_commit)
    try:
        yield seen
    finally:
        event.remove(journal.engine, "commit", on_commit)


def syncing_every_commit(journal: Journal) -> None:
    """On PostgreSQL, this test's database syncs every commit the journal does not say may go
    unsynced. The tests' server does not sync commits (``synchronous_commit=off``)."""
    if journal.engine.dialect.name == "postgresql":
        with journal.engine.begin() as connection:
            name = connection.exec_driver_sql("SELECT current_database()").scalar_one()
            connection.exec_driver_sql(f'ALTER DATABASE "{name}" SET synchronous_commit = on')
        journal.engine.dispose()  # its sessions, made before, keep the server's setting


@pytest.fixture
def commits(journal: Journal) -> Iterator[list[bool]]:
    """For each commit on the journal's engine from now on: whether it waited for the disk."""
    from sqlalchemy import event

    seen: list[bool] = []

    def on_commit(connection: Any) -> None:
        dbapi_connection = connection.connection.dbapi_connection
        seen.append(waits_for_the_disk(connection.dialect.name, dbapi_connection))

    syncing_every_commit(journal)
    event.listen(journal.engine, "commit", on_commit)
    try:
        yield seen
    finally:
        event.remove(journal.engine, "commit", on_commit)


def test_a_run_waits_for_the_disk_outside_its_batches_only_for_a_failure(
    journal: Journal, commits: list[bool]
) -> None:
    """The journal's calls outside the writer's batches (a resume's claim, a lease renewal, the
    Ray worker's finish of a cancelled run) follow the batches' rule: a failure is synced, since
    resuming a run whose failure a power cut took would call again what failed."""
    journal.start("run-1", "wf", None, "{}", "me")
    assert journal.heartbeat("run-1", "me")
    journal.release("run-1", "me")
    assert journal.claim("run-1", "you")
    journal.finish("run-1", "you", result="1")
    journal.start("run-2", "wf", None, "{}", "me")
    journal.finish("run-2", "me", error=KeyError("boom"))
    assert commits == [False, False, False, False, False, False, True]
    first, second = journal.get_run("run-1"), journal.get_run("run-2")
    assert first is not None and (first.status, first.attempts) == ("completed", 2)
    assert second is not None and (second.status, second.error_type) == ("failed", "KeyError")


async def test_only_a_batch_holding_a_step_waits_for_the_disk(
    journal: Journal, batches: list[tuple[set[str], bool | None]]
) -> None:
    """A step is what a resumed run must not do again: its batch is on disk before the step's
    caller hears of it, as is a run's failure. A run's start, release and successful finish
    alone are not synced (see the journal's docstring), and the journal's next transaction on
    that connection syncs again."""
    await journal.start_soon("run-1", "wf", None, "{}", "me")
    await journal.commit_step("run-1", "me", "wf/step#0", "step", "step", "hash", "1")
    with journal._writing:  # the writer takes a start and a step in one batch once this lets go
        together = (
            journal.start_soon("run-2", "wf", None, "{}", "you"),
            journal.commit_step("run-1", "me", "wf/step#1", "step", "step", "h", "2", 1),
        )
    await asyncio.gather(*together)
    await journal.finish_soon("run-1", "me", result="2")
    await journal.release_soon("run-2", "you")
    await journal.start_soon("run-3", "wf", None, "{}", "me")
    await journal.finish_soon("run-3", "me", error=KeyError("boom"))
    assert batches == [
        ({"start"}, False),
        ({"step"}, True),
        ({"start", "step"}, True),
        ({"finish"}, False),
        ({"release"}, False),
        ({"start"}, False),
        ({"finish"}, True),
    ]
    with journal.engine.begin() as connection:
        assert waits_for_the_disk(connection.dialect.name, connection.connection.dbapi_connection)
    first, second = journal.get_run("run-1"), journal.get_run("run-2")
    assert first is not None and (first.status, first.result) == ("completed", "2")
    assert second is not None and second.status == "interrupted"
    assert set(journal.load_steps("run-1")) == {"wf/step#0", "wf/step#1"}


async def test_the_writes_of_one_turn_of_the_loop_go_in_one_batch(
    journal: Journal, batches: list[tuple[set[str], bool | None]]
) -> None:
    """The writer is woken after the event loop's turn, not by its first write: runs started
    together (and steps answered together) share a commit, where the writer, woken at once,
    would take the first write or two alone."""
    await journal.start_soon("run-0", "wf", None, "{}", "me")  # the writer waits again now
    started = [journal.start_soon(f"run-{n}", "wf", None, "{}", "me") for n in range(1, 51)]
    assert not journal._wake.is_set()
    outcomes = await asyncio.gather(*started)
    assert {outcome for outcome, _, _ in outcomes} == {"started"}
    assert batches == [({"start"}, False), ({"start"}, False)]
    assert not journal._waking  # the loop's wake came: no loop is left to wake the writer


async def test_a_bug_in_writing_a_batch_fails_its_callers_and_the_writer_goes_on(
    journal: Journal, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The store's own errors are answered to each caller inside ``_write_batch``. Anything else
    escaping it is a bug: its callers get the error, and the writer's thread lives on to take
    the next batch. Had the thread ended, a write queued as it went would wait for ever."""
    write, bugs = Journal._write_batch, [RuntimeError("a bug")]

    def buggy(self: Journal, batch: list[_Request]) -> None:
        if bugs:
            raise bugs.pop()
        write(self, batch)

    monkeypatch.setattr(Journal, "_write_batch", buggy)
    with pytest.raises(RuntimeError, match="a bug"):
        await journal.start_soon("run-1", "wf", None, "{}", "me")
    assert "the journal failed to write 1 durable writes" in caplog.text
    outcome, _, _ = await journal.start_soon("run-1", "wf", None, "{}", "me")
    assert outcome == "started"


async def test_a_workflows_steps_are_synced_and_its_start_and_finish_are_not(
    journal: Journal, model: FakeModel, tmp_path: Path, batches: list[tuple[set[str], bool | None]]
) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    await workflows.gated.run("tea", str(gate), run_id="order-42")
    assert batches, "the run committed nothing"
    assert all(synced == ("step" in kinds) for kinds, synced in batches), batches
    assert [kinds for kinds, _ in batches][:: len(batches) - 1] == [{"start"}, {"finish"}]


async def test_a_run_whose_finish_a_power_cut_took_is_answered_from_its_journal(
    journal: Journal, model: FakeModel, tmp_path: Path
) -> None:
    """The finish is not synced on its own. Should a power cut take it, the run reads as
    interrupted; starting its id again resumes it, and every step is replayed from the journal:
    the provider is not called again."""
    gate = tmp_path / "gate"
    gate.touch()
    expected = "Review this: Draft a note about tea."
    assert await workflows.gated.run("tea", str(gate), run_id="order-42") == expected
    calls = len(model.requests)
    with journal.engine.begin() as connection:  # the run's row as it was before its finish
        connection.exec_driver_sql(
            "UPDATE kagura_runs SET status = 'running', result = NULL, heartbeat_at = 0.0 "
            "WHERE run_id = 'order-42'"
        )
    record = journal.get_run("order-42")
    assert record is not None and record.status == "interrupted"
    assert await workflows.gated.run("tea", str(gate), run_id="order-42") == expected
    assert len(model.requests) == calls
    record = journal.get_run("order-42")
    assert record is not None and (record.status, record.attempts) == ("completed", 2)


async def test_a_batch_of_more_starts_than_one_insert_takes(journal: Journal) -> None:
    """Runs started in one batch go in as one INSERT per chunk of rows: each new run, across
    the chunks, is told it started; an id already in the journal is not created again, and the
    batch's finishes and releases reach the runs they name."""
    journal.start("run-existing", "wf", None, "{}", owner="first")
    ids = [f"run-{i}" for i in range(_CHUNK * 2 + 1)]
    starts = [
        _Request("start", journal._start_values(run_id, "wf", None, "{}", f"owner-{i}"))
        for i, run_id in enumerate([*ids, "run-existing"])
    ]
    await asyncio.to_thread(journal._write_batch, starts)
    outcomes = [await request.future for request in starts]
    assert [outcome for outcome, _, _ in outcomes] == ["started"] * len(ids) + ["busy"]
    assert outcomes[-1][1].owner == "first"

    ends = [
        _Request("finish", journal._finish_values(ids[0], "owner-0", "1", None)),
        _Request(
            "finish", journal._finish_values(ids[-1], f"owner-{len(ids) - 1}", None, KeyError())
        ),
        _Request("release", {"b_run_id": ids[1], "b_owner": "owner-1"}),
        _Request("finish", journal._finish_values(ids[2], "not-its-owner", "1", None)),
    ]
    await asyncio.to_thread(journal._write_batch, ends)
    results = await asyncio.gather(*(request.future for request in ends), return_exceptions=True)
    assert results[:3] == [None, None, None]
    assert isinstance(results[3], RunTakenOverError)
    first, released, last, other = (journal.get_run(i) for i in (ids[0], ids[1], ids[-1], ids[2]))
    assert first is not None and (first.status, first.result) == ("completed", "1")
    assert last is not None and (last.status, last.error_type) == ("failed", "KeyError")
    assert released is not None and released.status == "interrupted"
    assert other is not None and other.status == "running"


async def test_runs_claimed_and_listed_past_one_chunk_each_get_their_own_steps(
    journal: Journal,
) -> None:
    """Claims in one batch read their runs and steps in chunks of ids, as listings count steps:
    each run, across the chunks, comes back with its own steps, and a run no claim could take
    (held, or of another workflow) is read but not taken."""
    ids = [f"run-{i}" for i in range(_CHUNK * 2 + 1)]
    starts = [
        _Request("start", journal._start_values(run_id, "wf", None, "{}", f"owner-{i}"))
        for i, run_id in enumerate(ids)
    ]
    await asyncio.to_thread(journal._write_batch, starts)
    assert {(await request.future)[0] for request in starts} == {"started"}
    writes = [
        _Request(
            "step",
            {
                "b_run_id": run_id,
                "b_owner": f"owner-{i}",
                "run_id": run_id,
                "step_key": f"wf/step#{n}",
                "name": "step",
                "kind": "step",
                "input_hash": "hash",
                "output": f"{run_id}:{n}",
                "created_at": 0.0,
                "position": n,
            },
        )
        for i, run_id in enumerate(ids)
        for n in range(i % 3)
    ]
    writes += [
        _Request("release", {"b_run_id": run_id, "b_owner": f"owner-{i}"})
        for i, run_id in enumerate(ids[:-1])  # the last stays held by its owner
    ]
    await asyncio.to_thread(journal._write_batch, writes)
    assert await asyncio.gather(*(request.future for request in writes)) == [None] * len(writes)

    claims = [
        _Request("claim", {"run_id": run_id, "owner": f"new-{i}", "workflow": "wf"})
        for i, run_id in enumerate(ids)
    ]
    claims.append(_Request("claim", {"run_id": ids[0], "owner": "other", "workflow": "other"}))
    claims.append(_Request("claim", {"run_id": "run-unknown", "owner": "x", "workflow": "wf"}))
    await asyncio.to_thread(journal._write_batch, claims)
    answers = [await request.future for request in claims]
    for i, (record, steps) in enumerate(answers[: len(ids)]):
        assert record is not None and record.run_id == ids[i]
        assert record.steps == i % 3
        if i == len(ids) - 1:
            assert steps is None and record.owner == f"owner-{i}"  # held: not taken
            continue
        assert (record.owner, record.attempts, record.status) == (f"new-{i}", 2, "running")
        assert steps is not None
        assert {key: step.output for key, step in steps.items()} == {
            f"wf/step#{n}": f"{ids[i]}:{n}" for n in range(i % 3)
        }
    assert answers[-2][1] is None and answers[-2][0] is not None  # another workflow's run
    assert answers[-1] == (None, None)
    listed = {record.run_id: record.steps for record in journal.list_runs(limit=None)}
    assert listed == {run_id: i % 3 for i, run_id in enumerate(ids)}


async def ended_and_open_runs(journal: Journal) -> None:
    """``done`` completed and ``broken`` failed, ``held`` running (this process holds it) and
    ``dropped`` interrupted (its lease given up): a step each."""
    for run_id in ("done", "broken", "held", "dropped"):
        await journal.start_soon(run_id, "wf", None, "{}", f"owner-{run_id}")
        await journal.commit_step(
            run_id, f"owner-{run_id}", "wf/step#0", "step", "step", "hash", f'"{run_id}"'
        )
    await journal.finish_soon("done", "owner-done", result='"ok"')
    await journal.finish_soon("broken", "owner-broken", error=KeyError("boom"))
    await journal.release_soon("dropped", "owner-dropped")


def age_runs(journal: Journal, run_ids: list[str], seconds: float) -> None:
    """Make ``run_ids`` look as if they were last updated ``seconds`` ago."""
    with journal.engine.begin() as connection:
        connection.execute(
            runs.update()
            .where(runs.c.run_id.in_(run_ids))
            .values(updated_at=runs.c.updated_at - seconds, created_at=runs.c.created_at - seconds)
        )


async def test_retention_deletes_runs_that_ended_before_the_cutoff_and_keeps_resumable_ones(
    journal: Journal,
) -> None:
    """Runs that completed or failed before the cutoff go, with their steps; a running or
    interrupted run stays however old (it may be resumed), and so does one that ended since.
    A deleted run's id is free again: starting it starts a new run."""
    await ended_and_open_runs(journal)
    await journal.start_soon("recent", "wf", None, "{}", "owner-recent")
    await journal.finish_soon("recent", "owner-recent", result='"ok"')
    day = 86400.0
    age_runs(journal, ["done", "broken", "held", "dropped"], 10 * day)

    assert journal.delete_older_than(timedelta(days=30)) == 0
    assert journal.delete_older_than(7 * day) == 2  # seconds
    assert journal.get_run("done") is None and journal.get_run("broken") is None
    assert journal.load_steps("done") == {} and journal.load_steps("broken") == {}
    kept = {r.run_id: (r.status, r.steps) for r in journal.list_runs(limit=None)}
    assert kept == {
        "held": ("running", 1),
        "dropped": ("interrupted", 1),
        "recent": ("completed", 0),
    }
    assert journal.delete_older_than(datetime.now(tz=UTC) - timedelta(days=7)) == 0
    assert journal.delete_older_than(0) == 1  # the recent one, which ended before now

    outcome, record, steps = await journal.start_soon("done", "wf", None, "{}", "owner-again")
    assert (outcome, record.attempts, steps) == ("started", 1, {})


async def test_retention_deletes_in_batches_and_keeps_a_run_resumed_meanwhile(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention deletes a batch of runs at a time, each deleted only if it still ended before
    the cutoff when its batch commits: a failed run that another process resumed after
    retention chose it is kept, steps and all."""
    from sqlalchemy import event

    from kagura.durable import _journal

    monkeypatch.setattr(_journal, "RETENTION_BATCH", 2)
    await ended_and_open_runs(journal)
    for n in range(3):
        await journal.start_soon(f"more-{n}", "wf", None, "{}", f"owner-more-{n}")
        await journal.finish_soon(f"more-{n}", f"owner-more-{n}", result='"ok"')
    age_runs(journal, ["done", "broken", "held", "dropped", "more-0", "more-1", "more-2"], 86400)

    resumed: list[bool] = []

    def resume_broken_once_chosen(
        connection: Any, cursor: Any, statement: str, parameters: Any, *_: Any
    ) -> None:
        if statement.startswith("DELETE FROM kagura_runs") and "broken" in parameters:
            # Another process resumes it now, from a connection of its own: committed before
            # the batch that chose it deletes.
            claim = threading.Thread(
                target=lambda: resumed.append(journal.claim("broken", "resumer"))
            )
            claim.start()
            claim.join()

    event.listen(journal.engine, "before_cursor_execute", resume_broken_once_chosen)
    try:
        deleted = journal.delete_older_than(3600)
    finally:
        event.remove(journal.engine, "before_cursor_execute", resume_broken_once_chosen)
    assert resumed == [True]
    assert deleted == 4  # done and more-0 to more-2, two by two
    kept = {r.run_id: (r.status, r.steps) for r in journal.list_runs(limit=None)}
    assert kept == {
        "broken": ("running", 1),
        "held": ("running", 1),
        "dropped": ("interrupted", 1),
    }
    assert list(journal.load_steps("broken")) == ["wf/step#0"]


def kept_from_the_writer(
    journal: Journal, submit: Callable[[], asyncio.Future[Any]]
) -> tuple[asyncio.Future[Any], _Request]:
    """A write submitted, and taken off the queue before the writer's thread takes it (it
    takes requests holding ``_writing``), for the test to write in a batch of its own making."""
    with journal._writing:
        future = submit()
        (request,) = [item for item in journal._queue if isinstance(item, _Request)]
        journal._queue.clear()
    return future, request


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
async def test_a_batch_rolled_back_by_a_deadlock_is_committed_again(
    journal: Journal, conflicts: list[BaseException]
) -> None:
    """PostgreSQL ends a deadlock by rolling one of its transactions back; when that is the
    journal's, the batch is committed again, and the workflow waiting for its step never learns
    of it. A real deadlock, made in this order: the journal's batch has renewed run "y"'s lease
    (its row is locked) and waits to insert run "x", which a blocker has inserted; another
    transaction, which has inserted the step the batch commits, waits for "y"'s row; the blocker
    gives up, and the journal waits for that step: it finds the deadlock (the other side's
    ``deadlock_timeout`` is an hour, so the journal's check, a second in, is the one that
    runs)."""
    journal.start("y", "wf", None, "{}", owner="me")
    start_x = _Request("start", journal._start_values("x", "wf", None, "{}", "you"))
    step, step_y = kept_from_the_writer(  # written below, with the start, in one batch
        journal, lambda: journal.commit_step("y", "me", "wf/step#0", "step", "step", "hash", "1")
    )
    blocker, other = journal.engine.connect(), journal.engine.connect()
    try:
        Journal._insert_runs(blocker, [dict(start_x.values)])
        other.exec_driver_sql("SET deadlock_timeout = '1h'")
        Journal._insert_steps(other, [step_y.values])
        batch = threading.Thread(target=journal._write_batch, args=([start_x, step_y],))
        batch.start()
        wait_for_lock_waits(journal.engine, 1)  # the batch, for "x"

        def lock_y_then_give_up() -> None:
            other.exec_driver_sql("UPDATE kagura_runs SET owner = owner WHERE run_id = 'y'")
            other.rollback()

        locking = threading.Thread(target=lock_y_then_give_up)
        locking.start()
        wait_for_lock_waits(journal.engine, 2)  # and the other transaction, for "y"
        blocker.rollback()
        locking.join(60)
        batch.join(60)
        assert not batch.is_alive() and not locking.is_alive()
    finally:
        blocker.close()
        other.close()
    assert ["deadlock detected" in str(error) for error in conflicts] == [True]
    await step  # committed: it raises if the batch failed
    assert (await start_x.future)[0] == "started"
    assert set(journal.load_steps("y")) == {"wf/step#0"}


async def test_a_run_that_failed_with_a_nul_in_its_message_is_journaled(journal: Journal) -> None:
    """PostgreSQL's text takes no NUL character, and an exception's message may quote binary
    data: the run's finish was refused, and with it every write in its batch."""
    journal.start("run-1", "wf", None, "{}", owner="me")
    finish = _Request("finish", journal._finish_values("run-1", "me", None, ValueError("a\x00b")))
    await asyncio.to_thread(journal._write_batch, [finish])
    await finish.future
    record = journal.get_run("run-1")
    assert record is not None and (record.status, record.error) == ("failed", "a\ufffdb")


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
async def test_a_write_the_database_refuses_fails_alone(journal: Journal) -> None:
    """A step whose name is longer than its column (PostgreSQL enforces the length): its own
    commit fails, with the database's reason; the other runs' writes in its batch are
    committed."""
    journal.start("run-1", "wf", None, "{}", owner="me")
    long_name, refused = kept_from_the_writer(  # written below, between two other runs' starts
        journal, lambda: journal.commit_step("run-1", "me", "wf/x#0", "x" * 300, "step", "h", "1")
    )
    before, after = (
        _Request("start", journal._start_values(run_id, "wf", None, "{}", "you"))
        for run_id in ("run-0", "run-2")
    )
    await asyncio.to_thread(journal._write_batch, [before, refused, after])
    with pytest.raises(StoreError, match="cannot journal a durable run: value too long"):
        await long_name
    assert [(await r.future)[0] for r in (before, after)] == ["started", "started"]
    assert journal.load_steps("run-1") == {}


def test_the_default_store_follows_kagura_home_and_home_as_they_change(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Where a durable run's journal goes (``journal_for()``) is read afresh at each run, though
    the path it makes of the settings is kept per setting."""
    from kagura.durable import journal_for

    tmp_path = tmp_path.resolve()
    monkeypatch.delenv("KAGURA_DB", raising=False)
    monkeypatch.setenv("KAGURA_HOME", str(tmp_path / "a"))
    assert journal_for().url == f"sqlite:///{tmp_path / 'a' / 'events.db'}"
    monkeypatch.setenv("KAGURA_HOME", str(tmp_path / "b"))
    assert journal_for().url == f"sqlite:///{tmp_path / 'b' / 'events.db'}"
    monkeypatch.delenv("KAGURA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert journal_for().url == f"sqlite:///{tmp_path / 'user' / '.kagura' / 'events.db'}"
    monkeypatch.setenv("KAGURA_DB", str(tmp_path / "elsewhere.db"))
    assert journal_for().url == f"sqlite:///{tmp_path / 'elsewhere.db'}"
