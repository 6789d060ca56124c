"""The journal of durable runs, kept in the event store's database.

``kagura_runs`` has one row per run id: its workflow, arguments, status, result, and the lease
(owner and heartbeat) of the process executing it. ``kagura_steps`` has one row per completed step
(agent call, tool call, ``kagura.step``) with its input hash and output.

Run rows are claimed with single conditional statements (an insert that does nothing on conflict,
an update guarded by status and heartbeat), so two processes racing for one run id cannot both
win, on SQLite or PostgreSQL. From the event loop, run starts, step rows and run completions all
go through one writer thread, in order, which commits whatever is queued in one transaction: so
journaling never blocks the event loop, runs started together share their commits instead of
queueing for the database's write lock, and a run's completion is written only after its steps.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

_log = logging.getLogger("kagura.durable")

RunStatus = Literal["running", "completed", "failed", "interrupted"]
StartOutcome = Literal["started", "claimed", "completed", "failed", "busy"]


def lease_seconds() -> float:
    """How long a run's heartbeat stays valid: ``KAGURA_LEASE_SECONDS`` (default 30)."""
    return float(os.environ.get("KAGURA_LEASE_SECONDS", "30"))


@dataclass(frozen=True, slots=True)
class StepRecord:
    step_key: str
    name: str
    kind: str
    input_hash: str
    output: str | None
    created_at: float | None = None  # when it was journaled (None: not read from the store)
    position: int | None = None  # its place among its parent's steps


@dataclass(frozen=True, slots=True)
class RunRecord:
    run_id: str
    workflow: str
    target: str | None
    status: RunStatus
    arguments: str | None
    result: str | None
    error: str | None
    error_type: str | None
    owner: str | None
    pid: int | None
    host: str | None
    heartbeat_at: float | None
    created_at: float
    updated_at: float
    attempts: int
    steps: int = 0


def _effective_status(row: Any, now: float, lease: float) -> RunStatus:
    if row.status == "running" and (row.heartbeat_at or 0) < now - lease:
        return "interrupted"  # its process stopped renewing the lease: it died
    status: RunStatus = row.status
    return status


def _record(row: Any, now: float, lease: float, steps: int = 0) -> RunRecord:
    return RunRecord(
        row.run_id,
        row.workflow,
        row.target,
        _effective_status(row, now, lease),
        row.arguments,
        row.result,
        row.error,
        row.error_type,
        row.owner,
        row.pid,
        row.host,
        row.heartbeat_at,
        row.created_at,
        row.updated_at,
        row.attempts,
        steps,
    )


class _Flush:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class _RunRequest:
    """A run's start or finish (or a wait for what was queued before it to be committed),
    queued for the writer's thread, answered on the caller's loop."""

    __slots__ = ("future", "kind", "loop", "values")

    def __init__(self, kind: Literal["start", "finish", "sync"], values: dict[str, Any]) -> None:
        self.kind = kind
        self.values = values
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future[Any] = self.loop.create_future()


def _answer(answers: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    """On the caller's loop: settle the futures of one batch (a caller may have given up)."""
    for future, value, error in answers:
        if future.done():
            continue
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)


