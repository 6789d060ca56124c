"""The journal of durable runs, kept in the event store's database.

``kagura_runs`` has one row per run id: its workflow, arguments, status, result, and the lease
(owner and heartbeat) of the process executing it. ``kagura_steps`` has one row per completed step
(agent call, tool call, ``kagura.step``) with its input hash and output.

Run rows are claimed with single conditional statements (an insert that does nothing on conflict,
an update guarded by status and heartbeat), so two processes racing for one run id cannot both
win, on SQLite or PostgreSQL. Step rows go through a writer thread, in order, so journaling
never blocks the event loop; the run's completion is written only after its steps.
"""

from __future__ import annotations

import atexit
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


class Journal:
    """Durable-run storage at one database URL. One per URL per process (:func:`journal_for`)."""

    def __init__(self, url: str | Path) -> None:
        from ..observability._engine import normalise_url

        self.url = normalise_url(url)
        self._queue: deque[dict[str, Any] | _Flush] = deque()
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

    # -- runs (synchronous: call them from a worker thread) -----------------------------------

    def start(
        self, run_id: str, workflow: str, target: str | None, arguments: str, owner: str
    ) -> tuple[StartOutcome, RunRecord]:
        """Create the run, or report what state an existing run with this id is in; an
        interrupted run is claimed for this owner."""
        from ..observability._recorder import _dialect_insert
        from ..observability._schema import runs

        now = time.time()
        insert = _dialect_insert(self.engine)
        with self.engine.begin() as connection:
            created = connection.execute(
                insert(runs)
                .values(
                    run_id=run_id,
                    workflow=workflow,
                    target=target,
                    status="running",
                    arguments=arguments,
                    owner=owner,
                    pid=os.getpid(),
                    host=self.host,
                    heartbeat_at=now,
                    created_at=now,
                    updated_at=now,
                    attempts=1,
                )
                .on_conflict_do_nothing(index_elements=["run_id"])
                # A row back means this call created the run (psycopg reports no INSERT rowcount).
                .returning(runs.c.run_id)
            ).first()
        if created is not None:
            # What was just inserted: no need to read it back.
            return "started", RunRecord(
                run_id,
                workflow,
                target,
                "running",
                arguments,
                None,
                None,
                None,
                owner,
                os.getpid(),
                self.host,
                now,
                now,
                now,
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
        from sqlalchemy import update

        from ..observability._content import scrub
        from ..observability._schema import runs

        self.flush()  # the steps are on disk before the run says it is done
        now = time.time()
        values: dict[str, Any] = {"updated_at": now, "heartbeat_at": now}
        if error is None:
            values.update(status="completed", result=result)
        else:
            values.update(
                status="failed",
                error=scrub(str(error) or type(error).__name__),
                error_type=type(error).__qualname__,
            )
        with self.engine.begin() as connection:
            connection.execute(
                update(runs).where(runs.c.run_id == run_id, runs.c.owner == owner).values(**values)
            )

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
        self._queue.append(
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
        self._ensure_thread()
        self._wake.set()

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
                rows: list[dict[str, Any]] = []
                markers: list[_Flush] = []
                with self._writing:
                    while self._queue and len(rows) < 1000:
                        item = self._queue.popleft()
                        if isinstance(item, _Flush):
                            markers.append(item)
                            break
                        rows.append(item)
                    if rows:
                        try:
                            self._write_steps(rows)
                        except Exception:
                            _log.exception("kagura: journaling %d steps failed", len(rows))
                for marker in markers:
                    marker.done.set()

    def _write_steps(self, rows: list[dict[str, Any]]) -> None:
        from ..observability._recorder import _dialect_insert
        from ..observability._schema import steps

        statement = _dialect_insert(self.engine)(steps)
        # A re-executed step (a tool called again by an agent that itself re-ran) replaces its row.
        upsert = statement.on_conflict_do_update(
            index_elements=["run_id", "step_key"],
            set_={
                c: statement.excluded[c]
                for c in ("name", "kind", "input_hash", "output", "position")
            },
        )
        with self.engine.begin() as connection:
            connection.execute(upsert, rows)


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
