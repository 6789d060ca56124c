"""Several processes on one store: resuming different runs at once, racing for the same run,
and starting a run id that another process is executing.

The workflow (``relay``) calls the fault server, in this process and in the children alike, so
the tests count at the server what reached the provider from every process.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kagura.durable import Journal, _execute
from kagura.testing.fault_server import FaultServer

from . import workflows
from .conftest import Child, await_until, sent


def first(topic: str) -> str:
    return f"ALPHA report on {topic}."


def second(topic: str) -> str:
    return f"BETA report on ALPHA report on {topic}.."


async def interrupted_runs(journal: Journal, gate: Path, *topics: str) -> None:
    """Start a ``relay`` run per topic (run id = topic), each until its first call is
    journaled, then cancel them: they are interrupted, resumable at once."""
    tasks = [
        asyncio.create_task(workflows.relay.run(topic, str(gate), run_id=topic)) for topic in topics
    ]
    await await_until(
        lambda: all("relay/alpha#0" in journal.load_steps(t) for t in topics), "the first calls"
    )
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert {r.run_id for r in journal.list_runs(status="interrupted")} == set(topics)


async def test_processes_resume_different_runs_at_once(
    journal: Journal, server: FaultServer, spawn: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    topics = ("tea", "coffee", "cocoa")
    await interrupted_runs(journal, gate, *topics)
    children: dict[str, Child] = {topic: spawn("resume", topic) for topic in topics}

    def owners() -> dict[str, int | None]:
        found = {topic: journal.get_run(topic) for topic in topics}
        return {
            t: r.pid if r is not None and r.status == "running" else None for t, r in found.items()
        }

    # All three are being executed at the same time, each by the process that resumes it.
    await await_until(
        lambda: owners() == {t: c.pid for t, c in children.items()}, "each process to claim its run"
    )
    gate.touch()
    for topic, child in children.items():
        outcome = await asyncio.to_thread(child.finish)
        assert outcome == {"ok": True, "result": second(topic), "pid": child.pid}, child.stderr
    for topic in topics:
        record = journal.get_run(topic)
        assert record is not None
        assert (record.status, record.attempts, record.pid, record.steps) == (
            "completed",
            2,
            children[topic].pid,
            3,
        )
        assert set(journal.load_steps(topic)) == {"relay/alpha#0", "relay/gate#0", "relay/beta#0"}
    # Every call reached the provider once, from whichever process made it: the first calls,
    # journaled before the interruption, were not sent again by the resuming processes.
    assert sent(server) == Counter(
        {**{first(t): 1 for t in topics}, **{second(t): 1 for t in topics}}
    )


async def test_two_processes_resuming_one_run_one_wins(
    journal: Journal, server: FaultServer, spawn: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    await interrupted_runs(journal, gate, "tea")
    children = [spawn("resume", "tea"), spawn("resume", "tea")]

    # The winner holds the run at the gate; the loser is refused and exits.
    loser = await await_until(
        lambda: next((c for c in children if c.process.poll() is not None), None),
        "one of the two to give up",
    )
    (winner,) = [c for c in children if c is not loser]
    refused = loser.finish()
    assert refused["ok"] is False, refused
    assert refused["error"] == "RunInProgressError"
    assert f"'tea' is being executed by process {winner.pid} on this host" in refused["message"]
    assert winner.process.poll() is None

    gate.touch()
    outcome = await asyncio.to_thread(winner.finish)
    assert outcome == {"ok": True, "result": second("tea"), "pid": winner.pid}
    record = journal.get_run("tea")
    assert record is not None
    assert (record.status, record.attempts, record.pid) == ("completed", 2, winner.pid)
    assert sent(server) == Counter({first("tea"): 1, second("tea"): 1})


async def test_starting_an_id_another_process_runs_waits_for_its_result(
    journal: Journal,
    server: FaultServer,
    spawn: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waiting = asyncio.Event()
    wait_for = _execute._wait_for

    async def spy(*args: Any) -> Any:
        waiting.set()
        return await wait_for(*args)

    monkeypatch.setattr(_execute, "_wait_for", spy)
    gate = tmp_path / "gate"
    child = spawn("run", "relay", "order-42", json.dumps(["tea", str(gate)]))
    await await_until(lambda: "relay/alpha#0" in journal.load_steps("order-42"), "the first call")

    here = asyncio.create_task(workflows.relay.run("tea", str(gate), run_id="order-42"))
    async with asyncio.timeout(10):
        await waiting.wait()  # it found the run busy in the other process
    gate.touch()
    async with asyncio.timeout(30):
        assert await here == second("tea")
    outcome = await asyncio.to_thread(child.finish)
    assert outcome == {"ok": True, "result": second("tea"), "pid": child.pid}
    record = journal.get_run("order-42")
    assert record is not None
    assert (record.status, record.attempts, record.pid) == ("completed", 1, child.pid)
    # This process ran nothing: it took the other one's result.
    assert sent(server) == Counter({first("tea"): 1, second("tea"): 1})
