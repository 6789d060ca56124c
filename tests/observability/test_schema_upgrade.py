"""A store made by an earlier version opens with this one: the columns and indexes added since
are added on open, and recording and durable runs work on it."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import inspect

from kagura import agent, workflow
from kagura.observability import EventStore, Recorder
from kagura.observability import _engine as engines
from kagura.testing import FakeModel, override_model

#: Columns this version added to tables an earlier one made (recording which process wrote a
#: span, and which process a run's pid named).
ADDED = {"kagura_spans": ("host", "pid_start"), "kagura_runs": ("pid_start",)}


@agent
async def draft(topic: str) -> str:
    """Draft {{ topic }}."""


@workflow(durable=True)
async def note(topic: str) -> str:
    return await draft(topic)


async def test_a_store_of_an_earlier_version_is_brought_up_to_date(
    store_url: str, record_to: Callable[..., Recorder]
) -> None:
    url = engines.normalise_url(store_url)
    engine = engines.engine_for(url)
    with engine.begin() as connection:  # the store as the earlier version left it
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
    (run,) = EventStore(store_url).get_executions(kind="workflow")
    assert (run["name"], run["status"]) == ("note", "completed")
