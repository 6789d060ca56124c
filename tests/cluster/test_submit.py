"""kagura.ray.submit and kagura.ray.map on a local cluster: results, errors, cancellation, and
one trace for spans recorded by several processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

import kagura.ray
from kagura import agent, workflow
from kagura.durable import journal_for
from kagura.durable._execute import import_target
from kagura.errors import RunCancelledError, RunError, UsageError
from kagura.observability import EventStore
from kagura.observability._monitor import trace_tree
from kagura.testing.fault_server import FaultServer

pytestmark = pytest.mark.usefixtures("cluster")


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer.run_in_thread(answer="fine") as server:
        yield server


def _agents(base_url: str) -> tuple[object, object]:
    @agent(model="vllm/test", base_url=base_url, retry=False)
    async def summarise(text: str) -> str:
        """Summarise: {{ text }}"""

    @workflow
    async def summary(text: str) -> str:
        first = await summarise(text)
        return f"{first} ({os.getpid()})"

    return summarise, summary


def _prompts(server: FaultServer, word: str) -> int:
    return sum(
        1 for r in server.chat_requests if any(word in str(m.get("content")) for m in r.messages)
    )


async def test_a_submitted_run_returns_its_result_and_is_journaled(server: FaultServer) -> None:
    _, summary = _agents(server.base_url)
    run_id = f"submit-{uuid.uuid4().hex[:8]}"
    handle = kagura.ray.submit(summary, "the quarterly report", run_id=run_id)
    assert handle.run_id == run_id
    result = await handle
    answer, pid = result.rsplit(" (", 1)
    assert answer == "fine"
    assert int(pid.rstrip(")")) != os.getpid()  # it ran on a worker
    record = journal_for().get_run(run_id)
    assert record is not None and record.status == "completed" and record.steps == 1
    assert record.pid != os.getpid()


async def test_the_same_run_id_runs_once(server: FaultServer) -> None:
    _, summary = _agents(server.base_url)
    run_id = f"once-{uuid.uuid4().hex[:8]}"
    first = await kagura.ray.submit(summary, "memo once", run_id=run_id)
    second = await kagura.ray.submit(summary, "memo once", run_id=run_id)
    assert first == second
    assert _prompts(server, "memo once") == 1


async def test_the_workflows_own_error_reaches_the_caller() -> None:
    @workflow
    async def refuses(order: str) -> str:
        raise ValueError(f"order {order} is not ours")

    with pytest.raises(ValueError, match="order 42 is not ours"):
        await kagura.ray.submit(refuses, "42")


async def test_bad_submissions_fail_in_the_caller_before_anything_is_sent() -> None:
    @workflow
    async def takes_a_set(items: set[int]) -> int:
        return len(items)

    with pytest.raises(UsageError, match="JSON-serialisable"):
        kagura.ray.submit(takes_a_set, {1, object()})
    with pytest.raises(UsageError, match="takes_a_set"):
        kagura.ray.submit(takes_a_set, 1, 2)
    with pytest.raises(UsageError, match="runs a @workflow"):
        kagura.ray.submit(len, [1])  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="run_id is empty"):
        kagura.ray.submit(takes_a_set, [1], run_id="")
    with pytest.raises(UsageError, match="at most 200"):
        kagura.ray.submit(takes_a_set, [1], run_id="r" * 201)


async def test_cancel_stops_the_run_where_it_runs_and_records_it_cancelled() -> None:
    with FaultServer.run_in_thread(rules=[("forever", "hang")], hang_seconds=600) as server:
        _, summary = _agents(server.base_url)
        run_id = f"cancel-{uuid.uuid4().hex[:8]}"
        handle = kagura.ray.submit(summary, "wait forever", run_id=run_id)
        await asyncio.to_thread(server.wait_for, lambda s: s.request_count >= 1, 60)
        handle.cancel()
        with pytest.raises(RunCancelledError):
            await handle
        # The worker let go of the request: the server saw its client leave.
        await asyncio.to_thread(server.wait_for, lambda s: s.disconnects >= 1, 60)
    # Recorded before the caller hears of it.
    record = journal_for().get_run(run_id)
    assert record is not None
    assert (record.status, record.error_type) == ("failed", "RunCancelledError")


async def test_map_keeps_input_order_and_each_items_error(
    server: FaultServer, capsys: pytest.CaptureFixture[str]
) -> None:
    async def shout(word: str) -> str:
        if word.startswith("bad"):
            raise ValueError(f"{word} is unwelcome")
        return word.upper()

    words = ["alpha", "bad-1", "gamma", "delta", "bad-2", *[f"w{i}" for i in range(20)]]
    # progress=True: the bar is drawn (to stderr) as items finish, here as in a terminal.
    batch = await kagura.ray.map(shout, words, concurrency=4, progress=True)
    assert list(batch.results) == [i for i, w in enumerate(words) if not w.startswith("bad")]
    assert [batch.results[i] for i in batch.results] == [
        w.upper() for w in words if not w.startswith("bad")
    ]
    assert sorted(batch.errors) == [1, 4]
    drawn = capsys.readouterr()
    assert "working" in drawn.out + drawn.err
    assert isinstance(batch.errors[1], ValueError) and "bad-1" in str(batch.errors[1])
    assert not batch.complete


async def test_map_runs_an_agent_on_every_worker(server: FaultServer) -> None:
    summarise, _ = _agents(server.base_url)
    items = [f"note {i}" for i in range(12)]
    batch = await kagura.ray.map(summarise, items, concurrency=6, progress=False)
    assert batch.complete and list(batch.results.values()) == ["fine"] * 12
    assert _prompts(server, "note ") == 12


async def test_spans_of_every_worker_land_in_one_tree(server: FaultServer) -> None:
    summarise, summary = _agents(server.base_url)

    @workflow
    async def fan_out(count: int) -> list[str]:
        batch = await kagura.ray.map(summarise, [f"part {i}" for i in range(count)], progress=False)
        run = kagura.ray.submit(summary, "the whole")
        return [*batch.results.values(), await run]

    results = await fan_out(6)
    assert len(results) == 7
    store = EventStore()
    root = next(
        e for e in store.get_executions(kind="workflow", limit=50) if e["name"] == "fan_out"
    )
    tree = store.get_execution(root["id"])
    assert tree is not None

    def walk(node: dict[str, object]) -> Iterator[dict[str, object]]:
        yield node
        for child in node["children"]:  # type: ignore[attr-defined]
            yield from walk(child)

    spans = list(walk(tree))
    assert {s["run_id"] for s in spans} == {root["run_id"]}
    agents = [s for s in spans if s["kind"] == "agent"]
    assert len(agents) == 7  # six items and the submitted run's call, all under fan_out
    workers = {s["pid"] for s in agents}
    assert os.getpid() not in workers and len(workers) == 2  # both workers recorded
    assert len([s for s in spans if s["kind"] == "llm"]) == 7
    # `kagura monitor trace` says which process ran what.
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(trace_tree(tree))
    text = console.export_text()
    assert all(f"pid {pid}" in text for pid in workers)


async def test_cancelling_map_stops_its_items_where_they_run() -> None:
    with FaultServer.run_in_thread(rules=[("", "hang")], hang_seconds=600) as server:
        summarise, _ = _agents(server.base_url)
        batch = asyncio.create_task(
            kagura.ray.map(summarise, [f"item {i}" for i in range(3)], progress=False)
        )
        await asyncio.to_thread(server.wait_for, lambda s: s.request_count >= 3, 60)
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch
        # The workers let go of the requests: the server saw each client leave.
        await asyncio.to_thread(server.wait_for, lambda s: s.disconnects >= 3, 60)


async def test_an_items_exception_that_cannot_travel_back_keeps_its_type_and_message() -> None:
    class _HoldsALock(Exception):
        def __init__(self, message: str) -> None:
            super().__init__(message)
            self.lock = threading.Lock()  # does not pickle

    class _NeedsTwo(Exception):
        def __init__(self, first: str, second: str) -> None:
            super().__init__(f"{first} and {second}")  # its args do not make it again

    async def fails(kind: str) -> str:
        if kind == "lock":
            raise _HoldsALock("kept a lock")
        raise _NeedsTwo("one", "two")

    partial = await kagura.ray.map(fails, ["lock", "two"], progress=False)

    lock, two = partial.errors[0], partial.errors[1]
    assert isinstance(lock, RunError) and str(lock) == "_HoldsALock: kept a lock"
    assert isinstance(two, RunError) and str(two) == "_NeedsTwo: one and two"
    assert all(
        any("could not be sent back from its worker" in note for note in error.__notes__)
        for error in (lock, two)
    )


async def test_an_item_that_does_not_pickle_fails_alone() -> None:
    # Ray refuses the task as it is sent, with a TypeError: it left the batch's task group, and
    # the whole batch was lost with it.
    async def double(value: int) -> int:
        return value * 2

    partial = await kagura.ray.map(double, [1, 2, threading.Lock(), 4], progress=False)
    assert partial.results == {0: 2, 1: 4, 3: 8}
    (error,) = partial.errors.values()
    assert isinstance(error, UsageError), error
    assert "batch item 2 (lock) cannot be sent to a worker: it does not pickle" in str(error)
    assert "cannot pickle '_thread.lock' object" in str(error)


async def test_a_runs_exception_that_cannot_travel_back_keeps_its_type_and_message() -> None:
    # It reached the caller as Ray's UnserializableException, its message in terminal colours.
    class _HoldsALock(Exception):
        def __init__(self, message: str) -> None:
            super().__init__(message)
            self.lock = threading.Lock()  # does not pickle

    @workflow
    async def fails(order: str) -> str:
        raise _HoldsALock(f"order {order} kept a lock")

    with pytest.raises(RunError) as raised:
        await kagura.ray.submit(fails, "7")
    assert str(raised.value) == "_HoldsALock: order 7 kept a lock"
    assert any(
        "the run's own exception could not be sent back from its worker" in note
        for note in raised.value.__notes__
    )


_DRIVER_SCRIPT = """
import asyncio
import sys

