"""The journal of durable runs, kept in the event store's database.

``kagura_runs`` has one row per run id: its workflow, arguments, status, result, and the lease of
the process executing it (an owner token, the process's host, pid and pid start, and a heartbeat).
``kagura_steps`` has one row per completed step (agent call, tool call, ``kagura.step``) with its
input hash and output.

The guarantees, and where each is kept:

- *Durable before visible.* A step's caller gets its result only once the step's row is committed
  (:meth:`Journal.commit_step`): a process killed at any moment after a workflow saw a result
  never runs that step again.
- *Group commit.* From event loops, run starts, claims (resumes), steps, finishes and releases go
  through one writer thread, in order, which commits whatever is queued in one transaction and
  answers each caller once its batch is committed: concurrent runs share commits instead of
  queueing for the database's write lock, and a run's finish is never on disk before its steps.
  A start or claim is answered with the run as the transaction left it, and a claimed run's
  steps, read in it. The writer is woken after the turn of the event loop that queued a write,
  so what one turn queues (runs started or resumed together, steps answered together) is one
  batch.
- *What waits for the disk.* A commit holding a step, or a run's failure, is on disk before
  anyone is answered (SQLite syncs it; PostgreSQL as its server is configured, by default
  synced). Every other write is not synced: a run's start, claim, lease renewal, release and
  successful finish. Every process sees such a write at once, a killed process does not lose
  it, and the next synced commit takes it to disk (the database's log is written in order). A
  power cut may take it:

  - a start, or a claim: no step after it is on disk, so the run starts afresh, or is
    interrupted again, with the steps it had;
  - a lease renewal: the power cut ended the process that held the lease too;
  - a successful finish or a release: the run reads as interrupted, and resuming it replays
    every step from the journal, calling nothing again.

  A failure is synced because resuming a run whose failure was lost would call again what
  failed.
- *Fencing.* Each batch first renews the lease of every run it writes for, on the condition that
  the writing process still owns it, and writes only for the runs it does: a process whose run
  was taken over commits nothing more of it, and its workflow gets :class:`RunTakenOverError`.
  (A failed run stays its process's until it is resumed: a step a parallel branch finished
  after the failure is journaled.)
  The renewal and the writes are one transaction, so a takeover lands either before (and the
  batch writes nothing for that run) or after (and the new owner loads those steps).
- *Claims are atomic.* Run rows are created and taken over with single conditional statements, so
  two processes racing for one run cannot both win, on SQLite or PostgreSQL.
- *Recovery in seconds on one host.* A run is interrupted (resumable) when its lease has expired,
  or at once when its process is known gone: on the host that ran it, a pid that no longer exists
  or now names another process (see :mod:`kagura._process`). Other hosts wait for the lease.

The writer thread also renews the leases of the runs this process executes, every third of a
lease, in one transaction; steps committed meanwhile renew them too.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import math
import os
import re
import threading
import time
import unicodedata
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

from .. import _process
from .._checks import count, cutoff
from .._encryption import ENV as ENCRYPTION_ENV
from .._encryption import decrypt, encrypt
from .._storage import (
    close_run_spans,
    close_spans_of_gone_processes,
    refused_values,
    store_error,
    transaction,
)
from ..errors import EncryptionKeyError, RunTakenOverError, UsageError

_log = logging.getLogger("kagura.durable")
_T = TypeVar("_T")

RunStatus = Literal["running", "completed", "failed", "interrupted"]
StartOutcome = Literal["started", "claimed", "completed", "failed", "busy"]
_Kind = Literal["start", "claim", "step", "finish", "release"]

#: Ids per ``IN (...)`` list: well under every SQLite build's limit on bound parameters.
_CHUNK = 500


def lease_seconds() -> float:
    """How long a run's heartbeat stays valid: ``KAGURA_LEASE_SECONDS`` (default 30). Raises
    :class:`~kagura.errors.UsageError` when it is not a positive number."""
    text = os.environ.get("KAGURA_LEASE_SECONDS", "30")
    try:
        lease = float(text)
    except ValueError:
        lease = math.nan
    if not 0 < lease < math.inf:
        raise UsageError(f"KAGURA_LEASE_SECONDS must be a positive number of seconds, got {text!r}")
    return lease


def _heartbeat_interval() -> float:
    try:
        lease = lease_seconds()
    except UsageError:  # set wrong since the journal checked it: its thread must go on
        lease = 30.0
    return min(10.0, max(0.05, lease / 3))


@dataclass(frozen=True, slots=True)
class StepRecord:
    """A journaled step of a durable run: its key, name, kind, input hash and recorded output."""

    step_key: str
    name: str
    kind: str
    input_hash: str
    output: str | None
    created_at: float | None = None  # when it was journaled (None: not read from the store)
    position: int | None = None  # its place among its parent's steps


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A durable run as the journal holds it: its workflow, status, arguments, outcome and owner."""

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
    #: Which process ``pid`` named (see :mod:`kagura._process`), when it could be read.
    pid_start: str | None = None
    #: Its holder's ``KAGURA_LEASE_SECONDS``, as it started or claimed the run (``None``:
    #: journaled before Kagura kept it).
    lease_seconds: float | None = None

    def lease(self, reader: float) -> float:
        """How long after its last heartbeat the run is free: its holder's lease, or the
        ``reader``'s own setting if that is longer (see :func:`_status`)."""
        return reader if self.lease_seconds is None else max(reader, self.lease_seconds)


#: How attempt_span_id ends the span ids of resumed executions: refused at the end of run ids.
_ATTEMPT_SUFFIX = re.compile(r"~[0-9]+$")


def attempt_span_id(run_id: str, attempt: int) -> str:
    """The workflow span id of a durable run's ``attempt``-th execution: the run id, then
    ``run_id~2``, ``run_id~3``, ... for resumed ones (each attempt is a run tree of its own)."""
    return run_id if attempt <= 1 else f"{run_id}~{attempt}"