class Journal:
    """Durable-run storage at one database URL. One per URL per process (:func:`journal_for`)."""

    def __init__(self, url: str | Path) -> None:
        from ..observability._engine import normalise_url

        self.url = normalise_url(url)
        self._queue: deque[dict[str, Any] | _Flush | _RunRequest] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        # Held by the writer from taking rows off the queue until they are committed.
        self._writing = threading.Lock()
        self.host = socket.gethostname()

    @property
    def engine(self) -> Any:
        from ..observability._engine import engine_for

        return engine_for(self.url)

    # -- runs, from the event loop: group-committed by the writer's thread ---------------------

    async def start_soon(
        self, run_id: str, workflow: str, target: str | None, arguments: str, owner: str
    ) -> tuple[StartOutcome, RunRecord]:
        """:meth:`start`, committed together with every other start, step and finish queued
        meanwhile: thousands of runs starting at once cost a few transactions, not thousands
        of them fighting for the database's write lock."""
        outcome: tuple[StartOutcome, RunRecord] = await self._submit(
            "start", self._start_values(run_id, workflow, target, arguments, owner)
        )
        return outcome

    async def finish_soon(
        self,
        run_id: str,
        owner: str,
        *,
        result: str | None = None,
        error: BaseException | None = None,
    ) -> None:
        """:meth:`finish`, group-committed like :meth:`start_soon`. Queued after the run's
        steps, so it is never on disk before them."""
        await self._submit("finish", self._finish_values(run_id, owner, result, error))

    async def committed(self) -> None:
        """Wait until everything queued so far (steps, starts, finishes) is committed. Raises
        what the commit raised."""
        await self._submit("sync", {})

    def _submit(
        self, kind: Literal["start", "finish", "sync"], values: dict[str, Any]
    ) -> asyncio.Future[Any]:
        """Queue a request for the writer's thread; its answer comes back on this loop."""
        request = _RunRequest(kind, values)
        self._enqueue(request)
        return request.future

    def _enqueue(self, item: dict[str, Any] | _RunRequest) -> None:
        self._queue.append(item)
        self._ensure_thread()
        # Setting an Event takes a lock: once per batch is enough. The writer clears it before
        # it empties the queue, so an item appended while it is still set is written all the same.
        if not self._wake.is_set():
            self._wake.set()

    # -- runs (synchronous: call them from a worker thread) -----------------------------------

    def start(
        self, run_id: str, workflow: str, target: str | None, arguments: str, owner: str
    ) -> tuple[StartOutcome, RunRecord]:
        """Create the run, or report what state an existing run with this id is in; an
        interrupted run is claimed for this owner."""
        values = self._start_values(run_id, workflow, target, arguments, owner)
        with self.engine.begin() as connection:
            created = self._insert_runs(connection, [values])
        return self._started(values, created)

    def _start_values(
        self, run_id: str, workflow: str, target: str | None, arguments: str, owner: str
    ) -> dict[str, Any]:
        now = time.time()
        return {
            "run_id": run_id,
            "workflow": workflow,
            "target": target,
            "status": "running",
            "arguments": arguments,
            "owner": owner,
            "pid": os.getpid(),
            "host": self.host,
            "heartbeat_at": now,
            "created_at": now,
            "updated_at": now,
            "attempts": 1,
        }

    def _insert_runs(self, connection: Any, rows: list[dict[str, Any]]) -> set[str]:
        """Insert the runs whose id is new; the ids of those inserted. ``rows`` must not repeat
        an id (both rows would see it come back)."""
        from ..observability._recorder import _dialect_insert
        from ..observability._schema import runs

        statement = (
            _dialect_insert(self.engine)(runs)
            .on_conflict_do_nothing(index_elements=["run_id"])
            # A row back means this call created the run (psycopg reports no INSERT rowcount).
            .returning(runs.c.run_id)
        )
        return {row.run_id for row in connection.execute(statement, rows)}

    def _started(self, values: dict[str, Any], created: set[str]) -> tuple[StartOutcome, RunRecord]:
        run_id, owner = values["run_id"], values["owner"]
        if run_id in created:
            # What was just inserted: no need to read it back.
            return "started", RunRecord(
                run_id,
                values["workflow"],
                values["target"],
                "running",
                values["arguments"],
                None,
                None,
                None,
                owner,
                values["pid"],
                self.host,
                values["heartbeat_at"],
                values["created_at"],
                values["updated_at"],
                1,
            )
        existing = self.get_run(run_id)
        assert existing is not None
        if existing.status == "interrupted" and self.claim(run_id, owner, allow_failed=False):
            return "claimed", self.get_run(run_id)  # type: ignore[return-value]
        if existing.status in ("completed", "failed"):
            return existing.status, existing
        return "busy", existing

    def claim(self, run_id: str, owner: str, *, allow_failed: bool = True) -> bool:
        """Take over a run whose process died (or, with ``allow_failed``, one that failed)."""
        from sqlalchemy import and_, or_, update

        from ..observability._schema import runs

        now = time.time()
        stale = and_(runs.c.status == "running", runs.c.heartbeat_at < now - lease_seconds())
        condition = or_(stale, runs.c.status == "failed") if allow_failed else stale
        with self.engine.begin() as connection:
            claimed = connection.execute(
                update(runs)
                .where(runs.c.run_id == run_id, condition)
                .values(
                    status="running",
                    owner=owner,
                    pid=os.getpid(),
                    host=self.host,
                    heartbeat_at=now,
                    updated_at=now,
                    error=None,
                    error_type=None,
                    attempts=runs.c.attempts + 1,
                )
            )
        return bool(claimed.rowcount == 1)

    def heartbeat(self, run_id: str, owner: str) -> bool:
        """Renew the lease; ``False`` if another process has taken the run over."""
        from sqlalchemy import update

        from ..observability._schema import runs

        now = time.time()
        with self.engine.begin() as connection:
            renewed = connection.execute(
                update(runs)
                # heartbeat_at 0 is a released lease (the run was cancelled): a heartbeat still
                # in flight must not revive it, or the run stays unresumable for a whole lease.
                .where(runs.c.run_id == run_id, runs.c.owner == owner, runs.c.heartbeat_at > 0)
                .values(heartbeat_at=now, updated_at=now)
            )
        return bool(renewed.rowcount == 1)

    def finish(
        self,
        run_id: str,
        owner: str,
        *,
        result: str | None = None,
        error: BaseException | None = None,
    ) -> None:
        self.flush()  # the steps are on disk before the run says it is done
        values = self._finish_values(run_id, owner, result, error)
        with self.engine.begin() as connection:
            connection.execute(_finish_statement(), [values])

    @staticmethod
    def _finish_values(
        run_id: str, owner: str, result: str | None, error: BaseException | None
    ) -> dict[str, Any]:
        from ..observability._content import scrub

        now = time.time()
        return {
            "b_run_id": run_id,
            "b_owner": owner,
            "status": "completed" if error is None else "failed",
            "result": result if error is None else None,
            "error": None if error is None else scrub(str(error) or type(error).__name__),
            "error_type": None if error is None else type(error).__qualname__,
            "updated_at": now,
            "heartbeat_at": now,
        }

    def release(self, run_id: str, owner: str) -> None:
        """Give the lease up at once (the run was cancelled): it is resumable immediately."""
        from sqlalchemy import update

        from ..observability._schema import runs

        self.flush()
        with self.engine.begin() as connection:
            connection.execute(
                update(runs)
                .where(runs.c.run_id == run_id, runs.c.owner == owner)
                .values(heartbeat_at=0.0, updated_at=time.time())
            )

    def get_run(self, run_id: str) -> RunRecord | None:
        from sqlalchemy import func, select

        from ..observability._schema import runs, steps

        with self.engine.connect() as connection:
            row = connection.execute(select(runs).where(runs.c.run_id == run_id)).first()
            if row is None:
                return None
            count = connection.execute(
                select(func.count()).where(steps.c.run_id == run_id)
            ).scalar_one()
        return _record(row, time.time(), lease_seconds(), int(count))

    def list_runs(
        self, *, status: str | None = None, workflow: str | None = None, limit: int = 50
    ) -> list[RunRecord]:
        """Runs, newest first; ``status`` may be ``interrupted`` (running, lease expired)."""
        from sqlalchemy import and_, func, select

        from ..observability._schema import runs, steps

        now, lease = time.time(), lease_seconds()
        counts = select(steps.c.run_id, func.count().label("n")).group_by(steps.c.run_id).subquery()
        query = (
            select(runs, func.coalesce(counts.c.n, 0).label("n"))
            .outerjoin(counts, counts.c.run_id == runs.c.run_id)
            .order_by(runs.c.updated_at.desc())
            .limit(limit)
        )
        if workflow is not None:
            query = query.where(runs.c.workflow == workflow)
        if status == "interrupted":
            query = query.where(and_(runs.c.status == "running", runs.c.heartbeat_at < now - lease))
        elif status == "running":
            query = query.where(
                and_(runs.c.status == "running", runs.c.heartbeat_at >= now - lease)
            )
        elif status is not None:
            query = query.where(runs.c.status == status)
        with self.engine.connect() as connection:
            return [_record(row, now, lease, int(row.n)) for row in connection.execute(query)]

    def load_steps(self, run_id: str) -> dict[str, StepRecord]:
        from sqlalchemy import select

        from ..observability._schema import steps

        self.flush()
        with self.engine.connect() as connection:
            rows = connection.execute(select(steps).where(steps.c.run_id == run_id)).all()
        return {
            row.step_key: StepRecord(
                row.step_key,
                row.name,
                row.kind,
                row.input_hash,
                row.output,
                row.created_at,
                row.position,
            )
            for row in rows
        }

    # -- steps (from the event loop: queued, written in order by a thread) --------------------

    def record_step(
        self,
        run_id: str,
        key: str,
        name: str,
        kind: str,
        input_hash: str,
        output: str | None,
        position: int | None = None,
    ) -> None:
        self._enqueue(
            {
                "run_id": run_id,
                "step_key": key,
                "name": name,
                "kind": kind,
                "input_hash": input_hash,
                "output": output,
                "created_at": time.time(),
                "position": position,
            }
        )

    def flush(self, timeout: float = 60.0) -> None:
        # An empty queue is not enough: the writer may hold rows it has not committed yet.
        # (Queue first, then the lock: the writer takes the lock before it empties the queue.)
        if not self._queue and not self._writing.locked():
            return
        self._ensure_thread()
        marker = _Flush()
        self._queue.append(marker)
        self._wake.set()
        if not marker.done.wait(timeout):
            _log.error("kagura: the journal did not flush within %ss", timeout)

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._thread_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="kagura-journal", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(1.0)
            self._wake.clear()
            while self._queue:
                batch: list[dict[str, Any] | _RunRequest] = []
                markers: list[_Flush] = []
                with self._writing:
                    while self._queue and len(batch) < 1000:
                        item = self._queue.popleft()
                        if isinstance(item, _Flush):
                            markers.append(item)
                            break
                        batch.append(item)
                    if batch:
                        self._write_batch(batch)
                for marker in markers:
                    marker.done.set()

    def _write_batch(self, batch: list[dict[str, Any] | _RunRequest]) -> None:
        """Everything queued, in one transaction: run starts, steps, run finishes. A run's
        start was queued before its steps, and its steps before its finish, so whichever of
        them share a batch are committed together, and none is on disk before what preceded it.
        """
        rows = [item for item in batch if isinstance(item, dict)]
        requests = [item for item in batch if isinstance(item, _RunRequest)]
        starts: dict[str, _RunRequest] = {}
        repeats: list[_RunRequest] = []  # an id started twice in one batch: the second waits
        finishes: list[_RunRequest] = []
        syncs: list[_RunRequest] = []
        for request in requests:
            if request.kind == "finish":
                finishes.append(request)
            elif request.kind == "sync":
                syncs.append(request)
            elif request.values["run_id"] in starts:
                repeats.append(request)
            else:
                starts[request.values["run_id"]] = request
        try:
            with self.engine.begin() as connection:
                created = (
                    self._insert_runs(connection, [r.values for r in starts.values()])
                    if starts
                    else set()
                )
                if rows:
                    connection.execute(self._steps_upsert(), rows)
                if finishes:
                    connection.execute(_finish_statement(), [r.values for r in finishes])
        except Exception as exc:
            if rows:
                _log.exception("kagura: journaling %d steps failed", len(rows))
            _settle([(r, None, exc) for r in requests])
            return
        answers: list[tuple[_RunRequest, Any, BaseException | None]] = [
            (r, None, None) for r in (*finishes, *syncs)
        ]
        for request in (*starts.values(), *repeats):
            try:
                answers.append((request, self._started(request.values, created), None))
            except Exception as exc:
                answers.append((request, None, exc))
            created.discard(request.values["run_id"])  # a repeat finds it made, not by itself
        _settle(answers)

    def _steps_upsert(self) -> Any:
        from ..observability._recorder import _dialect_insert
        from ..observability._schema import steps

        statement = _dialect_insert(self.engine)(steps)
        # A re-executed step (a tool called again by an agent that itself re-ran) replaces its row.
        return statement.on_conflict_do_update(
            index_elements=["run_id", "step_key"],
            set_={
                c: statement.excluded[c]
                for c in ("name", "kind", "input_hash", "output", "position")
            },
        )