import ray

import kagura.ray
from kagura import workflow


@workflow
async def hello(name: str) -> str:
    return f"hello {name}"


async def main() -> None:
    print(await kagura.ray.submit(hello, "script", run_id=sys.argv[2]))


if __name__ == "__main__":
    ray.init(address=sys.argv[1], namespace="kagura", log_to_driver=False)
    kagura.ray.configure(workers=1)
    asyncio.run(main())
    kagura.ray.shutdown()
"""


def test_a_run_submitted_by_a_driver_script_is_journaled_where_its_script_is(
    tmp_path: Path,
) -> None:
    # The target was worked out on the worker, where __main__ is Ray's worker program: the run
    # was journaled as .../ray/_private/workers/default_worker.py:hello, which `kagura runs
    # resume` and `recover` cannot load.
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER_SCRIPT, encoding="utf-8")
    run_id = f"script-{uuid.uuid4().hex[:8]}"
    address = ray.get_runtime_context().gcs_address
    done = subprocess.run(
        [sys.executable, str(script), address, run_id],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("hello script")
    record = journal_for().get_run(run_id)
    assert record is not None and record.status == "completed"
    assert record.target == f"{script.resolve()}:hello"
    assert import_target(record.target).name == "hello"


async def test_the_workers_are_not_stopped_under_runs_and_batches_in_flight() -> None:
    # configure() with other settings, and shutdown(), killed the workers under them: their
    # callers got Ray's ActorDiedError, and the runs were left interrupted.
    with FaultServer.run_in_thread(
        rules=[("held", "hang")], answer="fine", hang_seconds=600
    ) as server:
        summarise, summary = _agents(server.base_url)
        run = kagura.ray.submit(summary, "held run")
        batch = asyncio.ensure_future(kagura.ray.map(summarise, ["held item"], progress=False))
        await asyncio.to_thread(server.wait_for, lambda s: s.request_count >= 2, 60)
        for stop in (lambda: kagura.ray.configure(workers=1), kagura.ray.shutdown):
            with pytest.raises(UsageError) as refused:
                stop()
            assert f"run {run.run_id!r}" in str(refused.value)
            assert "a batch of 1 items" in str(refused.value)
            assert "await their handles and batches (or cancel them) first" in str(refused.value)
        run.cancel()
        batch.cancel()
        with pytest.raises(RunCancelledError):
            await run
        with pytest.raises(asyncio.CancelledError):
            await batch
        server.set_rules()
        kagura.ray.configure(workers=1)  # nothing in flight: the workers start anew
        assert (await kagura.ray.submit(summary, "after")).startswith("fine (")


async def test_result_with_a_timeout_raises_the_builtin_timeout_error_naming_the_run() -> None:
    # It raised Ray's GetTimeoutError.
    with FaultServer.run_in_thread(rules=[("forever", "hang")], hang_seconds=600) as server:
        _, summary = _agents(server.base_url)
        handle = kagura.ray.submit(summary, "wait forever")
        await asyncio.to_thread(server.wait_for, lambda s: s.request_count >= 1, 60)
        with pytest.raises(TimeoutError) as timed_out:
            await asyncio.to_thread(handle.result, 0.1)  # the run waits for ever: it times out
        assert type(timed_out.value) is TimeoutError
        assert str(timed_out.value) == (
            f"run {handle.run_id!r} did not finish within 0.1s; it goes on: call result() "
            "again, await the handle, or cancel() it"
        )
        handle.cancel()
        with pytest.raises(RunCancelledError):
            handle.result()
