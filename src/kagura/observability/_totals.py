"""What ``EventStore.stats()`` and ``cost()`` add up: the rollups the writer keeps (see
:func:`kagura._storage.write_rollups`) and the spans they leave out, read as one tally.

Left out of the rollups, and read from the spans: running and interrupted spans (partial indexes
hold only those, so they are a few rows). A query from a moment within an hour reads that
hour's spans on the shorter side of the moment (an index range on start time): in its second
half, those from the moment to the next hour are added to the rollups from that hour; in its
first half, those from the hour's start to the moment are taken off the rollups from the hour
it is in. So at most half an hour of spans is read, where reading on to the next hour read up to
a whole one. Each span is counted once: the rollups never hold a running or interrupted span.
Those two count as calls (by status) but not in the latencies: their ends are not known.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from .._storage import (
    HOUR,
    NOT_FINAL,
    ROLLUP_COLUMNS,
    Tally,
    bucket,
    bucket_range,
    day_hour,
    hour_of,
)

#: Sums of a rollup row: calls, prompt, completion and total tokens, known cost, unpriced calls.
Sums = list[Any]


class Totals:
    """The tally of spans of ``kinds`` that started at or after ``since`` (every span when
    ``None``): agent calls by agent and status (only ``agent``'s, when given), LLM attempts by
    UTC day, model and status (only those made for ``agent``, when given) and workflow runs by
    status; the agent calls' durations by latency bucket are read when asked for
    (:meth:`percentiles`)."""

    def __init__(
        self,
        connection: Any,
        since: float | None,
        agent: str | None,
        kinds: tuple[str, ...] = ("agent", "llm", "workflow"),
    ) -> None:
        self.since = since
        self.agent = agent
        self.kinds = kinds
        #: The first hour whose rollups are read.
        self.first_hour: int | None = None
        if since is not None:
            self.first_hour = hour_of(since)
            if since - self.first_hour * HOUR >= HOUR / 2:
                self.first_hour += 1  # the spans up to it are fewer than those since its start
        #: (kind, day or None, name, status) -> sums; days for LLM attempts only.
        self.rows: dict[tuple[str, int | None, str, str], Sums] = {}
        self._left_out = Tally()  # spans added to the rollups
        self._taken_off = Tally()  # spans in the first hour's rollups that started before since
        self._read_rollups(connection)
        self._read_left_out(connection)

    def _scope(self, kind: str) -> str:
        """The rollups' ``agent`` of the rows of ``kind`` this tally reads."""
        return (self.agent or "") if kind == "llm" else ""

    def _add(self, key: tuple[str, int | None, str, str], sums: Sums) -> None:
        known = self.rows.get(key)
        if known is None:
            self.rows[key] = list(sums)
        else:
            for at, value in enumerate(sums):
                known[at] += value

    def _read_rollups(self, connection: Any) -> None:
        from sqlalchemy import func, literal, select

        from .._storage import rollups

        c = rollups.c
        sums = [
            func.sum(column)
            for column in (
                c.calls,
                c.prompt_tokens,
                c.completion_tokens,
                c.total_tokens,
                c.cost_usd,
                c.unpriced,
            )
        ]
        # Added up by the database, to as few rows as the answer needs: an hour's rows are
        # many (every agent, model and status), the answer's few.
        none, day = literal(None), c.hour // 24
        groups: dict[str, tuple[list[Any], list[Any]]] = {
            "agent": ([none, c.name, c.status], [c.name, c.status]),
            "llm": ([day, c.name, c.status], [day, c.name, c.status]),
            "workflow": ([none, literal(""), c.status], [c.status]),
        }
        for kind in self.kinds:
            columns, group_by = groups[kind]
            query = select(*columns, *sums).where(c.kind == kind, c.agent == self._scope(kind))
            if self.first_hour is not None:
                query = query.where(c.hour >= self.first_hour)
            if kind == "agent" and self.agent is not None:
                query = query.where(c.name == self.agent)
            for day_, name, status, *figures in connection.execute(query.group_by(*group_by)):
                self._add((kind, None if day_ is None else int(day_), name, status), figures)

    def _read_left_out(self, connection: Any) -> None:
        from sqlalchemy import select, text

        from .._storage import spans

        columns = [spans.c[name] for name in ROLLUP_COLUMNS]
        # Nothing but the status in the condition (a literal: SQLite uses a partial index only
        # for a query whose condition is that index's own), else SQLite prefers an index of
        # kinds and reads every span of them; these are few, and filtered here.
        queries = [
            select(*columns).where(text("kagura_spans.status = 'running'")),
            select(*columns).where(text("kagura_spans.status = 'interrupted'")),
        ]
        first, since = self.first_hour, self.since
        if first is not None and since is not None and first * HOUR != since:
            low, high = sorted((since, first * HOUR))
            partial = select(*columns).where(
                spans.c.kind.in_(self.kinds),
                spans.c.started_at >= low,
                spans.c.started_at < high,
                spans.c.status.not_in(NOT_FINAL),
            )
            if first * HOUR > since:
                queries.append(partial)
            else:
                for row in connection.execute(partial):
                    self._taken_off.add(row)
        for query in queries:
            for row in connection.execute(query):
                if since is None or row.started_at >= since:
                    self._left_out.add(row)
        self._merge(self._left_out, 1)
        self._merge(self._taken_off, -1)
        # Every call of such a group started before since. (Below zero: a span finished between
        # the reads of the rollups and of the spans, as a live store's may; the next query
        # counts it.)
        for key in [key for key, sums in self.rows.items() if sums[0] <= 0]:
            del self.rows[key]
        for sums in self.rows.values():
            # A cost with every call of it taken off can leave a float's rounding error behind.
            sums[4] = max(sums[4], 0.0)

    def _merge(self, tally: Tally, sign: int) -> None:
        """Add ``tally``'s rows of the kinds, agent and scope asked for (``sign`` -1: take them
        off)."""
        for (kind, scope, hour, name, status), figures in tally.totals.items():
            if kind not in self.kinds or scope != self._scope(kind):
                continue
            if kind == "agent" and self.agent is not None and name != self.agent:
                continue
            day = hour // 24 if kind == "llm" else None
            sums = figures if sign > 0 else [-figure for figure in figures]
            self._add((kind, day, "" if kind == "workflow" else name, status), sums)

    # -- what the queries read ------------------------------------------------------------

    def by_status(self) -> dict[str, int]:
        """Agent calls by status."""
        counts: dict[str, int] = {}
        for (kind, _, _, status), sums in self.rows.items():
            if kind == "agent":
                counts[status] = counts.get(status, 0) + int(sums[0])
        return counts

    def workflow_runs(self) -> int:
        return sum(int(s[0]) for (kind, *_), s in self.rows.items() if kind == "workflow")

    def costs(self, by: str) -> list[tuple[Any, ...]]:
        """Rows of (key, calls, failures, prompt, completion and total tokens, known cost,
        unpriced calls) of finished calls: agent calls by agent, or LLM attempts by model or
        by UTC day; a key may come more than once (see ``_store._cost_groups``)."""
        kind = "agent" if by == "agent" else "llm"
        days: dict[int, str] = {}
        rows = []
        for (kind_, day, name, status), sums in self.rows.items():
            if kind_ != kind or status == "running":
                continue
            if by == "day":
                assert day is not None
                key = days.get(day)
                if key is None:
                    key = days[day] = datetime.fromtimestamp(day * 86_400, UTC).date().isoformat()
            elif by == "model":
                key = name or "unknown"
            else:
                key = name
            failures = 0 if status == "completed" else sums[0]
            rows.append((key, sums[0], failures, *sums[1:]))
        return rows

    def _latency(self, connection: Any) -> dict[int, int]:
        """Finished agent calls (only ``agent``'s, when given) by latency bucket."""
        from sqlalchemy import func, select

        from .._storage import latency, spans

        scope = self.agent or ""
        query = select(latency.c.bucket, func.sum(latency.c.calls)).where(latency.c.agent == scope)
        first = first_day = self.first_hour
        if first is not None:
            # One agent's counts are kept per day: read from the first whole day, and the spans
            # from the first hour to it read here (the tallies add those before it and the
            # running and interrupted ones, and take off those before since).
            first_day = first if self.agent is None else day_hour(first + 23)
            query = query.where(latency.c.hour >= first_day)
        counts: dict[int, int] = {}
        for number, calls in connection.execute(query.group_by(latency.c.bucket)):
            counts[int(number)] = int(calls)
        for tally, sign in ((self._left_out, 1), (self._taken_off, -1)):
            for (scope_, _, number), calls in tally.latency.items():
                if scope_ == scope:
                    counts[number] = counts.get(number, 0) + sign * calls
        if first is not None and first_day is not None and first_day > first:
            durations = select(spans.c.duration_ms).where(
                spans.c.name == self.agent,
                spans.c.kind == "agent",
                spans.c.started_at >= first * HOUR,
                spans.c.started_at < first_day * HOUR,
                spans.c.status.not_in(NOT_FINAL),
            )
            for (duration,) in connection.execute(durations):
                if duration is not None:
                    number = bucket(duration)
                    counts[number] = counts.get(number, 0) + 1
        return {number: calls for number, calls in counts.items() if calls > 0}

    def percentiles(self, connection: Any) -> dict[str, float | None]:
        """p50, p95 and p99 of the ended agent calls' durations (not the running or interrupted
        ones': their ends are not known), exact (nearest rank: the smallest duration that that
        share of the calls does not exceed). The counts per bucket
        say which bucket each is in and its rank there; one query reads it from the spans in
        that bucket's range, along the (kind, duration, status) index."""
        from sqlalchemy import select

        from .._storage import spans

        out: dict[str, float | None] = {"p50": None, "p95": None, "p99": None}
        counts = self._latency(connection)
        count = sum(counts.values())
        if count == 0:
            return out
        ordered = sorted(counts.items())
        for name, percent in (("p50", 50), ("p95", 95), ("p99", 99)):
            rank = max(0, (percent * count + 99) // 100 - 1)  # 0-based
            number, below = _bucket_of_rank(ordered, rank)
            low, high = bucket_range(number)
            query = select(spans.c.duration_ms).where(
                spans.c.kind == "agent",
                spans.c.status.not_in(NOT_FINAL),
                spans.c.duration_ms.is_not(None),
            )
            if low is not None:
                query = query.where(spans.c.duration_ms >= low)
            if high is not None:
                query = query.where(spans.c.duration_ms < high)
            if self.since is not None:
                query = query.where(spans.c.started_at >= self.since)
            if self.agent is not None:
                query = query.where(spans.c.name == self.agent)
            query = query.order_by(spans.c.duration_ms).limit(1).offset(rank - below)
            out[name] = connection.execute(query).scalar()
        return out


def _bucket_of_rank(counts: list[tuple[int, int]], rank: int) -> tuple[int, int]:
    """The bucket holding the call of 0-based ``rank`` in duration order, and how many calls
    the buckets before it hold; ``counts``: (bucket, calls), in bucket order."""
    below = 0
    for number, calls in counts:
        if rank < below + calls:
            return number, below
        below += calls
    raise AssertionError(f"rank {rank} of {below} calls")
