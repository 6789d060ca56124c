"""``EventStore``: what users query after their agents ran, on SQLite and on PostgreSQL.

Runs recorded from real agent calls check the shape of what is stored; hand-made spans fed to the
recorder (with chosen start times, durations, tokens and prices) check the filters, statistics and
retention exactly.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import kagura
from kagura import Usage
from kagura._context import new_id
from kagura._events import SpanEvent, SpanFinished, SpanStarted
from kagura.errors import ProviderError, StoreError, UsageError
from kagura.observability import EventStore, Recorder
from kagura.pricing import register_price, unregister_price
from kagura.providers import ToolCall
from kagura.resilience import no_waits
from kagura.testing import FakeModel, Reply, override_model

from .conftest import rows


class PricedModel(FakeModel):
    """A fake model with a price: 1 USD per prompt token, 2 USD per completion token."""

    provider = "testprice"


class UnpricedModel(FakeModel):
    """A fake model no price list knows."""

    provider = "mystery"


@pytest.fixture
def priced() -> Iterator[PricedModel]:
    register_price("testprice/m1", input_per_mtok=1_000_000, output_per_mtok=2_000_000)
    yield PricedModel(name="m1")
    unregister_price("testprice/m1")


@kagura.agent
async def agent(text: str) -> str:
    """Summarise: {{ text }}"""


@kagura.agent
async def classify(text: str) -> str:
    """Classify: {{ text }}"""


def double(x: int) -> int:
    """Double a number."""
    return 2 * x


@kagura.agent(tools=[double])
async def calculator(question: str) -> str:
    """Answer: {{ question }}"""


# -- the documented snippet ---------------------------------------------------------------------


async def test_the_documented_snippet_sees_the_call_that_just_finished(
    recorder: Recorder, priced: PricedModel
) -> None:
    priced.add(Reply("a summary", usage=Usage(10, 5)))

    @kagura.workflow
    async def pipeline(text: str) -> tuple[str, list[dict[str, Any]]]:
        store = EventStore()
        result = await agent(text)
        executions = store.get_executions(agent_name="agent", limit=1)
        return result, executions

    with override_model(priced):
        result, executions = await pipeline("a long text")
    assert result == "a summary"
    (execution,) = executions
    assert execution["name"] == "agent"
    assert execution["kind"] == "agent"
    assert execution["status"] == "completed"
    assert execution["output"] == "a summary"
    assert execution["inputs"] == {"text": "a long text"}
    assert execution["model"] == "testprice/m1"
    assert execution["metrics"]["total_cost"] == pytest.approx(10 * 1 + 5 * 2)
    assert execution["metrics"] == {
        "total_cost": execution["metrics"]["total_cost"],
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "llm_calls": 1,
        "retries": 0,
        "duration_ms": execution["duration_ms"],
    }
    assert execution["duration_ms"] > 0
    assert execution["started_at"] <= execution["ended_at"]
    assert execution["started_at"].tzinfo is not None


async def test_the_snippet_counts_every_attempt_and_retry(
    recorder: Recorder, priced: PricedModel
) -> None:
    priced.add(
        ProviderError("overloaded", status_code=503),
        ProviderError("overloaded", status_code=503),
        Reply("done", usage=Usage(3, 1)),
    )

    @kagura.workflow
    async def pipeline(text: str) -> dict[str, Any]:
        store = EventStore()
        await agent(text)
        return store.get_executions(agent_name="agent", limit=1)[0]["metrics"]

    with override_model(priced), no_waits():
        metrics = await pipeline("x")
    assert metrics["llm_calls"] == 3
    assert metrics["retries"] == 2
    assert (metrics["prompt_tokens"], metrics["completion_tokens"]) == (3, 1)
    assert metrics["total_cost"] == pytest.approx(5.0)


# -- cost and tokens ----------------------------------------------------------------------------


async def test_unknown_price_is_none_never_zero(recorder: Recorder, store_url: str) -> None:
    @kagura.workflow
    async def mixed(text: str) -> None:
        with override_model(FakeModel()):
            await classify(text)  # a free model: cost 0
        with override_model(UnpricedModel(name="secret-model")):
            await agent(text)  # no known price

    await mixed("x")
    store = EventStore(store_url)
    (free,) = store.get_executions("classify")
    (unpriced,) = store.get_executions("agent")
    (run,) = store.get_executions("mixed")
    assert free["metrics"]["total_cost"] == 0.0
    assert free["metrics"]["total_cost"] is not None
    assert unpriced["metrics"]["total_cost"] is None
    assert unpriced["metrics"]["total_tokens"] > 0
    assert run["metrics"]["total_cost"] is None  # one unknown part makes the total unknown
    assert run["metrics"]["total_tokens"] == (
        free["metrics"]["total_tokens"] + unpriced["metrics"]["total_tokens"]
    )
    by_model = {row["model"]: row for row in store.cost(by="model")}
    assert by_model["mystery/secret-model"]["cost_usd"] is None
    assert by_model["fake/echo"]["cost_usd"] == 0.0
    assert store.stats()["cost_usd"] is None


async def test_tokens_and_cost_add_up_to_the_workflow(
    recorder: Recorder, store_url: str, priced: PricedModel
) -> None:
    priced.add(Reply("one", usage=Usage(7, 2)), Reply("two", usage=Usage(5, 3)))
    priced.add(Reply("three", usage=Usage(1, 1)))

    @kagura.workflow
    async def inner(text: str) -> str:
        return await classify(text)

    @kagura.workflow
    async def outer(text: str) -> list[str]:
        return [await agent(text), await classify(text), await inner(text)]

    with override_model(priced):
        await outer("x")
    store = EventStore(store_url)
    (run,) = store.get_executions("outer")
    assert run["metrics"]["prompt_tokens"] == 7 + 5 + 1
    assert run["metrics"]["completion_tokens"] == 2 + 3 + 1
    assert run["metrics"]["total_tokens"] == 19
    assert run["metrics"]["llm_calls"] == 3
    assert run["metrics"]["total_cost"] == pytest.approx(13 * 1 + 6 * 2)
    (nested,) = store.get_executions("inner")
    assert nested["metrics"]["total_tokens"] == 2
    assert nested["metrics"]["total_cost"] == pytest.approx(3.0)
    assert nested["run_id"] == run["id"]


# -- get_execution: the tree --------------------------------------------------------------------


async def test_get_execution_returns_the_whole_tree(recorder: Recorder, store_url: str) -> None:
    fake = FakeModel(
        [
            "positive",
            Reply(tool_calls=(ToolCall("c1", "double", '{"x": 21}'),)),
            "42",
            "a summary",
        ]
    )

    @kagura.workflow
    async def summarising(text: str) -> str:
        return await agent(text)

    @kagura.workflow
    async def pipeline(text: str) -> list[str]:
        return [await classify(text), await calculator(text), await summarising(text)]

    with override_model(fake):
        assert await pipeline("doc") == ["positive", "42", "a summary"]
    store = EventStore(store_url)
    (run,) = store.get_executions("pipeline")
    tree = store.get_execution(run["id"])
    assert tree is not None
    assert (tree["kind"], tree["name"], tree["parent_id"]) == ("workflow", "pipeline", None)
    assert tree["inputs"] == {"text": "doc"}
    assert tree["output"] == ["positive", "42", "a summary"]
    assert [(c["kind"], c["name"]) for c in tree["children"]] == [
        ("agent", "classify"),
        ("agent", "calculator"),
        ("workflow", "summarising"),
    ]
    classify_node, calc_node, nested = tree["children"]
    assert [c["kind"] for c in classify_node["children"]] == ["llm"]
    assert [(c["kind"], c["name"]) for c in calc_node["children"]] == [
        ("llm", "fake/echo"),
        ("tool", "double"),
        ("llm", "fake/echo"),
    ]
    tool_node = calc_node["children"][1]
    assert tool_node["status"] == "completed"
    assert tool_node["output"] == "42"
    assert tool_node["inputs"] == '{"x": 21}'  # the arguments the model sent
    assert [c["name"] for c in nested["children"]] == ["agent"]
    assert nested["children"][0]["children"][0]["kind"] == "llm"

    def walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield node
        for child in node["children"]:
            yield from walk(child)

    everything = list(walk(tree))
    assert len(everything) == 10
    assert {n["run_id"] for n in everything} == {tree["id"]}
    assert all(n["status"] == "completed" for n in everything)
    assert len(rows(store_url)) == 10  # nothing outside the tree

    # A child's id gives its own subtree.
    subtree = store.get_execution(calc_node["id"])
    assert subtree is not None
    assert subtree["name"] == "calculator"
    assert len(subtree["children"]) == 3
    assert store.get_execution("no-such-id") is None


# -- get_executions: filters --------------------------------------------------------------------


async def test_get_executions_filters_by_name_status_and_kind(
    recorder: Recorder, store_url: str
) -> None:
    fake = FakeModel(["a", ValueError("bad input"), "c"])

    @kagura.workflow
    async def pipeline() -> None:
        await agent("one")
        with pytest.raises(ValueError):
            await agent("two")
        await classify("three")

    with override_model(fake):
        await pipeline()
    store = EventStore(store_url)
    assert {e["name"] for e in store.get_executions()} == {"pipeline", "agent", "classify"}
    assert len(store.get_executions()) == 4  # agents and workflows, not LLM attempts
    assert [e["status"] for e in store.get_executions("agent")] == ["failed", "completed"]
    (failed,) = store.get_executions(status="failed")
    assert failed["name"] == "agent"
    assert failed["error"] == "bad input"
    assert failed["error_type"] == "ValueError"
    assert len(store.get_executions(status=["failed", "completed"])) == 4
    assert len(store.get_executions(kind="llm")) == 3
    assert len(store.get_executions(kind="llm", status="failed")) == 1
    assert [e["kind"] for e in store.get_executions(kind="workflow")] == ["workflow"]
    assert len(store.get_executions(kind=None)) == 7
    assert len(store.get_executions(limit=2)) == 2
    assert store.get_executions("nobody") == []
    assert store.get_executions(status="cancelled") == []


# -- hand-made spans, for exact times, durations and prices ----------------------------------------


@dataclass
class Node:
    kind: str
    name: str
    start: float  # Unix seconds
    duration_ms: float = 1.0
    status: str = "completed"
    model: str | None = None
    usage: Usage | None = None
    cost: float | None = 0.0
    children: list[Node] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    finished: bool = True


def feed(recorder: Recorder, node: Node, parent: tuple[str, str] | None = None) -> str:
    """Send ``node`` and its subtree to the recorder as instrumentation would; its span id."""
    span_id = new_id()
    parent_id, run_id = parent if parent is not None else (None, span_id)
    start_ns = int(node.start * 1_000_000) * 1000
    attrs = {"model": node.model} if node.model else {}
    recorder.handle(
        SpanStarted(span_id, parent_id, run_id, node.kind, node.name, node.name, start_ns, attrs)
    )
    for child in node.children:
        feed(recorder, child, (span_id, run_id))
    for name in node.events:
        recorder.handle(SpanEvent(span_id, run_id, name, start_ns, {"n": 1}))
    if node.finished:
        failed = node.status != "completed"
        recorder.handle(
            SpanFinished(
                span_id,
                parent_id,
                run_id,
                node.kind,
                node.name,
                node.name,
                start_ns,
                start_ns + int(node.duration_ms * 1_000_000),
                node.status,  # type: ignore[arg-type]
                "it broke" if failed else None,
                "RuntimeError" if failed else None,
                node.usage,
                node.cost,
                attrs,
            )
        )
    return span_id


def agent_call(
    name: str,
    start: float,
    *,
    duration_ms: float = 1.0,
    model: str = "prov/model",
    usage: Usage = Usage(1, 1),  # noqa: B008 - frozen
    cost: float | None = 0.0,
    status: str = "completed",
) -> Node:
    llm = Node("llm", model, start, duration_ms, status, model, usage, cost)
    return Node("agent", name, start, duration_ms, status, model, children=[llm])


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


async def test_since_until_and_newest_first(recorder: Recorder, store_url: str) -> None:
    for day in range(1, 6):
        feed(recorder, agent_call("daily", at(f"2024-05-0{day}T12:00:00")))
    store = EventStore(store_url)
    days = [e["started_at"].day for e in store.get_executions("daily")]
    assert days == [5, 4, 3, 2, 1]
    since = datetime(2024, 5, 3, 12, tzinfo=UTC)
    assert [e["started_at"].day for e in store.get_executions(since=since)] == [5, 4, 3]
    assert len(store.get_executions(since=since.timestamp())) == 3  # seconds work too
    assert [e["started_at"].day for e in store.get_executions(until=since)] == [2, 1]
    window = store.get_executions(since=at("2024-05-02T00:00:00"), until=at("2024-05-04T00:00:00"))
    assert [e["started_at"].day for e in window] == [3, 2]
    assert [e["started_at"].day for e in store.get_executions(since=since, limit=1)] == [5]
    first = store.get_executions("daily")[-1]
    assert first["started_at"] == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert (first["ended_at"] - first["started_at"]).total_seconds() == pytest.approx(0.001)
    assert first["duration_ms"] == pytest.approx(1.0)


async def test_stats_counts_failures_and_percentiles(recorder: Recorder, store_url: str) -> None:
    start = at("2024-06-01T00:00:00")
    durations = list(range(1, 101))
    random.Random(7).shuffle(durations)
    for i, ms in enumerate(durations):
        status = "failed" if ms > 90 else "completed"
        feed(recorder, agent_call("timed", start + i, duration_ms=ms, status=status))
    for i in range(5):  # still running: counted, but neither a failure nor a latency
        feed(recorder, Node("agent", "timed", start + 200 + i, finished=False))
    for i in range(3):
        feed(recorder, agent_call("slow", start + 300 + i, duration_ms=10_000))
    slow = agent_call("slow", start, duration_ms=10_000)
    feed(recorder, Node("workflow", "run", start, children=[slow]))

    store = EventStore(store_url)
    stats = store.stats(agent_name="timed")
    assert stats["executions"] == 105
    assert stats["by_status"] == {"completed": 90, "failed": 10, "running": 5}
    assert stats["failure_rate"] == pytest.approx(0.1)
    assert stats["latency_ms"] == {"p50": 50.0, "p95": 95.0, "p99": 99.0}

    overall = store.stats()
    assert overall["executions"] == 105 + 4
    assert overall["failure_rate"] == pytest.approx(10 / 104)
    assert overall["latency_ms"]["p50"] == 52.0  # 104 finished calls: the 52nd smallest
    assert overall["latency_ms"]["p99"] == 10_000.0
    assert overall["workflow_runs"] == 1

    later = store.stats(since=start + 250)
    assert later["executions"] == 3
    assert later["workflow_runs"] == 0

    empty = EventStore(store_url).stats(agent_name="nobody")
    assert empty["executions"] == 0
    assert empty["failure_rate"] == 0.0
    assert empty["latency_ms"] == {"p50": None, "p95": None, "p99": None}


async def test_tokens_and_cost_by_agent_model_and_day(recorder: Recorder, store_url: str) -> None:
    day1, day2 = at("2024-03-01T12:00:00"), at("2024-03-02T23:30:00")  # late: a UTC day
    feed(recorder, agent_call("writer", day1, model="openai/x", usage=Usage(100, 50), cost=0.01))
    feed(recorder, agent_call("reader", day1, model="anth/c", usage=Usage(10, 5), cost=0.002))
    feed(recorder, agent_call("writer", day2, model="openai/x", usage=Usage(200, 100), cost=0.02))
    feed(recorder, agent_call("reader", day2, model="myst/u", usage=Usage(1, 1), cost=None))
    store = EventStore(store_url)

    by_agent = store.cost(by="agent")
    assert [r["agent"] for r in by_agent] == ["writer", "reader"]  # costliest first, unknown last
    writer, reader = by_agent
    assert writer["calls"] == 2
    assert (writer["prompt_tokens"], writer["completion_tokens"]) == (300, 150)
    assert writer["total_tokens"] == 450
    assert writer["cost_usd"] == pytest.approx(0.03)
    assert reader["cost_usd"] is None  # one call had no known price
    assert reader["total_tokens"] == 17

    by_model = store.cost(by="model")
    assert [r["model"] for r in by_model] == ["openai/x", "anth/c", "myst/u"]
    assert [r["calls"] for r in by_model] == [2, 1, 1]
    assert by_model[1]["cost_usd"] == pytest.approx(0.002)
    assert by_model[2]["cost_usd"] is None

    by_day = store.cost(by="day")
    assert [r["day"] for r in by_day] == ["2024-03-01", "2024-03-02"]
    assert by_day[0]["total_tokens"] == 165
    assert by_day[0]["cost_usd"] == pytest.approx(0.012)
    assert by_day[1]["total_tokens"] == 302
    assert by_day[1]["cost_usd"] is None

    assert [r["day"] for r in store.cost(by="day", since=at("2024-03-02T00:00:00"))] == [
        "2024-03-02"
    ]
    with pytest.raises(UsageError, match="by="):
        store.cost(by="week")

    stats = store.stats()
    assert stats["tokens"] == {"prompt": 311, "completion": 156, "total": 467}
    assert stats["cost_usd"] is None
    assert stats["by_agent"] == by_agent
    assert stats["by_model"] == by_model
    assert stats["by_day"] == by_day
    known = store.stats(since=at("2024-03-01T00:00:00"), agent_name="writer")
    assert known["executions"] == 2

    # One agent's share: its calls, and the LLM attempts they made, by model and by day.
    assert [r["agent"] for r in store.cost(by="agent", agent_name="reader")] == ["reader"]
    readers_models = store.cost(by="model", agent_name="reader")
    assert [r["model"] for r in readers_models] == ["anth/c", "myst/u"]
    assert [r["total_tokens"] for r in store.cost(by="day", agent_name="writer")] == [150, 300]
    assert known["by_model"] == store.cost(by="model", agent_name="writer", since=day1 - 1)
    assert known["tokens"] == {"prompt": 300, "completion": 150, "total": 450}


# -- retention ----------------------------------------------------------------------------------


async def test_delete_older_than_removes_whole_old_runs_only(
    recorder: Recorder, store_url: str
) -> None:
    now = datetime.now(tz=UTC).timestamp()
    day = 86_400.0
    # A run that began ten days ago and is still producing children an hour ago: old as a whole.
    old_run = feed(
        recorder,
        Node(
            "workflow",
            "nightly",
            now - 10 * day,
            events=["retry_wait"],
            children=[agent_call("early", now - 10 * day), agent_call("late", now - 3600)],
        ),
    )
    old_solo = feed(recorder, agent_call("solo", now - 8 * day))
    # Started ten days ago, and not over: kept, or the spans that end later would go into a
    # deleted tree.
    running = feed(
        recorder,
        Node(
            "workflow",
            "long",
            now - 10 * day,
            children=[agent_call("step", now - 10 * day)],
            finished=False,
        ),
    )
    recent_run = feed(
        recorder,
        Node("workflow", "fresh", now - 60, events=["fallback"], children=[agent_call("a", now)]),
    )
    recent_solo = feed(recorder, agent_call("solo", now - 2 * day))
    store = EventStore(store_url)
    assert recorder.flush()
    assert len(rows(store_url, "kagura_events")) == 2

    deleted = store.delete_older_than(timedelta(days=7))
    assert deleted == 5 + 2  # the old run's 5 spans, the old solo call's 2
    assert store.get_execution(old_run) is None
    assert store.get_execution(old_solo) is None
    fresh = store.get_execution(recent_run)
    assert fresh is not None
    assert len(fresh["children"]) == 1
    assert [e["name"] for e in fresh["events"]] == ["fallback"]
    assert store.get_execution(recent_solo) is not None
    assert len(rows(store_url)) == 3 + 2 + 3
    assert {r["status"] for r in rows(store_url) if r["run_id"] == running} == {
        "running",
        "completed",
    }
    assert [r["name"] for r in rows(store_url, "kagura_events")] == ["fallback"]

    assert store.delete_older_than(3 * day) == 0  # seconds
    assert store.delete_older_than(datetime.fromtimestamp(now - day, tz=UTC)) == 2
    assert {r["run_id"] for r in rows(store_url)} == {recent_run, running}


# -- async twins --------------------------------------------------------------------------------


async def test_async_twins_inside_a_running_loop(recorder: Recorder, store_url: str) -> None:
    @kagura.workflow
    async def pipeline(text: str) -> list[str]:
        return list(await asyncio.gather(agent(text), classify(text)))

    with override_model(FakeModel()):
        await pipeline("x")
    feed(recorder, agent_call("ancient", at("2001-01-01T00:00:00")))
    store = EventStore(store_url)

    executions = await store.aget_executions("pipeline")
    assert [e["name"] for e in executions] == ["pipeline"]
    assert await store.aget_executions(kind="llm") == store.get_executions(kind="llm")
    tree = await store.aget_execution(executions[0]["id"])
    assert tree is not None
    assert {c["name"] for c in tree["children"]} == {"agent", "classify"}
    assert await store.aget_execution("missing") is None
    assert (await store.astats())["executions"] == 3
    assert await store.acost(by="model") == store.cost(by="model")
    assert await store.afind_ids(tree["id"][:8]) == store.find_ids(tree["id"][:8])
    assert await store.adelete_older_than(timedelta(days=365)) == 2
    assert len(await store.aget_executions()) == 3


@pytest.mark.parametrize(
    "name", ["get_executions", "get_execution", "find_ids", "stats", "cost", "delete_older_than"]
)
def test_each_async_twin_takes_its_methods_parameters(name: str) -> None:
    # Spelt out in each twin, not passed on as **kwargs, for type checkers to see a misspelt one:
    # a parameter added to a method must be added to its twin.
    twin = inspect.signature(getattr(EventStore, f"a{name}"))
    method = inspect.signature(getattr(EventStore, name))
    assert twin.parameters == method.parameters
    assert twin.return_annotation == method.return_annotation


def test_repr_hides_the_password() -> None:
    store = EventStore("postgresql://kagura:hunter2@db.example/events")
    assert "hunter2" not in repr(store)
    assert "db.example" in repr(store)


# -- stores made by earlier versions -------------------------------------------------------------


async def test_a_store_from_an_earlier_version_gets_this_versions_indexes_and_keeps_its_rows(
    recorder: Recorder, store_url: str
) -> None:
    from sqlalchemy import inspect

    from .conftest import _forget_engine

    with override_model(FakeModel()):
        await agent("kept")
    assert recorder.flush()
    # As an earlier version left it: indexes no query uses any more, one it did not have, and
    # no schema version.
    with EventStore(store_url).engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE kagura_schema")
        connection.exec_driver_sql(
            "CREATE INDEX ix_kagura_spans_parent ON kagura_spans (parent_id)"
        )
        connection.exec_driver_sql(
            "CREATE INDEX ix_kagura_spans_kind_duration ON kagura_spans (kind, duration_ms)"
        )
        connection.exec_driver_sql(
            "CREATE INDEX ix_kagura_spans_kind_duration_status "
            "ON kagura_spans (kind, duration_ms, status)"
        )
        connection.exec_driver_sql("DROP INDEX ix_kagura_spans_latency")
    _forget_engine(store_url)  # opened again as by a new process

    store = EventStore(store_url)
    indexes = {i["name"] for i in inspect(store.engine).get_indexes("kagura_spans")}
    retired = {
        "ix_kagura_spans_parent",
        "ix_kagura_spans_kind_duration",
        "ix_kagura_spans_kind_duration_status",
    }
    assert not indexes & retired
    assert {"ix_kagura_spans_run", "ix_kagura_spans_latency"} <= indexes
    assert [e["name"] for e in store.get_executions(kind="agent")] == ["agent"]
    assert store.stats()["by_status"] == {"completed": 1}


@pytest.mark.parametrize(
    ("age", "said"),
    [
        ("30d", "a timedelta, seconds or a datetime"),
        (float("nan"), "must be a number"),
        (timedelta(days=-1), "must not be negative"),
        (-5, "must not be negative"),
    ],
)
def test_retention_refuses_an_age_it_cannot_use(store_url: str, age: Any, said: str) -> None:
    with pytest.raises(UsageError, match=said):
        EventStore(store_url).delete_older_than(age)


def test_a_password_given_as_a_query_parameter_is_hidden_too() -> None:
    store = EventStore("postgresql://kagura@db.example/events?password=hunter2&sslmode=disable")
    assert "hunter2" not in repr(store)
    assert "sslmode=disable" in repr(store)


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("postgresql://kagura:hunter2@127.0.0.1:543x/events", r"ValueError.*\(a store is a SQLite"),
        ("foo://bar", "Kagura stores in SQLite or PostgreSQL, not foo://: give a SQLite"),
        ("notaurl:://", "Kagura stores in SQLite or PostgreSQL, not notaurl:://: give a SQLite"),
    ],
)
def test_a_url_that_names_no_store_is_a_store_error_saying_what_is(url: str, said: str) -> None:
    with pytest.raises(StoreError, match=rf"cannot open: {said}") as caught:
        EventStore(url).stats()
    assert "hunter2" not in str(caught.value)


def test_a_store_given_as_no_path_or_url_is_refused() -> None:
    with pytest.raises(UsageError, match="SQLite file's path or a postgresql:// URL, got 5"):
        EventStore(5)  # type: ignore[arg-type]


async def test_a_value_with_no_utf_8_is_recorded_and_the_rest_of_its_batch_too(
    recorder: Recorder, store_url: str
) -> None:
    # A file name that was not UTF-8, as os.listdir gives it: a lone surrogate. Before, the
    # whole batch it was written in was dropped, every other run's spans with it.
    odd = os.fsdecode(b"report-\xff.txt")

    @kagura.workflow
    async def read(name: str) -> str:
        return await agent(name)

    with override_model(FakeModel()):
        await asyncio.gather(read("a.txt"), read(odd), read("b.txt"))
    assert recorder.flush()
    assert len(rows(store_url)) == 3 * 3
    texts = [r["inputs"] for r in rows(store_url) if r["kind"] == "agent"]
    assert any("report-" in text for text in texts)


@pytest.mark.parametrize("limit", [-1, 2.5, "10"])
def test_a_limit_that_is_not_a_count_is_refused(store_url: str, limit: Any) -> None:
    # SQLite reads LIMIT -1 as no limit, and the newest-first merge then cut the oldest row off.
    with pytest.raises(UsageError, match="limit must be"):
        EventStore(store_url).get_executions(limit=limit)
    from kagura.durable import journal_for

    with pytest.raises(UsageError, match="limit must be"):
        journal_for(store_url).list_runs(limit=limit)
