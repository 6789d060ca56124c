"""Rollups: the monitor's statistics without reading every span.

``EventStore.stats()`` and ``cost()`` add up calls, tokens, costs and latencies over whole
stores; reading millions of spans for that took seconds. The writer keeps running totals as it
writes finished spans (:func:`write_rollups`, in the batch's transaction), in two tables (see
_schema):

- ``kagura_rollups``: per kind, UTC hour (:func:`hour_of`), name and status: calls, tokens, the
  cost of the calls whose cost was known, and how many were not. Agent calls by agent, LLM
  attempts by model (under their agent, and under "" with every agent's), workflow runs (root
  workflows) by workflow.
- ``kagura_latency``: agent calls per duration bucket (:data:`EDGES`, 2% wide): per hour under
  "" (every agent's), per day under their agent (:func:`day_hour`: an hour's rows of every
  agent and bucket would be as many as the calls). A percentile is found in its bucket, then
  read exactly from the spans in that bucket's range (see ``EventStore.stats``).

They hold spans with a final status only (completed, failed, cancelled, timed_out): a running
span has not ended, and an interrupted one may still be replaced by its finished row (its
writer delivers after its process died; see _interrupted). Queries read those two from the
spans table, through partial indexes that hold only them. A finished span's row is written
once, so it is counted once.

An hour is ``started_at // 3600`` (Python's floor division is exact): a span is in hour ``h``
exactly when ``h * 3600 <= started_at < (h + 1) * 3600``, so a query from any moment reads the
rollups of the hours after it and the spans before the first whole hour, each span once.

Retention (``delete_older_than``) takes the spans it deletes off the rollups
(:func:`take_off_rollups`), and a store made by an older version gets its rollups from its
spans when it is upgraded (:func:`rebuild_rollups`).
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterable
from typing import Any

HOUR = 3600.0
#: Statuses of spans the rollups leave out (see the module docstring).
NOT_FINAL = ("running", "interrupted")

#: Lower bounds of the latency buckets in milliseconds, each 2% above the one before, from 1 µs
#: to about 12 days: bucket ``b`` holds durations in ``[EDGES[b - 1], EDGES[b])`` (bucket 0
#: those below ``EDGES[0]``, the last those from ``EDGES[-1]`` up). Counts per bucket find the
#: bucket a percentile is in; the spans in that range then give its exact value, so the width
#: only decides how many spans that last read looks at.
EDGES: tuple[float, ...] = tuple(0.001 * 1.02**i for i in range(1396))

#: The spans columns a tally reads, in the order :meth:`Tally.add` takes them.
ROLLUP_COLUMNS = (
    "kind",
    "name",
    "agent",
    "model",
    "status",
    "started_at",
    "duration_ms",
    "parent_id",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
)


def hour_of(started_at: float) -> int:
    """The hour a span started in (hours since the Unix epoch, UTC)."""
    return int(started_at // HOUR)


def day_hour(hour: int) -> int:
    """The first hour of the UTC day of ``hour``: where one agent's latency counts are kept."""
    return hour // 24 * 24


def bucket(duration_ms: float) -> int:
    """The latency bucket of ``duration_ms`` (see :data:`EDGES`)."""
    return bisect.bisect_right(EDGES, duration_ms)


def bucket_range(number: int) -> tuple[float | None, float | None]:
    """The durations bucket ``number`` holds: ``[low, high)``, ``None`` for no bound."""
    low = EDGES[number - 1] if number > 0 else None
    high = EDGES[number] if number < len(EDGES) else None
    return low, high


