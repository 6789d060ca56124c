"""Rollups (``kagura._storage._rollups``): ``EventStore.stats()`` and ``cost()`` read the totals
the writer keeps per hour, and answer exactly what reading every span answers.

The reference here reads every span and applies the statistics' definitions directly; stores of
random runs (statuses, prices, models, hours, running and interrupted spans) must agree with it
for every ``since`` and agent filter, on SQLite and on PostgreSQL. Also: rollups rebuilt from the
spans equal those the writer kept; retention and upgrades keep them true.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select

from kagura import Usage
from kagura import _storage as storage
from kagura._context import new_id
from kagura._events import SpanFinished, SpanStarted
from kagura.observability import EventStore, Recorder

from .test_store import Node, at, feed

BASE = at("2024-06-01T00:00:00")
AGENTS = ("triage", "draft", "review")
MODELS = ("prov/small", "prov/large", None)


def _llm(rng: random.Random, start: float, status: str) -> Node:
    model = rng.choice(MODELS)
    cost = None if rng.random() < 0.1 else rng.uniform(0, 0.01)
    usage = Usage(rng.randint(0, 500), rng.randint(0, 200))
    duration = rng.lognormvariate(math.log(800), 1.0)
    return Node("llm", model or "llm", start, duration, status, model, usage, cost)


def _agent(rng: random.Random, start: float) -> Node:
    status = rng.choices(["completed", "failed", "timed_out", "cancelled"], [85, 8, 4, 3])[0]
    attempts = [_llm(rng, start, "failed")] if rng.random() < 0.2 else []
    attempts.append(_llm(rng, start + 1, status))
    if rng.random() < 0.1:
        attempts.append(Node("tool", "lookup", start + 2, 5.0))
    duration = rng.lognormvariate(math.log(1000), 1.2)
    node = Node("agent", rng.choice(AGENTS), start, duration, status, children=attempts)
    node.finished = rng.random() > 0.03  # still running
    return node


def random_runs(recorder: Recorder, seed: int, runs: int = 120) -> None:
    """Workflow runs over three days: agent calls (some retried, some running), LLM attempts
    made by a workflow itself, nested workflows, tools."""
    rng = random.Random(seed)
    for _ in range(runs):
        start = BASE + rng.uniform(0, 3 * 86_400)
        children = [_agent(rng, start + i) for i in range(rng.randint(1, 3))]
        if rng.random() < 0.1:
            children.append(_llm(rng, start, "completed"))  # no agent of its own
        if rng.random() < 0.1:
            children.append(Node("workflow", "inner", start, 10.0, children=[_agent(rng, start)]))
        status = "failed" if any(c.status == "failed" for c in children) else "completed"
        feed(
            recorder,
            Node(
                "workflow",
                rng.choice(["nightly", "adhoc"]),
                start,
                9_000.0,
                status,
                children=children,
            ),
        )
    for _ in range(20):  # agent calls outside any workflow
        feed(recorder, _agent(rng, BASE + rng.uniform(0, 3 * 86_400)))


def interrupt_some(url: str, share: float, seed: int) -> None:
    """Close some runs' running spans as interrupted, as a take-over does."""
    engine = storage.engine_for(url)
    spans = storage.spans
    with engine.begin() as connection:
        run_ids = sorted(
            connection.execute(select(spans.c.run_id).where(spans.c.status == "running"))
            .scalars()
            .unique()
        )
        chosen = random.Random(seed).sample(run_ids, int(len(run_ids) * share))
        storage.close_run_spans(connection, chosen, time.time())


# -- the reference: every span read, the definitions applied --------------------------------------


def all_spans(url: str) -> list[Any]:
    with storage.engine_for(url).connect() as connection:
        return list(connection.execute(select(storage.spans)).all())


