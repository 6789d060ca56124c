"""Failover: the worker process running durable runs is killed (SIGKILL) at the worst moment,
right after a step's answer was journaled; Ray starts the worker again, the runs resume from
the journal, and the caller's handles still return the results. Counted at the server: no
finished step is sent again."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid

import pytest

import kagura.ray
from kagura import agent, workflow
from kagura.durable import journal_for
from kagura.testing.fault_server import FaultServer

pytestmark = pytest.mark.usefixtures("cluster")


def _two_steps(base_url: str) -> object:
    @agent(model="vllm/test", base_url=base_url, retry=False)
    async def draft(topic: str) -> str:
        """First step: draft a note on {{ topic }}"""

    @agent(model="vllm/test", base_url=base_url, retry=False)
    async def polish(text: str) -> str:
        """Second step: polish {{ text }}"""

    @workflow
    async def note(topic: str) -> str:
        return await polish(f"{topic}: {await draft(topic)}")

    return note


def _sent(server: FaultServer, step: str, topic: str) -> int:
    """How many requests of ``step`` for ``topic`` reached the server."""
    return sum(
        1
        for request in server.chat_requests
        if any(
            step in str(m.get("content")) and topic in str(m.get("content"))
            for m in request.messages
        )
    )


async def _pids_of(run_ids: list[str]) -> set[int]:
    journal = journal_for()
    records = [await asyncio.to_thread(journal.get_run, run_id) for run_id in run_ids]
    return {record.pid for record in records if record is not None and record.pid}


async def test_a_run_resumes_on_a_new_worker_without_sending_a_finished_step_again() -> None:
    # The second step's first request hangs: the worker is killed while it waits, after the
    # first step's answer came back and was journaled (it is sent only once that is committed).
    with FaultServer.run_in_thread(
        script=["ok", "hang"], answer="done", hang_seconds=600
    ) as server:
        note = _two_steps(server.base_url)
        run_id = f"failover-{uuid.uuid4().hex[:8]}"
        handle = kagura.ray.submit(note, "budget", run_id=run_id)
        await asyncio.to_thread(server.wait_for, lambda s: s.request_count >= 2, 120)
        (victim,) = await _pids_of([run_id])
        assert victim != os.getpid()
        os.kill(victim, signal.SIGKILL)
        assert await handle == "done"
        assert _sent(server, "First step", "budget") == 1  # journaled: not sent again
        assert _sent(server, "Second step", "budget") == 2  # it had no answer: sent again
    record = journal_for().get_run(run_id)
    assert record is not None and record.status == "completed"
    assert record.attempts == 2 and record.pid not in (victim, os.getpid())


async def test_killing_every_worker_mid_burst_loses_no_run_and_repeats_no_finished_step() -> None:
    topics = [f"topic-{i}" for i in range(8)]
    with FaultServer.run_in_thread(
        rules=[("Second step", "hang")], answer="done", hang_seconds=600
    ) as server:
        note = _two_steps(server.base_url)
        handles = [kagura.ray.submit(note, topic) for topic in topics]
        # Every run is in its second step: its first is journaled, its second hangs.
        await asyncio.to_thread(
            server.wait_for,
            lambda s: all(_sent(s, "Second step", topic) == 1 for topic in topics),
            120,
        )
        victims = await _pids_of([handle.run_id for handle in handles])
        assert len(victims) == 2  # both workers had runs in flight
        server.set_rules()  # from now on the second step is answered
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        assert await asyncio.gather(*handles) == ["done"] * len(topics)
        for topic in topics:
            assert _sent(server, "First step", topic) == 1, topic
            assert _sent(server, "Second step", topic) == 2, topic
    assert not victims & await _pids_of([handle.run_id for handle in handles])
