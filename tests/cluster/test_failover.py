"""Failover: the worker process running durable runs is killed (SIGKILL) at the worst moment,
right after a step's answer was journaled; Ray starts the worker again, the runs resume from
the journal, and the caller's handles still return the results. Counted at the server: no
finished step is sent again. A batch item whose worker dies is sent again, up to a limit: one
that kills its worker every time fails, and its batch ends."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections import Counter
from pathlib import Path

import pytest
import ray

import kagura.ray
from kagura import agent, workflow
from kagura.durable import journal_for
from kagura.errors import RunCancelledError, WorkerLostError
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


async def test_a_run_cancelled_while_its_worker_restarts_is_recorded_cancelled() -> None:
    # Cancelled while Ray restarts its worker, the run is dropped before any worker code runs:
    # the caller heard RunCancelledError, but the journal kept the run interrupted, and
    # recovery ran it again, sending its request again.
    with FaultServer.run_in_thread(rules=[("forever", "hang")], hang_seconds=600) as server:
        note = _two_steps(server.base_url)
        run_id = f"cancel-dead-{uuid.uuid4().hex[:8]}"
        handle = kagura.ray.submit(note, "forever", run_id=run_id)
        await asyncio.to_thread(server.wait_for, lambda s: s.request_count >= 1, 120)
        (victim,) = await _pids_of([run_id])
        os.kill(victim, signal.SIGKILL)
        handle.cancel()
        with pytest.raises(RunCancelledError):
            await handle
        assert server.request_count == 1
    record = journal_for().get_run(run_id)
    assert record is not None
    assert (record.status, record.error_type) == ("failed", "RunCancelledError")
    assert record.pid == os.getpid()  # the driver recorded it: no worker ran it again


async def test_cancelling_a_handle_that_waits_for_another_callers_run_leaves_that_run_alone() -> (
    None
):
    # The second handle's task only waits for the first's run. Cancelled, its driver took the
    # run over once the first's worker died, and recorded it cancelled: the first caller got
    # RunFailedError for a run it never cancelled (and, its worker alive, the second waited
    # twice the lease before hearing of its own cancellation).
    with FaultServer.run_in_thread(
        script=["ok", "hang", "ok"], answer="done", hang_seconds=600
    ) as server:
        note = _two_steps(server.base_url)
        run_id = f"shared-{uuid.uuid4().hex[:8]}"
        first = kagura.ray.submit(note, "budget", run_id=run_id)
        await asyncio.to_thread(server.wait_for, lambda s: s.request_count >= 2, 120)
        second = kagura.ray.submit(note, "budget", run_id=run_id)
        second.cancel()
        with pytest.raises(RunCancelledError) as cancelled:
            await second
        assert not getattr(cancelled.value, "__notes__", [])
        (holder,) = await _pids_of([run_id])
        os.kill(holder, signal.SIGKILL)
        assert await first == "done"  # resumed on the restarted worker
        assert _sent(server, "First step", "budget") == 1
    record = journal_for().get_run(run_id)
    assert record is not None
    assert (record.status, record.attempts) == ("completed", 2)


async def test_a_durable_batch_item_whose_worker_died_resumes_its_run() -> None:
    # Sent again under a new run id, the item ran its workflow anew: its journaled first step
    # was sent again, and its first run was left interrupted for recovery to run a second time.
    name = f"durable-note-{uuid.uuid4().hex[:8]}"
    with FaultServer.run_in_thread(
        script=["ok", "hang"], answer="done", hang_seconds=600
    ) as server:

        @agent(model="vllm/test", base_url=server.base_url, retry=False)
        async def draft(topic: str) -> str:
            """First step: draft a note on {{ topic }}"""

        @agent(model="vllm/test", base_url=server.base_url, retry=False)
        async def polish(text: str) -> str:
            """Second step: polish {{ text }}"""

        @workflow(durable=True, name=name)
        async def note(topic: str) -> str:
            return await polish(f"{topic}: {await draft(topic)}")

        batch = asyncio.ensure_future(kagura.ray.map(note, ["budget"], progress=False))
        await asyncio.to_thread(server.wait_for, lambda s: s.request_count >= 2, 120)
        (run,) = journal_for().list_runs(workflow=name)
        assert run.pid is not None and run.pid != os.getpid()
        os.kill(run.pid, signal.SIGKILL)
        partial = await batch
        assert (partial.results, partial.errors) == ({0: "done"}, {})
        assert _sent(server, "First step", "budget") == 1  # journaled: not sent again
        assert _sent(server, "Second step", "budget") == 2
    (record,) = journal_for().list_runs(workflow=name)
    assert (record.run_id, record.status, record.attempts) == (run.run_id, "completed", 2)
    assert record.run_id.startswith("map-") and record.run_id.endswith("-0")


def _sending(marks: Path, deadly: int) -> object:
    """An item function that notes each item it is sent, and kills its own worker process when
    sent ``"fragile"`` the first ``deadly`` times (as a crash in native code would)."""

    def note(word: str) -> int:
        """How many times ``word`` was sent, this time included."""
        with marks.open("a") as sent:
            sent.write(word + "\n")
        return marks.read_text().split().count(word)

    async def note_then_maybe_die(word: str) -> str:
        if note(word) <= deadly and word == "fragile":
            os.kill(os.getpid(), signal.SIGKILL)
        return word.upper()

    return note_then_maybe_die


async def test_a_batch_item_whose_worker_died_is_sent_again(tmp_path: Path) -> None:
    marks = tmp_path / "sent"
    partial = await kagura.ray.map(
        _sending(marks, deadly=1), ["sturdy", "fragile"], concurrency=1, progress=False
    )
    assert (partial.results, partial.errors) == ({0: "STURDY", 1: "FRAGILE"}, {})
    assert Counter(marks.read_text().split()) == Counter({"sturdy": 1, "fragile": 2})


async def test_an_item_that_kills_its_worker_every_time_fails_and_the_batch_ends(
    tmp_path: Path,
) -> None:
    # Ray restarts the workers without limit: sent again each time, the item held its batch
    # for ever.
    marks = tmp_path / "sent"
    partial = await kagura.ray.map(
        _sending(marks, deadly=100), ["before", "fragile", "after"], concurrency=1, progress=False
    )
    assert partial.results == {0: "BEFORE", 2: "AFTER"}
    error = partial.errors[1]
    assert isinstance(error, WorkerLostError), error
    assert (error.item, error.losses) == (1, 3)
    assert "batch item 1 was running on a worker whose process died, 3 times" in str(error)
    assert isinstance(error.__cause__, ray.exceptions.RayActorError)
    assert Counter(marks.read_text().split()) == Counter({"before": 1, "fragile": 3, "after": 1})


async def _work_or_die(word: str) -> str:
    """A batch item: ``"fragile"`` kills its worker a moment after it arrives, every time; the
    others work for a second (the test waits for no time)."""
    if word == "fragile":
        await asyncio.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)
    await asyncio.sleep(1.0)
    return word.upper()


async def test_an_item_that_kills_its_worker_takes_no_other_item_past_its_last_try() -> None:
    # Each item in flight on a dying worker counts the loss: sent again beside the item that
    # kills its worker, healthy items reached their last try with it, and failed with it (8 of
    # these 99, measured).
    words = [f"healthy-{i}" for i in range(100)]
    words[10] = "fragile"
    partial = await kagura.ray.map(_work_or_die, words, progress=False)
    assert partial.results == {i: w.upper() for i, w in enumerate(words) if i != 10}
    (error,) = partial.errors.values()
    assert isinstance(error, WorkerLostError) and error.item == 10