def reference(rows: list[Any], since: float | None, agent: str | None) -> dict[str, Any]:
    def after(row: Any) -> bool:
        return since is None or row.started_at >= since

    by_id = {row.span_id: row for row in rows}
    calls = [r for r in rows if r.kind == "agent" and after(r) and agent in (None, r.name)]
    by_status: dict[str, int] = {}
    for r in calls:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    # Calls that ended: a running or interrupted call's end is not known.
    durations = sorted(r.duration_ms for r in calls if r.status not in ("running", "interrupted"))
    latency: dict[str, float | None] = {}
    for name, percent in (("p50", 50), ("p95", 95), ("p99", 99)):
        rank = max(0, (percent * len(durations) + 99) // 100 - 1)
        latency[name] = durations[rank] if durations else None

    def made_for(row: Any) -> bool:
        parent = by_id.get(row.parent_id)
        return agent is None or (
            parent is not None and parent.kind == "agent" and parent.name == agent
        )

    attempts = [r for r in rows if r.kind == "llm" and after(r) and made_for(r)]

    def groups(found: list[Any], key: Callable[[Any], str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for r in found:
            if r.status == "running":
                continue
            g = out.setdefault(key(r), {"calls": 0, "failures": 0, "tokens": 0, "costs": []})
            g["calls"] += 1
            g["failures"] += r.status != "completed"
            g["tokens"] += r.total_tokens
            g["costs"].append(r.cost_usd)
        return out

    def day(row: Any) -> str:
        return datetime.fromtimestamp(row.started_at, UTC).date().isoformat()

    return {
        "executions": len(calls),
        "by_status": by_status,
        "latency_ms": latency,
        "workflow_runs": sum(
            1 for r in rows if r.kind == "workflow" and r.parent_id is None and after(r)
        ),
        "agent": groups(calls, lambda r: r.name),
        "model": groups(attempts, lambda r: r.model or "unknown"),
        "day": groups(attempts, day),
    }


def assert_groups(
    found: list[dict[str, Any]], by: str, expected: dict[str, dict[str, Any]]
) -> None:
    assert {row[by] for row in found} == set(expected)
    for row in found:
        want = expected[row[by]]
        assert (row["calls"], row["failures"], row["total_tokens"]) == (
            want["calls"],
            want["failures"],
            want["tokens"],
        )
        if any(c is None for c in want["costs"]):
            assert row["cost_usd"] is None
        else:
            assert row["cost_usd"] == pytest.approx(sum(want["costs"]))


def assert_agrees(
    store: EventStore, rows: list[Any], since: float | None, agent: str | None
) -> None:
    want = reference(rows, since, agent)
    stats = store.stats(since=since, agent_name=agent)
    assert stats["executions"] == want["executions"]
    assert stats["by_status"] == want["by_status"]
    assert stats["latency_ms"] == want["latency_ms"]
    assert stats["workflow_runs"] == want["workflow_runs"]
    for by in ("agent", "model", "day"):
        assert_groups(stats[f"by_{by}"], by, want[by])
        assert_groups(store.cost(by=by, since=since, agent_name=agent), by, want[by])


SINCES = (
    None,
    BASE,  # a whole hour
    BASE + 86_400 + 1_234.5,  # within an hour
    BASE + 86_400 + 7 * 3_600 + 1_800.0,  # half an hour in
    BASE + 2 * 86_400 + 3_599.999,
    BASE + 10 * 86_400,  # after everything
)
#: Moments with agent calls of their hour on both sides (:func:`busy_hours`): in the first half
#: of a day's first hour and of a later one (a query takes the spans before it off that hour's
#: rollups), in the second half of an hour (it adds the spans after it to the next hours'), and
#: in the first half of an hour after the random runs (every call of agent "early" is before it).
WITHIN_HOURS = (
    BASE + 86_400 + 900.5,
    BASE + 86_400 + 9 * 3_600 + 900.5,
    BASE + 2 * 86_400 + 4 * 3_600 + 2_700.5,
    BASE + 3 * 86_400 + 3_600 + 900.5,
)


def busy_hours(recorder: Recorder, seed: int) -> None:
    """Agent calls on both sides of each of :data:`WITHIN_HOURS`, in its hour, and one of an
    agent "early" before each."""
    rng = random.Random(seed)
    for moment in WITHIN_HOURS:
        for offset in (-600.0, -0.5, 0.5, 600.0):
            feed(recorder, _agent(rng, moment + offset))
        feed(recorder, Node("agent", "early", moment - 300.0, 50.0, "cancelled"))


async def test_statistics_from_rollups_are_what_every_span_says(
    recorder: Recorder, store_url: str
) -> None:
    random_runs(recorder, seed=1)
    busy_hours(recorder, seed=3)
    recorder.flush()
    interrupt_some(storage.normalise_url(store_url), 0.5, seed=2)
    rows = all_spans(storage.normalise_url(store_url))
    statuses = {r.status for r in rows if r.kind == "agent"}
    assert {"completed", "failed", "running", "interrupted"} <= statuses
    store = EventStore(store_url)
    for since in (*SINCES, *WITHIN_HOURS):
        for agent in (None, *AGENTS, "nobody"):
            assert_agrees(store, rows, since, agent)


def rollup_tables(
    url: str, *, rebuilt: bool = False
) -> tuple[dict[tuple[Any, ...], tuple[Any, ...]], dict[Any, int]]:
    """The rollup tables' rows; ``rebuilt``: as :func:`kagura._storage.rebuild_rollups` would
    make them from the spans now (in a transaction rolled back after)."""
    rollups, latency = storage.rollups, storage.latency
    with storage.engine_for(url).connect() as connection:
        if rebuilt:
            storage.rebuild_rollups(connection)
        totals = {
            tuple(row[:5]): tuple(row[5:]) for row in connection.execute(select(rollups)).all()
        }
        counts = {tuple(row[:3]): row[3] for row in connection.execute(select(latency)).all()}
        connection.rollback()
    return totals, counts


def assert_same_rollups(found: Any, expected: Any) -> None:
    (totals, counts), (want_totals, want_counts) = found, expected
    assert counts == want_counts
    assert set(totals) == set(want_totals)
    for key, sums in totals.items():
        assert sums[:4] == want_totals[key][:4], key
        assert sums[4] == pytest.approx(want_totals[key][4]), key
        assert sums[5] == want_totals[key][5], key


async def test_rollups_rebuilt_from_the_spans_are_those_the_writer_kept(
    recorder: Recorder, store_url: str
) -> None:
    random_runs(recorder, seed=3)
    recorder.flush()
    url = storage.normalise_url(store_url)
    kept = rollup_tables(url)
    assert kept[0] and kept[1]
    with storage.engine_for(url).begin() as connection:
        storage.rebuild_rollups(connection)
    assert_same_rollups(rollup_tables(url), kept)


async def test_hours_and_buckets_are_the_same_in_python_and_in_the_database(
    recorder: Recorder, store_url: str
) -> None:
    """A start a hair before a whole hour is in the hour before it, and a duration on a
    bucket's bound in the bucket above, whoever computes it."""
    hour = storage.hour_of(BASE) + 5
    starts = [
        math.nextafter(hour * 3600.0, 0),
        hour * 3600.0,
        math.nextafter(hour * 3600.0, math.inf),
    ]
    durations = [storage.bucket_range(700)[0], math.nextafter(storage.bucket_range(700)[0], 0)]
    url = storage.normalise_url(store_url)
    with storage.engine_for(url).begin() as connection:
        for i, started in enumerate(starts):
            for duration in durations:
                span = f"edge{i}{duration}"
                connection.execute(
                    storage.spans.insert(),
                    {
                        "span_id": span,
                        "run_id": span,
                        "kind": "agent",
                        "name": "edge",
                        "status": "completed",
                        "started_at": started,
                        "duration_ms": duration,
                    },
                )
        storage.rebuild_rollups(connection)
    totals, counts = rollup_tables(url)
    assert {(k[2], v[0]) for k, v in totals.items()} == {(hour - 1, 2), (hour, 4)}
    day = storage.day_hour(hour)
    assert day == storage.day_hour(hour - 1)  # one agent's counts: per day
    assert counts == {
        ("", hour - 1, 700): 1,
        ("", hour - 1, 699): 1,
        ("", hour, 700): 2,
        ("", hour, 699): 2,
        ("edge", day, 700): 3,
        ("edge", day, 699): 3,
    }
    assert [storage.hour_of(s) for s in starts] == [hour - 1, hour, hour]
    assert [storage.bucket(d) for d in durations] == [700, 699]


async def test_an_interrupted_call_that_finishes_after_all_is_counted_once(
    recorder: Recorder, store_url: str
) -> None:
    start_ns = int(BASE * 1e9)
    span_id, run_id = new_id(), new_id()
    recorder.handle(SpanStarted(span_id, None, run_id, "agent", "late", "late", start_ns, {}))
    recorder.flush()
    url = storage.normalise_url(store_url)
    with storage.engine_for(url).begin() as connection:
        storage.close_run_spans(connection, [run_id], time.time())
    store = EventStore(store_url)
    assert store.stats(agent_name="late")["by_status"] == {"interrupted": 1}

    # Its writer delivers its end after its process was taken for dead: that row tells the truth.
    recorder.handle(
        SpanFinished(
            span_id,
            None,
            run_id,
            "agent",
            "late",
            "late",
            start_ns,
            start_ns + 10**9,
            "completed",
            usage=Usage(3, 4),
            cost_usd=0.5,
        )
    )
    recorder.flush()
    stats = store.stats(agent_name="late")
    assert stats["by_status"] == {"completed": 1}
    assert stats["latency_ms"]["p50"] == 1000.0
    (row,) = store.cost(by="agent", agent_name="late")
    assert (row["calls"], row["failures"]) == (1, 0)


async def test_interrupted_calls_count_as_calls_and_stay_out_of_the_latencies(
    recorder: Recorder, store_url: str
) -> None:
    """An interrupted call's end is not known. Its duration was taken as from its start to when
    its death was noticed (a reader's first look, days later maybe), which made p99 depend on
    when someone first looked. It counts as a call, by status, and has no duration: closed now,
    or closed with such a duration by an older version."""
    for i in range(20):
        feed(recorder, Node("agent", "quick", BASE + i, 5.0 + i))
    hung = feed(recorder, Node("agent", "quick", BASE + 30, finished=False))
    recorder.flush()
    url = storage.normalise_url(store_url)
    with storage.engine_for(url).begin() as connection:
        assert storage.close_run_spans(connection, [hung], BASE + 3 * 86_400) == 1
        connection.execute(
            storage.spans.insert(),
            {
                "span_id": "closed-by-an-older-version",
                "run_id": "closed-by-an-older-version",
                "kind": "agent",
                "name": "quick",
                "status": "interrupted",
                "started_at": BASE + 40,
                "ended_at": BASE + 2 * 86_400,
                "duration_ms": (2 * 86_400 - 40) * 1000.0,
            },
        )
    store = EventStore(store_url)
    for since, agent in ((None, None), (BASE, None), (BASE + 0.5, None), (None, "quick")):
        stats = store.stats(since=since, agent_name=agent)
        assert stats["by_status"]["interrupted"] == 2
        ended = [5.0 + i for i in range(20) if since is None or BASE + i >= since]
        assert stats["by_status"]["completed"] == len(ended)
        assert stats["latency_ms"] == {
            name: ended[(percent * len(ended) + 99) // 100 - 1]
            for name, percent in (("p50", 50), ("p95", 95), ("p99", 99))
        }
    interrupted = store.get_executions(status="interrupted")
    assert [e["duration_ms"] for e in interrupted] == [None, None]
    assert all(e["metrics"]["duration_ms"] is None for e in interrupted)


@pytest.mark.parametrize("batch", [1000, 7])
async def test_retention_leaves_rollups_of_what_is_left(
    recorder: Recorder, store_url: str, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention deletes runs in batches, a transaction each (writers wait for one at most),
    reading the oldest left every three batches here, and takes each batch's spans off the
    rollups: after every batch, they are those made again from the spans left."""
    from kagura.observability import _store

    random_runs(recorder, seed=4)
    recorder.flush()
    url = storage.normalise_url(store_url)
    monkeypatch.setattr(_store, "RETENTION_BATCH", batch)
    monkeypatch.setattr(_store, "RETENTION_READ", 3 * batch)  # read again after three batches
    batches: list[int] = []
    delete_runs = EventStore._delete_runs

    def checked(self: EventStore, run_ids: list[str]) -> int:
        assert len(run_ids) <= batch
        deleted = delete_runs(self, run_ids)
        batches.append(len(run_ids))
        assert_same_rollups(rollup_tables(url), rollup_tables(url, rebuilt=True))
        return deleted

    monkeypatch.setattr(EventStore, "_delete_runs", checked)
    store = EventStore(store_url)
    deleted = store.delete_older_than(datetime.fromtimestamp(BASE + 1.5 * 86_400, UTC))
    assert deleted > 0
    assert all(size == batch for size in batches[:-1])  # full batches, but the last
    assert len(batches) > 3 if batch == 7 else len(batches) == 1
    rows = all_spans(url)
    for since in (None, BASE + 2 * 86_400 + 100.0):
        for agent in (None, "draft"):
            assert_agrees(store, rows, since, agent)


async def test_a_store_from_before_rollups_gets_them_on_open(
    recorder: Recorder, store_url: str, record_to: Callable[..., Recorder]
) -> None:
    random_runs(recorder, seed=5)
    recorder.flush()
    recorder.close()
    url = storage.normalise_url(store_url)
    rows = all_spans(url)
    with storage.engine_for(url).begin() as connection:  # the store as version 2 left it
        connection.exec_driver_sql("DROP TABLE kagura_rollups")
        connection.exec_driver_sql("DROP TABLE kagura_latency")
        connection.exec_driver_sql("DROP INDEX ix_kagura_spans_interrupted")
        connection.exec_driver_sql("ALTER TABLE kagura_spans DROP COLUMN agent")
        connection.exec_driver_sql("UPDATE kagura_schema SET version = 2")
    storage.forget(url)

    engine = storage.engine_for(url)  # opening it upgrades it
    with engine.connect() as connection:
        assert storage.stored_version(connection) == storage.SCHEMA_VERSION
        agents = dict(
            connection.execute(
                select(storage.spans.c.span_id, storage.spans.c.agent).where(
                    storage.spans.c.kind == "llm"
                )
            ).all()
        )
    assert agents == {r.span_id: r.agent for r in rows if r.kind == "llm"}  # filled in again
    store = EventStore(store_url)
    for agent in (None, "triage"):
        assert_agrees(store, all_spans(url), BASE + 3_000.0, agent)