def _finish_statement() -> Any:
    """A run's end, for the owner that holds it (``b_run_id``, ``b_owner``, then the values)."""
    from sqlalchemy import bindparam, update

    from ..observability._schema import runs

    return (
        update(runs)
        .where(runs.c.run_id == bindparam("b_run_id"), runs.c.owner == bindparam("b_owner"))
        .values(
            status=bindparam("status"),
            result=bindparam("result"),
            error=bindparam("error"),
            error_type=bindparam("error_type"),
            updated_at=bindparam("updated_at"),
            heartbeat_at=bindparam("heartbeat_at"),
        )
    )


def _settle(answers: list[tuple[_RunRequest, Any, BaseException | None]]) -> None:
    """Hand each answer to its caller's loop: one call per loop, not one per run."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
    for request, value, error in answers:
        by_loop.setdefault(request.loop, []).append((request.future, value, error))
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_answer, settled)


_journals: dict[str, Journal] = {}
_journals_lock = threading.Lock()


def journal_for(url: str | None = None) -> Journal:
    """The journal at ``url`` (default: the event store's URL)."""
    from ..observability._engine import default_url, normalise_url

    key = default_url() if url is None else normalise_url(url)
    with _journals_lock:
        journal = _journals.get(key)
        if journal is None:
            journal = _journals[key] = Journal(key)
            atexit.register(journal.flush, 30.0)  # steps queued at exit are not lost
        return journal
