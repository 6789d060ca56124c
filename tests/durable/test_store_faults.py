"""A durable run on a store that cannot be opened or written raises a
:class:`~kagura.errors.StoreError` naming the store (its path, or its URL without the password)
and the cause, never a raw database error: when it starts, and when a step cannot be journaled
mid-run (the step's result then never reaches the workflow).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kagura import agent, workflow
from kagura._storage import engine_for, normalise_url
from kagura.errors import StoreError
from kagura.testing import FakeModel, override_model
from tests.observability.test_store_faults import (
    ON_POSTGRES,
    PASSWORD,
    Role,
    Unopenable,
    pg_role,
    unopenable,
)

__all__ = ["pg_role", "unopenable"]  # fixtures, used by name

SEEN: list[str] = []


@agent(model="fake/echo")
async def draft(topic: str) -> str:
    """Draft {{ topic }}."""


@workflow(durable=True)
async def jot(topic: str) -> str:
    text = await draft(topic)
    SEEN.append(text)
    return text


async def test_a_durable_run_on_a_store_that_cannot_be_opened_names_it_and_the_cause(
    unopenable: Unopenable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAGURA_DB", unopenable.url)
    monkeypatch.setenv("KAGURA_RECORD", "0")
    SEEN.clear()
    with override_model(FakeModel()) as model, pytest.raises(StoreError) as raised:
        await jot.run("tides", run_id="jot-1")
    message = str(raised.value)
    assert message.startswith(f"event store {unopenable.name}: cannot ")
    assert unopenable.cause in message
    assert PASSWORD not in message
    assert model.requests == [] and SEEN == []  # nothing ran without its run on record


@ON_POSTGRES
async def test_a_step_that_cannot_be_journaled_never_reaches_the_workflow(
    store_url: str, pg_role: Callable[[str], Role], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine_for(normalise_url(store_url))  # the schema, made by its owner
    role = pg_role(
        "GRANT SELECT, INSERT, UPDATE ON kagura_runs TO {role}; "
        "GRANT SELECT ON kagura_steps, kagura_spans, kagura_events, kagura_schema TO {role}"
    )
    monkeypatch.setenv("KAGURA_DB", role.url)
    monkeypatch.setenv("KAGURA_RECORD", "0")
    SEEN.clear()
    with override_model(FakeModel()) as model, pytest.raises(StoreError) as raised:
        await jot.run("tides", run_id="jot-2")
    message = str(raised.value)
    assert message.startswith(f"event store {role.url.replace(PASSWORD, '***')}: cannot ")
    assert "permission denied for table kagura_steps" in message
    assert len(model.requests) == 1 and SEEN == []  # the answer came, and was not seen
