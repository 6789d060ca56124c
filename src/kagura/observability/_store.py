"""``EventStore``: query what Kagura recorded.

``EventStore()`` opens the same store the recorder writes to (``KAGURA_DB``, else
``KAGURA_HOME/events.db``); pass a path or a ``postgresql://`` URL for another. Reads first flush
this process's recorder when it writes to the same store, so an execution that just finished is
visible at once. Every method has an ``a``-prefixed async twin that runs in a worker thread.

A SQLite store this user may not write (its file, or its directory) is read without writing
anything; a store that cannot be opened or read raises :class:`~kagura.errors.StoreError`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from .. import _encryption
from .._checks import count, cutoff
from .._storage import (
    can_write,
    close_spans_of_gone_processes,
    default_url,
    engine_for,
    normalise_url,
    redact_url,
    store_errors,
    take_off_rollups,
    tally_of,
)
from ..errors import UsageError
from ._handoff import wait_for_writers
from ._recorder import default_recorder
from ._totals import Totals

EXECUTION_KINDS = ("agent", "workflow")
#: How many runs retention deletes in one transaction (a few thousand spans: well under a second),
#: and how many it reads before deleting them, batch by batch (see ``delete_older_than``).
RETENTION_BATCH = 1000
RETENTION_READ = 100_000
_GROUPS = ("agent", "model", "day")

_P = ParamSpec("_P")
_R = TypeVar("_R")
_Method = Callable[Concatenate["EventStore", _P], _R]


def _using_the_store(doing: str) -> Callable[[_Method[_P, _R]], _Method[_P, _R]]:
    """The method's store faults raised as :class:`~kagura.errors.StoreError` (see
    `kagura._storage.store_errors`), saying it could not ``doing``."""

    def decorate(method: _Method[_P, _R]) -> _Method[_P, _R]:
        @functools.wraps(method)
        def wrapper(store: EventStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            with store_errors(store.url, doing):
                return method(store, *args, **kwargs)

        return wrapper

    return decorate


def _timestamp(value: datetime | float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()  # a naive datetime is local time, as everywhere in Python
    return float(value)


def _when(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=UTC)


def _json(text: str | None, what: str) -> Any:
    text = _encryption.decrypt(text, what)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _metrics(row: Any) -> dict[str, Any]:
    return {
        "total_cost": row.cost_usd,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "total_tokens": row.total_tokens,
        "llm_calls": row.llm_calls,
        "retries": row.retries,
        "duration_ms": _duration(row),
    }


def _duration(row: Any) -> float | None:
    """The span's duration; ``None`` while it runs, and when it was interrupted: its end is not
    known (a store made by an older version holds how long until its death was noticed)."""
    return None if row.status == "interrupted" else row.duration_ms


def _execution(row: Any, what: str) -> dict[str, Any]:
    """An execution's dict from its row; ``what`` names the store's recorded content in the
    error raised when it is encrypted and no configured key decrypts it."""
    return {
        "id": row.span_id,
        "run_id": row.run_id,
        "parent_id": row.parent_id,
        "kind": row.kind,
        "name": row.name,
        "step_key": row.step_key,
        "status": row.status,
        "started_at": _when(row.started_at),
        "ended_at": _when(row.ended_at),
        "duration_ms": _duration(row),
        "model": row.model,
        "error": _encryption.decrypt(row.error, what),
        "error_type": row.error_type,
        "inputs": _json(row.inputs, what),
        "output": _json(row.output, what),
        "attributes": _json(row.attributes, what) or {},
        "metrics": _metrics(row),
        "host": row.host,
        "pid": row.pid,
    }


class EventStore:
    """Recorded workflow runs, agent calls, LLM attempts and tool calls.

    Executions are dicts: ``id``, ``run_id``, ``parent_id``, ``kind``, ``name``, ``status``
    (running, completed, failed, cancelled, timed_out, interrupted: its process died first),
    ``started_at``/``ended_at`` (UTC datetimes; an interrupted one's ``ended_at`` is when its
    death was noticed), ``duration_ms`` (``None`` while running and when interrupted: its end
    is not known), ``model``, ``error``,
    ``inputs``, ``output``, ``host`` and ``pid`` (the process that recorded it) and ``metrics``
    (``total_cost`` in USD, ``None`` when a price was unknown; ``prompt_tokens``,
    ``completion_tokens``, ``total_tokens``, ``llm_calls``, ``retries``).

    Inputs, outputs, errors and attributes recorded encrypted (``KAGURA_ENCRYPTION_KEY``) are
    decrypted with the configured keys; when none does, the query raises
    :class:`~kagura.errors.EncryptionKeyError`. Counts, tokens, costs and latencies need no key.
    """

    def __init__(self, db_path_or_url: str | Path | None = None) -> None:
        self.url: str = default_url() if db_path_or_url is None else normalise_url(db_path_or_url)
        self._engine: Any = None
        # A store this user may only read is read as it is: no schema made or brought up to
        # date, no interrupted spans closed (see _sync).
        self._read_only = not can_write(self.url)

    def __repr__(self) -> str:
        return f"EventStore({redact_url(self.url)!r})"

    @property
    def _content(self) -> str:
        """What :func:`kagura._encryption.decrypt` calls this store's encrypted values."""
        return f"recorded content in the event store {redact_url(self.url)}"

    @property
    def engine(self) -> Any:
        if self._engine is None:
            self._engine = engine_for(self.url, read_only=self._read_only)
        return self._engine

    def _sync(self) -> None:
        """Before a query: what this process has recorded so far in the tables (its recorder
        flushed: a reader waits for the writer, never does its work), and what processes that
        have ended handed to their writers (see _handoff), and the spans of this host's
        processes that died closed (unless this user may not write the store)."""
        # Rows that processes gave their writers as they exited: being committed now.
        wait_for_writers(self.url)
        recorder = default_recorder()
        if recorder is not None and recorder.url == self.url:
            recorder.flush()
        if not self._read_only:
            # Spans of this host's processes that died say running until someone notices.
            with self.engine.begin() as connection:
                close_spans_of_gone_processes(connection, time.time())

    # -- queries ------------------------------------------------------------------------------

    @_using_the_store("read")
    def get_executions(
        self,
        agent_name: str | None = None,
        *,
        status: str | Iterable[str] | None = None,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
        kind: str | Iterable[str] | None = EXECUTION_KINDS,
        run_id: str | None = None,
        limit: int | None = 50,
    ) -> list[dict[str, Any]]:
        """Executions, newest first. ``agent_name`` matches agent and workflow names."""
        from sqlalchemy import select

        from .._storage import spans

        if limit is not None:
            count(limit, "limit", at_least=0)  # SQLite takes a negative one for no limit
        self._sync()
        query = select(spans).order_by(spans.c.started_at.desc())
        if agent_name is not None:
            query = query.where(spans.c.name == agent_name)
        if status is not None:
            query = query.where(spans.c.status.in_([status] if isinstance(status, str) else status))
        if run_id is not None:
            query = query.where(spans.c.run_id == run_id)
        if since is not None:
            query = query.where(spans.c.started_at >= _timestamp(since))
        if until is not None:
            query = query.where(spans.c.started_at < _timestamp(until))
        if limit is not None:
            query = query.limit(limit)
        kinds = [kind] if isinstance(kind, str) else None if kind is None else list(kind)
        if kinds == []:
            return []
        if kinds is None or len(kinds) == 1 or agent_name is not None or run_id is not None:
            if kinds is not None:
                query = query.where(spans.c.kind.in_(kinds))
            queries = [query]
        else:
            # The newest of each kind, then the newest of those: each kind's query walks the
            # (kind, started_at) index from its end, where one query for all of them sorted
            # every span of those kinds (1M agent calls: 3.6 s, against milliseconds). With a
            # name or a run, that name's or run's index is the walk.
            queries = [query.where(spans.c.kind == k) for k in kinds]
        with self.engine.connect() as connection:
            found = [row for each in queries for row in connection.execute(each)]
        if len(queries) > 1:
            found.sort(key=lambda row: row.started_at, reverse=True)
            found = found[:limit]
        return [_execution(row, self._content) for row in found]

    @_using_the_store("read")
    def get_execution(self, execution_id: str) -> dict[str, Any] | None:
        """One execution with its subtree under ``children`` and its ``events``."""
        from sqlalchemy import select

        from .._storage import events, spans

        self._sync()
        with self.engine.connect() as connection:
            root = connection.execute(select(spans).where(spans.c.span_id == execution_id)).first()
            if root is None:
                return None
            rows = connection.execute(
                select(spans).where(spans.c.run_id == root.run_id).order_by(spans.c.started_at)
            ).all()
            event_rows = connection.execute(
                select(events).where(events.c.run_id == root.run_id).order_by(events.c.at)
            ).all()
        what = self._content
        nodes = {
            row.span_id: {**_execution(row, what), "children": [], "events": []} for row in rows
        }
        for event in event_rows:
            node = nodes.get(event.span_id)
            if node is not None:
                node["events"].append(
                    {
                        "name": event.name,
                        "at": _when(event.at),
                        "attributes": _json(event.attributes, what),
                    }
                )
        for node in nodes.values():
            parent = nodes.get(node["parent_id"]) if node["parent_id"] else None
            if parent is not None:
                parent["children"].append(node)
        result: dict[str, Any] = nodes[root.span_id]
        return result

    @_using_the_store("read")
    def find_ids(self, prefix: str, *, limit: int = 10) -> list[str]:
        """Ids of spans that start with ``prefix`` (at most ``limit``), for ids typed short."""
        from sqlalchemy import select

        from .._storage import spans

        self._sync()
        query = (
            select(spans.c.span_id)
            .where(spans.c.span_id.startswith(prefix, autoescape=True))
            .order_by(spans.c.span_id)
            .limit(limit)
        )
        with self.engine.connect() as connection:
            return [str(span_id) for span_id in connection.execute(query).scalars()]

    @_using_the_store("read")
    def stats(
        self, *, since: datetime | float | None = None, agent_name: str | None = None
    ) -> dict[str, Any]:
        """Counts, failure rate and latency percentiles of agent calls; tokens and cost by agent,
        model and day.

        Read from the totals the writer keeps per hour (see :mod:`._totals`), so its time
        hardly grows with the store; the percentiles are exact all the same."""
        self._sync()
        with self.engine.connect() as connection:
            totals = Totals(connection, _timestamp(since), agent_name)
            latency = totals.percentiles(connection)
        by_status = totals.by_status()
        total = sum(by_status.values())
        finished = total - by_status.get("running", 0)
        failures = total - by_status.get("completed", 0) - by_status.get("running", 0)
        result: dict[str, Any] = {
            "executions": total,
            "by_status": by_status,
            "failure_rate": (failures / finished) if finished else 0.0,
            "latency_ms": latency,
            "workflow_runs": totals.workflow_runs(),
        }
        for group in _GROUPS:
            result[f"by_{group}"] = _cost_groups(group, totals.costs(group))
        rows = result["by_model"]
        result["tokens"] = {
            "prompt": sum(r["prompt_tokens"] for r in rows),
            "completion": sum(r["completion_tokens"] for r in rows),
            "total": sum(r["total_tokens"] for r in rows),
        }
        known = [r["cost_usd"] for r in rows]
        result["cost_usd"] = None if any(c is None for c in known) else sum(known)
        return result

    @_using_the_store("read")
    def cost(
        self,
        *,
        by: str = "agent",
        since: datetime | float | None = None,
        agent_name: str | None = None,
    ) -> list[dict[str, Any]]:
        """Calls, tokens and cost grouped ``by`` agent, model or day (UTC), costliest first;
        ``agent_name`` keeps only that agent's calls (and their LLM attempts).

        ``cost_usd`` is ``None`` for a group where some call had no known price.
        """
        if by not in _GROUPS:
            raise UsageError(f"cost(by=...) takes one of {', '.join(_GROUPS)}, got {by!r}")
        self._sync()
        kinds = ("agent",) if by == "agent" else ("llm",)
        with self.engine.connect() as connection:
            totals = Totals(connection, _timestamp(since), agent_name, kinds)
        return _cost_groups(by, totals.costs(by))

    @_using_the_store("delete old runs")
    def delete_older_than(self, age: timedelta | datetime | float) -> int:
        """Retention: delete runs that started before ``age`` ago (a timedelta or seconds) or
        before a datetime, and have ended (a run still running is kept, however old). Returns
        the number of spans deleted.

        Oldest first, :data:`RETENTION_BATCH` runs in a transaction: one that fails midway (the
        store gone) has deleted the oldest runs, and running it again deletes the rest."""
        from sqlalchemy import select

        from .._storage import spans

        before = cutoff(age, time.time())
        self._sync()  # also closes the spans of processes gone from this host, as interrupted
        # Whole runs go together, judged by their root's start, so no tree is left half-deleted;
        # oldest first, so that each batch's runs share a few hours of rollups. A run still
        # running is kept: its spans that end later would be written into a deleted tree.
        old_runs = (
            select(spans.c.run_id)
            .where(
                spans.c.parent_id.is_(None),
                spans.c.started_at < before,
                spans.c.status != "running",
            )
            .order_by(spans.c.started_at)
        )
        # In batches of runs, a transaction each: one transaction held the store's write lock
        # for as long as the whole deletion took (a minute for a day of 10 million calls, on
        # SQLite), and writers meanwhile waited for it, or failed after the busy timeout. The
        # runs are read RETENTION_READ at a time, each time from the oldest left: a read
        # kept open while the batches commit kept SQLite from copying its log into the file
        # (a checkpoint), and every batch got slower as the log grew.
        deleted = 0
        while True:
            with self.engine.connect() as reading:
                run_ids = list(reading.execute(old_runs.limit(RETENTION_READ)).scalars())
            for start in range(0, len(run_ids), RETENTION_BATCH):
                deleted += self._delete_runs(run_ids[start : start + RETENTION_BATCH])
            if len(run_ids) < RETENTION_READ:
                return deleted

    def _delete_runs(self, run_ids: list[str]) -> int:
        """Delete these runs' spans and events, and take the spans off the rollups, in one
        transaction; how many spans."""
        from sqlalchemy import delete

        from .._storage import ROLLUP_COLUMNS, events, spans

        with self.engine.begin() as connection:
            connection.execute(delete(events).where(events.c.run_id.in_(run_ids)))
            # What was deleted, read by the delete itself: a span that a writer finished
            # meanwhile is taken off as it was counted. (The rollups' lock comes after the
            # spans' rows, as a writer takes them: the other order could deadlock with one.)
            gone = connection.execute(
                delete(spans)
                .where(spans.c.run_id.in_(run_ids))
                .returning(*(spans.c[name] for name in ROLLUP_COLUMNS))
            ).all()
            take_off_rollups(connection, tally_of(gone))
        return len(gone)

    # -- async twins ----------------------------------------------------------------------

    # Each twin repeats its method's parameters rather than taking ``**kwargs``: a type checker
    # then sees a misspelt one.
    async def aget_executions(
        self,
        agent_name: str | None = None,
        *,
        status: str | Iterable[str] | None = None,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
        kind: str | Iterable[str] | None = EXECUTION_KINDS,
        run_id: str | None = None,
        limit: int | None = 50,
    ) -> list[dict[str, Any]]:
        """:meth:`get_executions`, in a thread."""
        return await asyncio.to_thread(
            self.get_executions,
            agent_name,
            status=status,
            since=since,
            until=until,
            kind=kind,
            run_id=run_id,
            limit=limit,
        )

    async def aget_execution(self, execution_id: str) -> dict[str, Any] | None:
        """:meth:`get_execution`, in a thread."""
        return await asyncio.to_thread(self.get_execution, execution_id)

    async def afind_ids(self, prefix: str, *, limit: int = 10) -> list[str]:
        """:meth:`find_ids`, in a thread."""
        return await asyncio.to_thread(self.find_ids, prefix, limit=limit)

    async def astats(
        self, *, since: datetime | float | None = None, agent_name: str | None = None
    ) -> dict[str, Any]:
        """:meth:`stats`, in a thread."""
        return await asyncio.to_thread(self.stats, since=since, agent_name=agent_name)

    async def acost(
        self,
        *,
        by: str = "agent",
        since: datetime | float | None = None,
        agent_name: str | None = None,
    ) -> list[dict[str, Any]]:
        """:meth:`cost`, in a thread."""
        return await asyncio.to_thread(self.cost, by=by, since=since, agent_name=agent_name)

    async def adelete_older_than(self, age: timedelta | datetime | float) -> int:
        """:meth:`delete_older_than`, in a thread."""
        return await asyncio.to_thread(self.delete_older_than, age)


def _cost_groups(by: str, rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Rows of (key, calls, failures, prompt, completion and total tokens, cost, unpriced calls)
    added up by key, costliest first (by day: in date order)."""
    sums: dict[Any, list[Any]] = {}
    for key, *figures in rows:
        total = sums.get(key)
        if total is None:
            sums[key] = [value or 0 for value in figures]
        else:
            for at, value in enumerate(figures):
                total[at] += value or 0
    result = [
        {
            by: key,
            "calls": int(calls),
            "failures": int(failures),
            "prompt_tokens": int(prompt),
            "completion_tokens": int(completion),
            "total_tokens": int(tokens),
            "cost_usd": None if unpriced else float(cost),
        }
        for key, (calls, failures, prompt, completion, tokens, cost, unpriced) in sums.items()
    ]
    if by == "day":
        result.sort(key=lambda r: str(r["day"]))
    else:
        result.sort(key=lambda r: (r["cost_usd"] is not None, r["cost_usd"] or 0), reverse=True)
    return result
