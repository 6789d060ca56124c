"""No span stays ``running`` for ever: the spans a killed process left running are closed as
``interrupted`` once its death is known (its process gone on this host: readers close them
before they query; a durable run taken over: its dead attempt's tree is closed by the claim).
Calls in flight for half a second are on record as running, so they appear as interrupted too.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kagura._storage import INTERRUPTED
from kagura.observability import EventStore, Recorder
from kagura.testing.fault_server import FaultServer

from .conftest import rows, spawn_script

WAIT = 30.0

HANGING = """
import asyncio
from kagura import agent, workflow


@agent(model="openai/test-model", api_key="sk-test", retry=False)
async def ask(topic: str) -> str:
    '''HANG on {{ topic }}'''


@workflow
async def stuck(topic: str) -> str:
    return await ask(topic)


asyncio.run(stuck("tides"))
"""


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer.run_in_thread(rules=[("HANG", "hang")], hang_seconds=WAIT) as running:
        yield running


def wait_for(condition: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


def test_a_killed_process_spans_are_closed_as_interrupted_when_read(
    store_url: str, record_to: Callable[..., Recorder], server: FaultServer
) -> None:
    record_to(store_url)  # this process reads the store (and records nothing)
    child = spawn_script(HANGING, {"KAGURA_DB": store_url, "OPENAI_BASE_URL": server.base_url})
    try:
        # The call hangs at the server; once it has been in flight for a while, its spans (the
        # workflow, the agent call, the LLM attempt) are on record as running.
        wait_for(
            lambda: (
                {(r["kind"], r["status"]) for r in rows(store_url)}
                == {("workflow", "running"), ("agent", "running"), ("llm", "running")}
            ),
            "the three spans to be recorded as running",
        )
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    assert {r["status"] for r in rows(store_url)} == {"running"}  # nobody has looked yet

    store = EventStore(store_url)
    executions = store.get_executions(kind=("workflow", "agent", "llm"))
    assert {(e["kind"], e["status"]) for e in executions} == {
        ("workflow", "interrupted"),
        ("agent", "interrupted"),
        ("llm", "interrupted"),
    }
    for execution in executions:
        assert execution["error"] == INTERRUPTED
        # When its death was noticed; how long it ran is not known.
        assert execution["ended_at"] is not None and execution["duration_ms"] is None
    stored = rows(store_url)
    assert {r["pid"] for r in stored} == {child.pid}
    assert all(r["host"] == os.uname().nodename for r in stored)


def test_spans_of_live_processes_stay_running(
    store_url: str, record_to: Callable[..., Recorder], server: FaultServer
) -> None:
    record_to(store_url)
    child = spawn_script(HANGING, {"KAGURA_DB": store_url, "OPENAI_BASE_URL": server.base_url})
    try:
        wait_for(
            lambda: len([r for r in rows(store_url) if r["status"] == "running"]) == 3,
            "the three spans to be recorded as running",
        )
        store = EventStore(store_url)
        executions = store.get_executions(kind=("workflow", "agent", "llm"))
        assert {e["status"] for e in executions} == {"running"}  # its process is alive
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