class Tally:
    """Rollup rows added up in memory: what a batch of spans adds to the tables, or (in a
    query) what the spans the tables leave out add to what they hold."""

    __slots__ = ("latency", "totals")

    def __init__(self) -> None:
        #: (kind, agent, hour, name, status) -> [calls, prompt, completion, total tokens,
        #: known cost, unpriced calls]
        self.totals: dict[tuple[str, str, int, str, str], list[Any]] = {}
        #: (agent, hour, bucket) -> calls
        self.latency: dict[tuple[str, int, int], int] = {}

    def __bool__(self) -> bool:
        return bool(self.totals or self.latency)

    def add(self, row: tuple[Any, ...] | Any) -> None:
        """Count one span, given as the values of :data:`ROLLUP_COLUMNS`, whatever its status;
        its duration only when it has ended (an interrupted span's end is not known: a store
        made by an older version holds, as its duration, how long until its death was
        noticed)."""
        kind, name, agent, model, status, started_at, duration_ms, parent_id = row[:8]
        hour = int(started_at // HOUR)  # hour_of, inlined: the writer counts every span
        if kind == "agent":
            self._count(("agent", "", hour, name, status), row)
            if duration_ms is not None and status not in NOT_FINAL:
                number = bucket(duration_ms)
                latency = self.latency
                key = ("", hour, number)
                latency[key] = latency.get(key, 0) + 1
                if name:
                    key = (name, day_hour(hour), number)
                    latency[key] = latency.get(key, 0) + 1
        elif kind == "llm":
            self._count(("llm", "", hour, model or "", status), row)
            if agent:
                self._count(("llm", agent, hour, model or "", status), row)
        elif kind == "workflow" and parent_id is None:
            self._count(("workflow", "", hour, name, status), row)

    def _count(self, key: tuple[str, str, int, str, str], row: tuple[Any, ...] | Any) -> None:
        prompt, completion, total, cost = row[8:12]
        sums = self.totals.get(key)
        if sums is None:
            self.totals[key] = [
                1,
                prompt or 0,
                completion or 0,
                total or 0,
                cost or 0.0,
                1 if cost is None else 0,
            ]
            return
        sums[0] += 1
        sums[1] += prompt or 0
        sums[2] += completion or 0
        sums[3] += total or 0
        if cost is None:
            sums[5] += 1
        else:
            sums[4] += cost


def tally_of(rows: Iterable[tuple[Any, ...]]) -> Tally:
    """The tally of ``rows`` (values of :data:`ROLLUP_COLUMNS`) that have a final status: what
    writing them adds to the rollups."""
    tally = Tally()
    for row in rows:
        if row[4] not in NOT_FINAL:
            tally.add(row)
    return tally


#: The key of the PostgreSQL advisory lock held by whoever changes the rollups (see
#: :func:`lock_rollups`): "kagura" in ASCII, then 2.
_ROLLUPS_LOCK = 0x6B6167757261_0002


def lock_rollups(connection: Any) -> None:
    """Take the rollups' lock until the caller's transaction ends (PostgreSQL; SQLite has one
    writer at a time anyway).

    Writers adding to the rollups wait for each other on their rows in any case (every batch
    adds to the same hour's), so this costs them no concurrency; it keeps a rebuild (an
    upgrade), which deletes rows and writes them again, from interleaving with them, and so
    retention's taking off (see :func:`take_off_rollups`). Without it a rebuild and a writer
    deadlocked, and PostgreSQL rolled one of them back."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_ROLLUPS_LOCK})")


def write_rollups(connection: Any, tally: Tally) -> None:
    """Add ``tally`` to the rollup tables (in the caller's transaction, holding the rollups'
    lock from here to its end: see :func:`lock_rollups`)."""
    if not tally:
        return
    lock_rollups(connection)
    if tally.totals:
        connection.exec_driver_sql(
            _upsert_sql(connection.dialect, "kagura_rollups"),
            [(*key, *sums) for key, sums in sorted(tally.totals.items())],
        )
    if tally.latency:
        connection.exec_driver_sql(
            _upsert_sql(connection.dialect, "kagura_latency"),
            [(*key, calls) for key, calls in sorted(tally.latency.items())],
        )


def take_off_rollups(connection: Any, tally: Tally) -> None:
    """Take ``tally``, of spans deleted in the caller's transaction, off the rollup tables; rows
    left without calls go.

    Retention deletes in batches of runs, each in a transaction that must stay short (writers
    wait for it): rebuilding the rollups of the days it touched read every span of those days
    again, seconds a batch on a large store. What the deleted spans had added is what is taken
    off (a cost may keep a float's rounding error: readers show none below zero)."""
    from sqlalchemy import delete

    from ._schema import latency, rollups

    if not tally:
        return
    negated = Tally()
    negated.totals = {key: [-figure for figure in sums] for key, sums in tally.totals.items()}
    negated.latency = {key: -calls for key, calls in tally.latency.items()}
    write_rollups(connection, negated)
    hours = [key[2] for key in tally.totals] + [key[1] for key in tally.latency]
    for table in (rollups, latency):
        connection.execute(
            delete(table).where(table.c.hour.between(min(hours), max(hours)), table.c.calls <= 0)
        )


@functools.lru_cache(maxsize=8)
def _upsert_sql(dialect: Any, table: str) -> str:
    """An insert into ``table`` that adds to the row already there, in the driver's positional
    style (for ``executemany`` straight on the driver: see ``positional_sql``)."""
    from ._dialect import insert, positional_sql
    from ._schema import latency, rollups

    target = rollups if table == rollups.name else latency
    keys = [c.name for c in target.primary_key.columns]
    statement = insert(dialect, target)
    statement = statement.on_conflict_do_update(
        index_elements=keys,
        set_={
            c.name: target.c[c.name] + statement.excluded[c.name]
            for c in target.columns
            if c.name not in keys
        },
    )
    sql, order = positional_sql(statement, dialect)
    if order != tuple(c.name for c in target.columns):
        raise RuntimeError(f"the rollups' columns do not match the {table} table")
    return sql


def rebuild_rollups(connection: Any) -> None:
    """Make the rollups again from every span (in the caller's transaction): once, when a store
    made by an older version is upgraded.

    The spans are read once, in the database's order, and counted by :class:`Tally` as the
    writer counts them, so a rebuilt row is the one the writer would have made. (Grouping in
    SQL would need the hours and buckets computed by each database as Python does, and took
    longer: one query per table and grouping, each reading the spans again.)"""
    from sqlalchemy import delete, select

    from ._schema import latency, rollups, spans

    # First: a writer that has not yet added its spans to the rollups waits until they are
    # rebuilt, and then adds them; one that has, committed them with its spans, which are read.
    lock_rollups(connection)
    query = select(*(spans.c[name] for name in ROLLUP_COLUMNS)).where(
        spans.c.status.not_in(NOT_FINAL)
    )
    connection.execute(delete(rollups))
    connection.execute(delete(latency))
    tally = Tally()
    for row in connection.execute(query.execution_options(yield_per=10_000)):
        tally.add(row)
    write_rollups(connection, tally)