def _status(row: Any, now: float, lease: float) -> RunStatus:
    if row.status != "running":
        status: RunStatus = row.status
        return status
    # The holder's lease, never shorter than the reader's own: a version of Kagura that does not
    # keep leases, claiming a run, leaves the lease of the run's holder before it in the row.
    if row.lease_seconds is not None and row.lease_seconds > lease:
        lease = row.lease_seconds
    if (row.heartbeat_at or 0) < now - lease:
        return "interrupted"  # its process stopped renewing the lease
    if _process.is_gone(row.host, row.pid, row.pid_start):
        return "interrupted"  # its process is gone: no need to wait for the lease
    return "running"


def _record(
    row: Any, now: float, lease: float, steps: int = 0, *, lenient: bool = False
) -> RunRecord:
    """The run of ``row``, its payloads decrypted (see :mod:`kagura._encryption`). ``lenient``
    (for listings, which show no payload but the error): a value no configured key decrypts
    reads as a note saying so, instead of raising."""
    run_id = row.run_id

    def readable(text: str | None, what: str) -> str | None:
        try:
            return decrypt(text, f"the {what} of durable run {run_id!r}")
        except EncryptionKeyError:
            if not lenient:
                raise
            return f"(encrypted: set {ENCRYPTION_ENV} to the key it was written with)"

    return RunRecord(
        run_id,
        row.workflow,
        row.target,
        _status(row, now, lease),
        readable(row.arguments, "arguments"),
        readable(row.result, "result"),
        readable(row.error, "error"),
        row.error_type,
        row.owner,
        row.pid,
        row.host,
        row.heartbeat_at,
        row.created_at,
        row.updated_at,
        row.attempts,
        steps,
        row.pid_start,
        row.lease_seconds,
    )


class _Flush:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class _Request:
    """One write (a run's start or claim, a step, a finish or a release), queued for the
    writer's thread and answered on the caller's loop once the batch it went in is committed."""

    __slots__ = ("future", "kind", "loop", "values")

    def __init__(self, kind: _Kind, values: dict[str, Any]) -> None:
        self.kind = kind
        self.values = values
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future[Any] = self.loop.create_future()

    @property
    def lease(self) -> tuple[str, str] | None:
        """The (run id, owner) whose lease this write needs; ``None`` for a start or claim."""
        if self.kind in ("step", "finish", "release"):
            return self.values["b_run_id"], self.values["b_owner"]
        return None


def _answer(answers: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    """On the caller's loop: settle the futures of one batch (a caller may have given up)."""
    for future, value, error in answers:
        if future.done():
            continue
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)


#: The longest run id. A durable run's workflow span has the run's id, and a resumed attempt's
#: has ``~`` and the attempt's number after it (see ``attempt_span_id``): both must fit the
#: spans' ids, 255 characters (as ``kagura_runs.run_id``).
MAX_RUN_ID = 200


def _error_text(error: BaseException) -> str:
    """How a failed run's error is stored: its message redacted, with any NUL character
    replaced (PostgreSQL's text takes none, and a message may quote binary data)."""
    from .._redact import scrub, str_of

    text: str = scrub(str_of(error) or type(error).__name__)
    return text.replace("\x00", "\ufffd")


class Journal:
    """Durable-run storage at one database URL. One per URL per process (:func:`journal_for`)."""

    @staticmethod
    def run_id_for(run_id: str | None) -> str:
        """The id of a run started with ``run_id``: a new one for ``None``, else ``run_id`` itself,
        refused (:class:`~kagura.errors.UsageError`) unless the store can key a run by it. An
        empty id is refused rather than replaced, since an id left empty by mistake (a variable
        not set) would silently make every call a run of its own."""
        if run_id is None:
            return uuid.uuid4().hex
        if not isinstance(run_id, str):
            raise UsageError(
                f"run_id must be a str (or None for a new id), not {type(run_id).__name__}"
            )
        if not run_id:
            raise UsageError("run_id is empty: pass the run's id, or None for a new one")
        if run_id != run_id.strip():
            # ``kagura runs show`` takes an id from the shell, where such spaces are lost.
            raise UsageError(
                f"run_id {run_id!r} starts or ends with a space: pass it without, or None for "
                f"a new id"
            )
        if run_id.startswith("-"):
            raise UsageError(
                f"run_id {run_id!r} starts with '-', which the command line (kagura runs show) "
                f"would take for an option: pass one that starts otherwise, or None for a new id"
            )
        if _ATTEMPT_SUFFIX.search(run_id):
            raise UsageError(
                f"run_id {run_id!r} ends as the span ids of a run's resumed executions do "
                f"('~' and a number: run~2 is run's second execution): pass one that ends "
                f"otherwise, or None for a new id"
            )
        try:
            run_id.encode()
        except UnicodeEncodeError:  # a lone surrogate (bytes decoded with surrogateescape)
            raise UsageError(
                f"run_id {run_id!r} is not text the store can keep (it holds a lone surrogate, "
                f"as from bytes that were not UTF-8): pass a str of valid characters"
            ) from None
        if len(run_id) > MAX_RUN_ID:
            raise UsageError(
                f"run_id is {len(run_id)} characters long; a run id is at most {MAX_RUN_ID} "
                f"(it keys the run in the store): use a shorter one, or a hash of this one"
            )
        unseen = next((c for c in run_id if unicodedata.category(c) in ("Cc", "Cf")), None)
        if unseen is not None:
            # A newline, a NUL, a right-to-left mark: kagura runs list would show the id as
            # another (or on two lines), and the shell could not give it back.
            raise UsageError(
                f"run_id {run_id!r} holds a control or format character ({unseen!r}): pass one "
                f"of characters that show, or None for a new id"
            )
        return run_id

    def __init__(self, url: str | Path) -> None:
        from .._storage import normalise_url

        self.url: str = normalise_url(url)
        self._queue: deque[_Request | _Flush] = deque()
        self._wake = threading.Event()
        #: The event loops that will wake the writer after their turn (see _submit).
        self._waking: set[asyncio.AbstractEventLoop] = set()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        # Held by the writer from taking requests off the queue until they are committed.
        self._writing = threading.Lock()
        #: Runs this process executes, by run id: their owner tokens (for heartbeats).
        self._held: dict[str, str] = {}
        self._held_lock = threading.Lock()
        #: (run id, owner) of runs this process was found to hold no more (see lost).
        self._lost: set[tuple[str, str]] = set()
        self._next_heartbeat = 0.0
        self.host: str = _process.HOST
        self._read_only: bool | None = None  # told at first use (see engine)

    @property
    def engine(self) -> Any:
        from .._storage import can_write, engine_for, synced_engine_for

        if self._read_only is None:
            self._read_only = not can_write(self.url)
        if self._read_only:
            # A store this user may only read (kagura runs list on someone else's journal) is
            # read as it is; a write there fails as the store's fault, naming the store.
            return engine_for(self.url, read_only=True)
        # Every commit on disk before it returns: a step the workflow has seen survives a power
        # loss too (see synced_engine_for).
        return synced_engine_for(self.url)

    def _store(self, doing: str) -> contextlib.AbstractContextManager[None]:
        """Store faults in the block as a :class:`StoreError` that names this store and the
        cause (bugs of ours keep their type)."""
        from .._storage import store_errors

        return store_errors(self.url, doing)

    def _commit(self, doing: str, work: Callable[[Any], _T], *, synced: bool = False) -> _T:
        """``work(connection)`` in a transaction of its own, committed; unless ``synced``,
        without waiting for the disk (see "What waits for the disk" above). Store faults are
        raised as by :meth:`_store`."""
        with self._store(doing):
            return transaction(self.engine, work, synced=synced)

    # -- from the event loop: group-committed by the writer's thread -----------------------

    # These return the request's future rather than being coroutines: a durable step waits on
    # one of them, and a coroutine (or the task asyncio.shield makes of one) around it was one
    # more object per step for the garbage collector to walk while the batch commits.

    def start_soon(
        self, run_id: str, workflow: str, target: str | None, arguments: str, owner: str
    ) -> asyncio.Future[tuple[StartOutcome, RunRecord, dict[str, StepRecord]]]:
        """:meth:`start`, committed together with every other write queued meanwhile: thousands
        of runs starting at once cost a few transactions, not thousands of them fighting for
        the database's write lock. Await the result (call it on the event loop), with the
        journaled steps of a run it claimed (``{}`` for any other outcome)."""
        return self._submit("start", self._start_values(run_id, workflow, target, arguments, owner))

    def claim_soon(
        self, run_id: str, owner: str, workflow: str
    ) -> asyncio.Future[tuple[RunRecord | None, dict[str, StepRecord] | None]]:
        """Take ``run_id`` over for ``owner`` if it can be resumed (see :meth:`claim`) and is a
        run of ``workflow``; group-committed, as :meth:`start_soon`. Await the run as it is then
        (``None`` if there is none) and, if ``owner`` now holds it, its journaled steps (else
        ``None``): claim, read and load in one transaction shared with every other write queued
        meanwhile, so that resuming many runs at once costs a few trips to the database."""
        return self._submit("claim", {"run_id": run_id, "owner": owner, "workflow": workflow})

    def commit_step(
        self,
        run_id: str,
        owner: str,
        key: str,
        name: str,
        kind: str,
        input_hash: str,
        output: str | None,
        position: int | None = None,
    ) -> asyncio.Future[None]:
        """Journal a completed step; the result is done once it is committed. Raises
        :class:`RunTakenOverError` (and writes nothing) if ``owner`` no longer holds the run."""
        return self._submit(
            "step",
            {
                "b_run_id": run_id,
                "b_owner": owner,
                "run_id": run_id,
                "step_key": key,
                "name": name,
                "kind": kind,
                "input_hash": input_hash,
                "output": encrypt(output),
                "created_at": time.time(),
                "position": position,
            },
        )

    def finish_soon(
        self,
        run_id: str,
        owner: str,
        *,
        result: str | None = None,
        error: BaseException | None = None,
    ) -> asyncio.Future[None]:
        """:meth:`finish`, group-committed; queued after the run's steps, so it is never on disk
        before them. Raises :class:`RunTakenOverError` if ``owner`` no longer holds the run."""
        return self._submit("finish", self._finish_values(run_id, owner, result, error))

    def release_soon(self, run_id: str, owner: str) -> asyncio.Future[None]:
        """:meth:`release`, group-committed (a cancelled run: resumable at once)."""
        return self._submit("release", {"b_run_id": run_id, "b_owner": owner})

    def _submit(self, kind: _Kind, values: dict[str, Any]) -> asyncio.Future[Any]:
        """Queue a request for the writer's thread; its answer comes back on this loop."""
        request = _Request(kind, values)
        self._queue.append(request)
        self._ensure_thread()
        # The writer is woken after the loop's turn, once: what the loop's tasks queue in one
        # turn (runs started together, steps answered together) goes in one batch. Woken at
        # once, it took the first request or two alone, and each batch costs a commit.
        loop = request.loop
        if loop not in self._waking:
            self._waking.add(loop)
            loop.call_soon(self._wake_writer, loop)
        return request.future

    def _wake_writer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._waking.discard(loop)
        self._wake.set()

    # -- the leases of this process's runs ---------------------------------------------------

    def hold(self, run_id: str, owner: str) -> None:
        """This process executes ``run_id`` as ``owner``: keep its lease renewed."""
        with self._held_lock:
            self._held[run_id] = owner
        self._ensure_thread()

    def let_go(self, run_id: str, owner: str) -> None:
        """Stop renewing the lease (the run finished, failed, was cancelled or taken over)."""
        with self._held_lock:
            if self._held.get(run_id) == owner:
                del self._held[run_id]

    def lost(self, run_id: str, owner: str) -> bool:
        """Whether ``owner`` was found to hold ``run_id`` no more: a renewal or a commit of it
        was refused (another process took it over, or it had ended)."""
        return (run_id, owner) in self._lost

    def _lose(self, run_id: str, owner: str) -> None:
        self._lost.add((run_id, owner))
        self.let_go(run_id, owner)

    # -- synchronous (call them from a worker thread) ----------------------------------------

    def start(
        self, run_id: str, workflow: str, target: str | None, arguments: str, owner: str
    ) -> tuple[StartOutcome, RunRecord]:
        """Create the run, or report what state an existing run with this id is in; an
        interrupted run of this workflow is claimed for this owner."""
        values = self._start_values(run_id, workflow, target, arguments, owner)

        def start(connection: Any) -> tuple[set[str], _Found]:
            created = self._insert_runs(connection, [values])
            existing = [] if run_id in created else [(values, False)]
            return created, self._take_over(connection, existing)

        created, found = self._commit("start a durable run", start)
        outcome, record, _ = self._started(values, run_id in created, found)
        return outcome, record

    def _start_values(
        self, run_id: str, workflow: str, target: str | None, arguments: str, owner: str
    ) -> dict[str, Any]:
        now = time.time()
        pid, host, start = _process.this_process()
        return {
            "run_id": run_id,
            "workflow": workflow,
            "target": target,
            "status": "running",
            "arguments": encrypt(arguments),
            "b_arguments": arguments,  # as the caller gave them (not a column)
            "owner": owner,
            "pid": pid,
            "host": host,
            "pid_start": start,
            "heartbeat_at": now,
            "created_at": now,
            "updated_at": now,
            "attempts": 1,
            "lease_seconds": lease_seconds(),
        }

    @staticmethod
    def _insert_runs(connection: Any, rows: list[dict[str, Any]]) -> set[str]:
        """Insert the runs whose id is new; the ids of those inserted. ``rows`` must not repeat
        an id (both rows would see it come back)."""
        mark = _mark(connection)
        row = f"({', '.join(mark for _ in _RUN_COLUMNS)})"
        created: set[str] = set()
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start : start + _CHUNK]
            # A row back means this call created the run (psycopg reports no INSERT rowcount).
            inserted = connection.exec_driver_sql(
                f"INSERT INTO kagura_runs ({', '.join(_RUN_COLUMNS)}) "
                f"VALUES {', '.join(row for _ in chunk)} "
                "ON CONFLICT (run_id) DO NOTHING RETURNING run_id",
                tuple(values[column] for values in chunk for column in _RUN_COLUMNS),
            )
            created.update(run_id for (run_id,) in inserted)
        return created

    def _started(
        self, values: dict[str, Any], created: bool, found: _Found
    ) -> tuple[StartOutcome, RunRecord, dict[str, StepRecord]]:
        """What a start found: the outcome, the run, and its steps if this start claimed it."""
        run_id, owner = values["run_id"], values["owner"]
        if created:
            # What was just inserted: no need to read it back.
            return (
                "started",
                RunRecord(
                    run_id,
                    values["workflow"],
                    values["target"],
                    "running",
                    values["b_arguments"],
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
                    0,
                    values["pid_start"],
                    values["lease_seconds"],
                ),
                {},
            )
        existing = found.record(run_id)
        assert existing is not None  # the insert found it there, in this transaction
        if (run_id, owner) in found.taken:
            return "claimed", existing, found.steps(run_id)
        if existing.status in ("completed", "failed"):
            return existing.status, existing, {}
        return "busy", existing, {}

    def claim(self, run_id: str, owner: str, *, allow_failed: bool = True) -> bool:
        """Take over a run whose process died or stopped renewing its lease (or, with
        ``allow_failed``, one that failed), for ``owner``. The spans its dead attempts left
        running are closed as interrupted in the same transaction."""
        values = {"run_id": run_id, "owner": owner, "workflow": None}
        found = self._commit(
            "claim a durable run", lambda c: self._take_over(c, [(values, allow_failed)])
        )
        return (run_id, owner) in found.taken

    @staticmethod
    def _take_over(connection: Any, wanted: list[tuple[dict[str, Any], bool]]) -> _Found:
        """In the caller's transaction: take over, for its owner, each run of ``wanted``
        (``run_id``, ``owner`` and ``workflow``, with whether a failed run may be taken) that
        can be resumed: its process is gone, its lease ran out or was given up, or it failed
        (where allowed); and that is a run of that workflow (``None``: any). Then read those
        runs and their steps, as they are now (see :class:`_Found`).

        Each run is taken by one conditional statement (see "Claims are atomic" in the module's
        docstring), in the order of their ids; the spans its earlier attempts left running are
        closed, since they never will end."""
        now = time.time()
        ids = sorted({values["run_id"] for values, _ in wanted})
        lease = lease_seconds()
        before = _read_runs(connection, ids)
        mark = _mark(connection)
        pid, host, pid_start = _process.this_process()
        taken: set[tuple[str, str]] = set()
        missed = False
        closing: list[str] = []
        for values, allow_failed in sorted(wanted, key=lambda want: want[0]["run_id"]):
            run_id, owner, workflow = values["run_id"], values["owner"], values["workflow"]
            row = before.get(run_id)
            if row is None or workflow not in (None, row.workflow):
                continue
            # A process known gone holds no lease, whatever its heartbeat says: its owner's
            # token is a condition of its own (None: nobody's, as NULL equals nothing).
            gone = (
                row.owner
                if row.status == "running" and _process.is_gone(row.host, row.pid, row.pid_start)
                else None
            )
            failed = " OR status = 'failed'" if allow_failed else ""
            # Both leases ran out: ours, and its holder's (see _status).
            attempts = connection.exec_driver_sql(
                f"UPDATE kagura_runs SET status = 'running', owner = {mark}, pid = {mark}, "
                f"host = {mark}, pid_start = {mark}, heartbeat_at = {mark}, updated_at = {mark}, "
                f"lease_seconds = {mark}, error = NULL, error_type = NULL, "
                f"attempts = attempts + 1 WHERE run_id = {mark} AND ((status = 'running' AND "
                f"((heartbeat_at < {mark} AND (lease_seconds IS NULL "
                f"OR heartbeat_at < {mark} - lease_seconds)) "
                f"OR owner = {mark})){failed}) RETURNING attempts",
                (owner, pid, host, pid_start, now, now, lease, run_id, now - lease, now, gone),
            ).scalar()
            if attempts is None:
                # Not resumable (held, completed), or another took it first: on PostgreSQL the
                # statement waited for that transaction and saw its row, newer than ``before``.
                missed = True
                continue
            taken.add((run_id, owner))
            closing.extend(attempt_span_id(run_id, n) for n in range(1, attempts))
        close_run_spans(connection, closing, now)
        runs = _read_runs(connection, ids) if taken or missed else before
        # The steps of the runs taken, to resume them; of the others (a completed run started
        # again, say) only how many, as a record says: not their outputs, which may be large.
        held = {run_id for run_id, _ in taken}
        steps = _read_steps(connection, sorted(held))
        counts = _count_steps(connection, [run_id for run_id in ids if run_id not in held])
        return _Found(taken, runs, steps, now, counts)

    def close_spans_of_gone_processes(self) -> int:
        """Close as interrupted the spans this host's dead processes left running (see
        ``kagura._storage``); how many. Recovery does it when it starts."""
        with self._store("close interrupted spans"), self.engine.begin() as connection:
            return close_spans_of_gone_processes(connection, time.time())

    def heartbeat(self, run_id: str, owner: str) -> bool:
        """Renew the lease; ``False`` if ``owner`` no longer holds it (taken over, released or
        finished)."""
        held = self._commit(
            "renew a durable run's lease", lambda c: self._renew(c, [(run_id, owner)], time.time())
        )
        return (run_id, owner) in held

    def finish(
        self,
        run_id: str,
        owner: str,
        *,
        result: str | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Record the run as completed with ``result``, or failed with ``error``, once its queued
        steps are committed."""
        self.flush()  # the steps are on disk before the run says it is done
        values = self._finish_values(run_id, owner, result, error)
        self._commit(
            "finish a durable run", lambda c: _finish(c, [values]), synced=error is not None
        )

    @staticmethod
    def _finish_values(
        run_id: str, owner: str, result: str | None, error: BaseException | None
    ) -> dict[str, Any]:
        now = time.time()
        return {
            "b_run_id": run_id,
            "b_owner": owner,
            "status": "completed" if error is None else "failed",
            "result": encrypt(result) if error is None else None,
            "error": None if error is None else encrypt(_error_text(error)),
            "error_type": None if error is None else type(error).__qualname__[:255],
            "updated_at": now,
            "heartbeat_at": now,
        }

    def release(self, run_id: str, owner: str) -> None:
        """Give the lease up at once (the run was cancelled): it is resumable immediately."""
        self.flush()
        values = {"b_run_id": run_id, "b_owner": owner}
        self._commit("release a durable run", lambda c: _release(c, [values]))

    def get_run(self, run_id: str) -> RunRecord | None:
        """The stored run ``run_id``, with its number of steps, or ``None`` if there is none."""
        from sqlalchemy import func, select

        from .._storage import runs, steps

        with self._store("read a durable run"), self.engine.connect() as connection:
            row = connection.execute(select(runs).where(runs.c.run_id == run_id)).first()
            if row is None:
                return None
            count = connection.execute(
                select(func.count()).where(steps.c.run_id == run_id)
            ).scalar_one()
        return _record(row, time.time(), lease_seconds(), int(count))

    def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int | None = 50,
    ) -> list[RunRecord]:
        """Runs, most recently updated first. ``status`` ``interrupted`` means marked running
        but resumable (lease expired, or its process known gone); ``running`` means held."""
        from sqlalchemy import select

        from .._storage import runs

        if limit is not None:
            count(limit, "limit", at_least=0)  # SQLite takes a negative one for no limit
        now, lease = time.time(), lease_seconds()
        query = select(runs).order_by(runs.c.updated_at.desc())
        if workflow is not None:
            query = query.where(runs.c.workflow == workflow)
        # Whether a running row is still held is decided here, not in SQL (its process may be
        # gone): those statuses are filtered after reading every running row.
        derived = status in ("running", "interrupted")
        if derived:
            query = query.where(runs.c.status == "running")
        elif status is not None:
            query = query.where(runs.c.status == status)
        if limit is not None and not derived:
            query = query.limit(limit)
        with self._store("list durable runs"), self.engine.connect() as connection:
            rows = connection.execute(query).all()
            # Counted for the runs listed only: a count of every run's steps grew with the
            # journal's whole history (0.4 s at a million steps), whatever was listed.
            counts = _count_steps(connection, [row.run_id for row in rows])
        records = [
            _record(row, now, lease, counts.get(row.run_id, 0), lenient=True) for row in rows
        ]
        if derived:
            records = [r for r in records if r.status == status]
        return records if limit is None else records[:limit]

    def delete_older_than(self, age: timedelta | datetime | float) -> int:
        """Retention: delete the runs that ended (completed or failed) before ``age`` ago (a
        timedelta or seconds) or before a datetime, with their journaled steps; how many runs.

        A run that is running or interrupted is never deleted, however old: it may still be
        resumed. A deleted run's id is free again: starting it runs the workflow afresh. Runs go
        :data:`RETENTION_BATCH` in a transaction, so that processes journaling meanwhile wait for
        one batch at most; a run resumed after retention chose it (a failed one) is kept."""
        before = cutoff(age, time.time())
        deleted = 0
        while True:
            found, gone = self._commit(
                "delete old durable runs", lambda c: _delete_ended(c, before, RETENTION_BATCH)
            )
            deleted += gone
            if found < RETENTION_BATCH:
                return deleted

    def read_run(self, run_id: str) -> tuple[RunRecord | None, dict[str, StepRecord]]:
        """:meth:`get_run` and :meth:`load_steps` in one trip: the run (``None`` if there is
        none) and its journaled steps, read on one connection."""
        self.flush()
        with self._store("read a durable run"), self.engine.connect() as connection:
            rows = _read_runs(connection, [run_id])
            steps = _read_steps(connection, [run_id])
        found = _Found(set(), rows, steps, time.time())
        return found.record(run_id), found.steps(run_id)

    def load_steps(self, run_id: str) -> dict[str, StepRecord]:
        """The journaled steps of run ``run_id`` by step key (what is queued is committed first)."""
        self.flush()
        with self._store("read a durable run's steps"), self.engine.connect() as connection:
            rows = _read_steps(connection, [run_id]).get(run_id, [])
        return _step_records(run_id, rows)

    # -- the writer's thread ----------------------------------------------------------------

    def flush(self, timeout: float = 60.0) -> None:
        """From any thread: wait until everything queued so far is committed (or failed)."""
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
            now = time.monotonic()
            if self._held and now >= self._next_heartbeat:
                self._next_heartbeat = now + _heartbeat_interval()
                self._renew_held()
            wait = _heartbeat_interval() if self._held else 1.0
            self._wake.wait(wait)
            self._wake.clear()
            # Whatever is queued is taken now; a loop that was closed before its turn ended
            # (its wake never came) is forgotten here.
            self._waking.clear()
            while self._queue:
                batch: list[_Request] = []
                markers: list[_Flush] = []
                with self._writing:
                    while self._queue and len(batch) < 1000:
                        item = self._queue.popleft()
                        if isinstance(item, _Flush):
                            markers.append(item)
                            break
                        batch.append(item)
                    if batch:
                        self._write_one(batch)
                for marker in markers:
                    marker.done.set()

    def _write_one(self, batch: list[_Request]) -> None:
        """:meth:`_write_batch`, kept from ending the writer's thread. A thread on its way out
        still counts as alive, so a request queued meanwhile would wait on it for ever."""
        try:
            self._write_batch(batch)
        except Exception as exc:  # a bug, since the store's errors are answered in there
            _log.exception("kagura: the journal failed to write %d durable writes", len(batch))
            _settle([(request, None, exc) for request in batch])  # answered ones are skipped

    def _renew_held(self) -> None:
        """Renew the leases of every run this process executes, in one transaction."""
        with self._held_lock:
            held = list(self._held.items())
        try:
            kept = self._commit("renew leases", lambda c: self._renew(c, held, time.time()))
        except Exception as exc:  # the next commit reports it to the run; keep trying
            _log.warning("kagura: renewing %d durable runs' leases failed: %s", len(held), exc)
            return
        for run_id, owner in held:
            if (run_id, owner) not in kept and self._held.get(run_id) == owner:
                _log.warning(
                    "kagura: durable run %s was taken over by another process; this process "
                    "commits nothing more of it",
                    run_id,
                )
                self._lose(run_id, owner)

    def _write_batch(self, batch: list[_Request]) -> None:
        """Everything queued, in one transaction: starts, then (for the runs this process still
        holds: see the module's docstring) steps, finishes and releases, then claims (a start
        of a run that exists is one: see :meth:`_take_over`). Requests were queued in order, so
        none is on disk before what preceded it."""
        starts: dict[str, _Request] = {}
        # Claims, and starts of an id a start before them in this batch makes (they find the
        # run there, held): each takes the run over if it can.
        finding: list[_Request] = []
        leased: list[_Request] = []
        for request in batch:
            if request.kind == "claim" or (
                request.kind == "start" and request.values["run_id"] in starts
            ):
                finding.append(request)
            elif request.kind == "start":
                starts[request.values["run_id"]] = request
            else:
                leased.append(request)

        def commit(connection: Any) -> tuple[set[tuple[str, str]], set[str], _Found]:
            now = time.time()
            # The lease first: its renewal takes the write lock (SQLite) or the run rows' locks
            # (PostgreSQL), so no claim can slip in before this transaction commits.
            pairs = {r.lease for r in leased if r.lease is not None}
            held = self._renew(connection, pairs, now) if pairs else set()
            # In the order of their ids, as every process inserts them: two starting the same
            # runs at once wait for each other rather than deadlock.
            created = (
                self._insert_runs(connection, [starts[run_id].values for run_id in sorted(starts)])
                if starts
                else set()
            )
            mine = [r for r in leased if r.lease in held]
            rows = [r.values for r in mine if r.kind == "step"]
            if rows:
                self._insert_steps(connection, rows)
            finishes = [r.values for r in mine if r.kind == "finish"]
            if finishes:
                _finish(connection, finishes)
            releases = [r.values for r in mine if r.kind == "release"]
            if releases:
                _release(connection, releases)
            # A start of a run that was there already takes it over if it was interrupted
            # (a failed run, only once resumed); a claim (a resume) if it failed, too.
            wanted = [(r.values, r.kind == "claim") for r in finding]
            wanted += [(r.values, False) for run_id, r in starts.items() if run_id not in created]
            return held, created, self._take_over(connection, wanted)

        # Only steps and failures wait for the disk (see "What waits for the disk" in the
        # module's docstring): a run's start and finish would each add a sync to its wall time.
        synced = any(
            request.kind == "step"
            or (request.kind == "finish" and request.values["status"] == "failed")
            for request in leased
        )
        try:
            # Committed again if PostgreSQL rolls it back for another transaction's sake (a
            # deadlock with another process's claim of a run, say).
            held, created, found = self._commit("journal durable runs", commit, synced=synced)
        except Exception as exc:
            if refused_values(exc):
                if len(batch) > 1:
                    # The database refused a value one request holds (a name longer than its
                    # column, say): each on its own, in order, so that that one alone fails,
                    # not every run with a write in this batch.
                    for request in batch:
                        self._write_batch([request])
                    return
                refused = store_error(self.url, "journal a durable run", exc)
                refused.__cause__ = exc
                exc = refused
            if leased:
                _log.warning("kagura: journaling %d durable writes failed: %s", len(leased), exc)
            _settle([(r, None, exc) for r in batch])
            return
        answers: list[tuple[_Request, Any, BaseException | None]] = []
        for request in leased:
            lease = request.lease
            assert lease is not None
            if lease not in held:
                self._lose(*lease)
                answers.append((request, None, RunTakenOverError(lease[0])))
                continue
            if request.kind != "step":  # finished or released: no lease to renew any more
                self.let_go(*lease)
            answers.append((request, None, None))
        # Records are made (their values decrypted) one by one: a value no key decrypts fails
        # that caller alone.
        for request in (*starts.values(), *finding):
            values = request.values
            try:
                if request.kind == "claim":
                    answer: Any = self._claimed(values, found)
                else:
                    made = values["run_id"] in created and starts[values["run_id"]] is request
                    answer = self._started(values, made, found)
            except Exception as exc:
                answers.append((request, None, exc))
            else:
                answers.append((request, answer, None))
        _settle(answers)

    @staticmethod
    def _claimed(
        values: dict[str, Any], found: _Found
    ) -> tuple[RunRecord | None, dict[str, StepRecord] | None]:
        """What a claim found (see :meth:`claim_soon`)."""
        run_id = values["run_id"]
        record = found.record(run_id)
        if (run_id, values["owner"]) not in found.taken:
            return record, None
        return record, found.steps(run_id)

    def _renew(
        self, connection: Any, pairs: Iterable[tuple[str, str]], now: float
    ) -> set[tuple[str, str]]:
        """Renew the lease of each (run id, owner) whose owner still holds the run; the pairs
        that do. In the caller's transaction, which this makes hold those runs until it ends.

        A run that failed is still its owner's until another resumes it: a step that a parallel
        branch finished after the run failed (``asyncio.gather`` leaves the other branches
        running) is journaled, rather than lost and run again on resume."""
        pairs = sorted(set(pairs))
        mark = _mark(connection)
        held: set[tuple[str, str]] = set()
        # One statement per chunk of runs, not one per run (a batch renews hundreds at once),
        # found by their key. Owner tokens are made afresh for every start and claim, so an
        # owner among the chunk's holds no other run of it: the two lists match as pairs do.
        # 0 is a released lease (a cancelled run): a heartbeat must not revive it. A failed run's
        # heartbeat is not read.
        for start in range(0, len(pairs), _CHUNK):
            chunk = pairs[start : start + _CHUNK]
            marks = ", ".join(mark for _ in chunk)
            renewed = connection.exec_driver_sql(
                f"UPDATE kagura_runs SET heartbeat_at = {mark} WHERE run_id IN ({marks}) "
                f"AND owner IN ({marks}) "
                "AND ((status = 'running' AND heartbeat_at > 0) OR status = 'failed') "
                "RETURNING run_id, owner",
                (now, *(run_id for run_id, _ in chunk), *(owner for _, owner in chunk)),
            )
            held.update((run_id, owner) for run_id, owner in renewed)
        return held & set(pairs)

    @staticmethod
    def _insert_steps(connection: Any, rows: list[dict[str, Any]]) -> None:
        """Journal steps; a re-executed step (a tool called again by an agent that itself ran
        again) replaces its row."""
        values = ", ".join(_mark(connection) for _ in _STEP_COLUMNS)
        replaced = ", ".join(f"{c} = excluded.{c}" for c in _STEP_COLUMNS[2:] if c != "created_at")
        connection.exec_driver_sql(
            f"INSERT INTO kagura_steps ({', '.join(_STEP_COLUMNS)}) VALUES ({values}) "
            f"ON CONFLICT (run_id, step_key) DO UPDATE SET {replaced}",
            [tuple(row[c] for c in _STEP_COLUMNS) for row in rows],
        )


#: The writer's statements (runs started and claimed, leases renewed, steps, finishes, releases,
#: and what a batch reads back of the runs it started or claimed) go to the driver as SQL:
#: SQLAlchemy's per-row work doubled their cost (measured: 200 runs' renewals and 600 steps took
#: 11.5 ms through SQLAlchemy Core, 5.1 ms as SQL), and each step, and each run's start, claim
#: and finish, waits for its batch. The statements are the same on SQLite and PostgreSQL, but
#: for the parameter mark.
_RUN_COLUMNS = (
    "run_id",
    "workflow",
    "target",
    "status",
    "arguments",
    "owner",
    "pid",
    "host",
    "pid_start",
    "heartbeat_at",
    "created_at",
    "updated_at",
    "attempts",
    "lease_seconds",
)
_STEP_COLUMNS = (
    "run_id",
    "step_key",
    "name",
    "kind",
    "input_hash",
    "output",
    "created_at",
    "position",
)


#: What is read of a run: its columns as written at its start, and those of its end.
_RUN_READ = (*_RUN_COLUMNS, "result", "error", "error_type")


def _by_ids(connection: Any, query: str, run_ids: list[str], then: str = "") -> Iterator[Any]:
    """The rows of ``{query} IN (...) {then}`` (a query whose condition ends with a column of run
    ids) for ``run_ids``, :data:`_CHUNK` ids at a time."""
    mark = _mark(connection)
    for start in range(0, len(run_ids), _CHUNK):
        chunk = run_ids[start : start + _CHUNK]
        marks = ", ".join(mark for _ in chunk)
        yield from connection.exec_driver_sql(f"{query} IN ({marks}) {then}", tuple(chunk))


def _read_runs(connection: Any, run_ids: list[str]) -> dict[str, Any]:
    """The rows of ``run_ids`` that exist, by id."""
    query = f"SELECT {', '.join(_RUN_READ)} FROM kagura_runs WHERE run_id"
    return {row.run_id: row for row in _by_ids(connection, query, run_ids)}


def _read_steps(connection: Any, run_ids: list[str]) -> dict[str, list[Any]]:
    """The step rows of each of ``run_ids`` (those with none are left out)."""
    query = f"SELECT {', '.join(_STEP_COLUMNS)} FROM kagura_steps WHERE run_id"
    found: dict[str, list[Any]] = {}
    for row in _by_ids(connection, query, run_ids):
        found.setdefault(row.run_id, []).append(row)
    return found


def _count_steps(connection: Any, run_ids: list[str]) -> dict[str, int]:
    """How many steps each of ``run_ids`` has journaled (those with none are left out)."""
    query = "SELECT run_id, count(*) FROM kagura_steps WHERE run_id"
    counted = _by_ids(connection, query, run_ids, "GROUP BY run_id")
    return {run_id: int(count) for run_id, count in counted}


def _step_records(run_id: str, rows: list[Any]) -> dict[str, StepRecord]:
    """The steps of ``run_id`` by key, their outputs decrypted."""
    return {
        row.step_key: StepRecord(
            row.step_key,
            row.name,
            row.kind,
            row.input_hash,
            decrypt(row.output, f"the output of step {row.step_key!r} of run {run_id!r}"),
            row.created_at,
            row.position,
        )
        for row in rows
    }


class _Found:
    """Runs as a transaction that took some over (see :meth:`Journal._take_over`) read them:
    their rows, the steps of those taken (only their counts for the others), made records only
    when asked, since decrypting one may fail (no key) and that must fail its caller alone."""

    __slots__ = ("_counts", "_rows", "_steps", "now", "taken")

    def __init__(
        self,
        taken: set[tuple[str, str]],
        rows: dict[str, Any],
        steps: dict[str, list[Any]],
        now: float,
        counts: dict[str, int] | None = None,
    ) -> None:
        self.taken = taken  # (run id, owner) of each run taken over
        self._rows = rows
        self._steps = steps  # by run id: the step rows read
        self._counts = counts or {}  # by run id: how many steps, for runs whose rows were not
        self.now = now

    def record(self, run_id: str) -> RunRecord | None:
        row = self._rows.get(run_id)
        if row is None:
            return None
        steps = self._steps.get(run_id)
        count = len(steps) if steps is not None else self._counts.get(run_id, 0)
        return _record(row, self.now, lease_seconds(), count)

    def steps(self, run_id: str) -> dict[str, StepRecord]:
        return _step_records(run_id, self._steps.get(run_id, []))


def _mark(connection: Any) -> str:
    return "%s" if connection.dialect.paramstyle in ("format", "pyformat") else "?"


def _finish(connection: Any, rows: list[dict[str, Any]]) -> None:
    """Runs' ends (:meth:`Journal._finish_values`), each for the owner that holds it."""
    mark = _mark(connection)
    connection.exec_driver_sql(
        f"UPDATE kagura_runs SET status = {mark}, result = {mark}, error = {mark}, "
        f"error_type = {mark}, updated_at = {mark}, heartbeat_at = {mark} "
        f"WHERE run_id = {mark} AND owner = {mark}",
        [
            (
                row["status"],
                row["result"],
                row["error"],
                row["error_type"],
                row["updated_at"],
                row["heartbeat_at"],
                row["b_run_id"],
                row["b_owner"],
            )
            for row in rows
        ],
    )


def _release(connection: Any, rows: list[dict[str, Any]]) -> None:
    """Runs' leases given up by the owners that hold them: resumable at once."""
    mark = _mark(connection)
    now = time.time()
    connection.exec_driver_sql(
        f"UPDATE kagura_runs SET heartbeat_at = 0.0, updated_at = {mark} "
        f"WHERE run_id = {mark} AND owner = {mark}",
        [(now, row["b_run_id"], row["b_owner"]) for row in rows],
    )


#: How many runs retention deletes in one transaction: their rows and a few steps each, well
#: under a second, so that the writers it holds up wait for one batch at most.
RETENTION_BATCH = 1000

_ENDED = "status IN ('completed', 'failed')"


def _delete_ended(connection: Any, cutoff: float, limit: int) -> tuple[int, int]:
    """Delete up to ``limit`` runs that ended before ``cutoff``, and their steps (in the
    caller's transaction): (how many were found, how many deleted). The index of runs by
    status and update time finds them; each is deleted only if it is still ended then."""
    mark = _mark(connection)
    found = [
        run_id
        for (run_id,) in connection.exec_driver_sql(
            f"SELECT run_id FROM kagura_runs WHERE {_ENDED} AND updated_at < {mark} "
            f"LIMIT {int(limit)}",
            (cutoff,),
        )
    ]
    if not found:
        return 0, 0
    marks = ", ".join(mark for _ in found)
    gone = [
        run_id
        for (run_id,) in connection.exec_driver_sql(
            f"DELETE FROM kagura_runs WHERE run_id IN ({marks}) AND {_ENDED} "
            f"AND updated_at < {mark} RETURNING run_id",
            (*found, cutoff),
        )
    ]
    if gone:
        connection.exec_driver_sql(
            f"DELETE FROM kagura_steps WHERE run_id IN ({', '.join(mark for _ in gone)})",
            tuple(gone),
        )
    return len(found), len(gone)


def _settle(answers: list[tuple[_Request, Any, BaseException | None]]) -> None:
    """Hand each answer to its caller's loop: one call per loop, not one per request."""
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
    from .._storage import default_url, normalise_url

    lease_seconds()  # a setting that would stop its thread fails here, in the caller
    key = default_url() if url is None else normalise_url(url)
    with _journals_lock:
        journal = _journals.get(key)
        if journal is None:
            journal = _journals[key] = Journal(key)
            atexit.register(journal.flush, 30.0)  # steps queued at exit are not lost
        return journal
