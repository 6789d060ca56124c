"""Run ids: a run happens once however often it is started; failed and interrupted runs are
resumed from their journal, without calling the provider again for journaled steps."""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from kagura import workflow
from kagura.durable import Journal, _execute
from kagura.durable._journal import MAX_RUN_ID
from kagura.errors import RunFailedError, RunInProgressError, UsageError
from kagura.testing import FakeModel

from . import workflows
from .conftest import await_until, wait_until

EXPECTED = "Review this: Draft a note about tea."


def prompts(model: FakeModel) -> list[str]:
    return [str(r.messages[-1].get("content")) for r in model.requests]


async def cancelled_after_its_draft(journal: Journal, gate: Path, run_id: str) -> None:
    """Run ``gated`` on tea as ``run_id`` until its draft is journaled (it then waits at the
    closed gate), and cancel it there."""
    task = asyncio.create_task(workflows.gated.run("tea", str(gate), run_id=run_id))
    await await_until(lambda: "gated/draft#0" in journal.load_steps(run_id), "the draft")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_run_id_runs_once(journal: Journal, model: FakeModel, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    assert await workflows.gated.run("tea", str(gate), run_id="order-42") == EXPECTED
    assert len(model.requests) == 2
    assert await workflows.gated.run("tea", str(gate), run_id="order-42") == EXPECTED
    assert len(model.requests) == 2  # the second start took the recorded result

    record = journal.get_run("order-42")
    assert record is not None
    assert (record.status, record.attempts, record.steps) == ("completed", 1, 3)
    assert json.loads(record.arguments or "") == {"topic": "tea", "gate": str(gate)}

    with pytest.raises(UsageError, match="belongs to workflow 'gated'"):
        await workflows.checked.run("tea", str(gate), run_id="order-42")


async def test_starting_a_running_id_waits_for_its_result(
    journal: Journal, model: FakeModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    waiting = asyncio.Event()
    wait_for = _execute._wait_for

    async def spy(*args: Any) -> Any:
        waiting.set()
        return await wait_for(*args)

    monkeypatch.setattr(_execute, "_wait_for", spy)
    gate = tmp_path / "gate"
    first = asyncio.create_task(workflows.gated.run("tea", str(gate), run_id="order-42"))
    await await_until(lambda: "gated/draft#0" in journal.load_steps("order-42"), "the draft")
    second = asyncio.create_task(workflows.gated.run("tea", str(gate), run_id="order-42"))
    async with asyncio.timeout(10):
        await waiting.wait()  # the second start found the run busy and waits for it
    gate.touch()
    async with asyncio.timeout(20):
        assert list(await asyncio.gather(first, second)) == [EXPECTED, EXPECTED]
    assert prompts(model) == ["Draft a note about tea.", EXPECTED]  # each step ran once
    record = journal.get_run("order-42")
    assert record is not None and (record.status, record.attempts) == ("completed", 1)


@pytest.mark.parametrize("fails", [False, True], ids=["completes", "fails"])
async def test_a_waiter_that_another_waiter_beats_to_a_stopped_run_waits_on_for_its_result(
    journal: Journal,
    model: FakeModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fails: bool,
) -> None:
    # The process running it stops, and every caller waiting for the run asks for it again:
    # one takes it over, and the others, finding it held again, wait for its result rather
    # than fail with RunInProgressError (or, once it failed, run it again).
    waiting = asyncio.Event()
    wait_for = _execute._wait_for

    async def spy(*args: Any) -> Any:
        waiting.set()
        return await wait_for(*args)

    read = journal.get_run
    taken = threading.Event()
    looked_again = threading.Event()

    def get_run(run_id: str) -> Any:
        record = read(run_id)
        if taken.is_set():
            looked_again.set()
        elif record is not None and record.status == "interrupted":
            # Another waiter takes the run over between this one's look and its own ask.
            assert journal.claim(run_id, "another waiter", allow_failed=False)
            taken.set()
        return record

    monkeypatch.setattr(_execute, "_wait_for", spy)
    monkeypatch.setattr(journal, "get_run", get_run)
    gate = tmp_path / "gate"
    first = asyncio.create_task(workflows.gated.run("tea", str(gate), run_id="order-12"))
    await await_until(lambda: "gated/draft#0" in journal.load_steps("order-12"), "the draft")
    second = asyncio.create_task(workflows.gated.run("tea", str(gate), run_id="order-12"))
    async with asyncio.timeout(10):
        await waiting.wait()
    first.cancel()  # it gives its lease up: the run is interrupted at once
    with pytest.raises(asyncio.CancelledError):
        await first
    await await_until(lambda: looked_again.is_set() or second.done(), "the waiter's next look")
    assert not second.done(), second.exception()
    ended = {"error": OSError("disk full")} if fails else {"result": json.dumps(EXPECTED)}
    await asyncio.to_thread(journal.finish, "order-12", "another waiter", **ended)
    async with asyncio.timeout(10):
        if fails:
            with pytest.raises(RunFailedError, match="disk full"):
                await second
        else:
            assert await second == EXPECTED
    assert prompts(model) == ["Draft a note about tea."]  # the waiter ran none of it


async def test_a_failed_run_id_raises_until_resumed(
    journal: Journal, model: FakeModel, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    with pytest.raises(FileNotFoundError, match="is closed"):
        await workflows.checked.run("tea", str(gate), run_id="order-7")
    assert prompts(model) == ["Draft a note about tea."]

    with pytest.raises(RunFailedError) as failed:
        await workflows.checked.run("tea", str(gate), run_id="order-7")
    assert failed.value.run_id == "order-7"
    assert failed.value.error_type == "FileNotFoundError"
    assert "resume" in str(failed.value)
    assert [r.run_id for r in journal.list_runs(status="failed")] == ["order-7"]

    gate.touch()
    assert await workflows.checked.resume("order-7") == EXPECTED
    # The journaled draft came from the journal; only the review went to the provider.
    assert prompts(model) == ["Draft a note about tea.", EXPECTED]
    assert await workflows.checked.run("tea", str(gate), run_id="order-7") == EXPECTED
    assert await workflows.checked.resume("order-7") == EXPECTED  # completed: just the result
    assert len(model.requests) == 2
    record = journal.get_run("order-7")
    assert record is not None
    assert (record.status, record.attempts, record.error, record.steps) == (
        "completed",
        2,
        None,
        3,
    )


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


async def test_a_run_failing_with_an_exception_whose_str_fails_raises_that_exception(
    journal: Journal,
) -> None:
    # Journaling the failure must not change it: the caller gets the workflow's own exception,
    # and the run is failed with a note for its text.
    @workflow(durable=True)
    async def unprintable(n: int) -> int:
        raise Unprintable()

    with pytest.raises(Unprintable):
        await unprintable.run(1, run_id="unprintable")
    record = journal.get_run("unprintable")
    assert record is not None
    said = "<str() of Unprintable failed: RuntimeError('no text')>"
    assert (record.status, record.error_type, record.error) == ("failed", "Unprintable", said)
    with pytest.raises(RunFailedError, match=re.escape(said)):
        await unprintable.run(1, run_id="unprintable")


async def test_resume_needs_a_known_run_of_that_workflow(journal: Journal, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no durable run 'nope'"):
        await workflows.gated.resume("nope")
    with pytest.raises(FileNotFoundError):
        await workflows.checked.run("tea", str(tmp_path / "gate"), run_id="order-8")
    with pytest.raises(UsageError, match="belongs to workflow 'checked'"):
        await workflows.gated.resume("order-8")


async def test_a_start_of_another_workflow_leaves_an_interrupted_run_as_it_was(
    journal: Journal, model: FakeModel, tmp_path: Path
) -> None:
    """A run id names one workflow's run: starting it as another workflow is refused, and the
    run is not taken over meanwhile. Had it been (held by this live process, its attempt
    counted), its own workflow could not resume it until the lease ran out."""
    gate = tmp_path / "gate"
    await cancelled_after_its_draft(journal, gate, "order-11")
    before = journal.get_run("order-11")
    assert before is not None and (before.status, before.attempts) == ("interrupted", 1)

    with pytest.raises(UsageError, match="belongs to workflow 'gated', not 'checked'"):
        await workflows.checked.run("tea", str(gate), run_id="order-11")
    with pytest.raises(UsageError, match="belongs to workflow 'gated', not 'checked'"):
        await workflows.checked.resume("order-11")
    assert journal.get_run("order-11") == before

    gate.touch()
    assert await workflows.gated.resume("order-11") == EXPECTED
    assert prompts(model) == ["Draft a note about tea.", EXPECTED]


async def test_runs_resumed_at_once_are_claimed_and_loaded_in_one_shared_transaction(
    journal: Journal, model: FakeModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resuming many runs at once, as recovery does, claims them, reads them and loads their
    steps in one transaction of the journal's writer, as starting them does: the callers make
    no trip to the database of their own, one run after another."""
    from sqlalchemy import event

    gate = tmp_path / "gate"
    ids = [f"order-{n}" for n in range(20)]
    failed = await asyncio.gather(
        *(workflows.checked.run("tea", str(gate), run_id=run_id) for run_id in ids),
        return_exceptions=True,
    )
    assert all(isinstance(outcome, FileNotFoundError) for outcome in failed), failed
    gate.touch()

    batches: list[list[str]] = []
    write = Journal._write_batch

    def spy(self: Journal, batch: list[Any]) -> None:
        batches.append([request.kind for request in batch])
        write(self, batch)

    threads: set[str] = set()

    def on_execute(*_: Any) -> None:
        threads.add(threading.current_thread().name)

    monkeypatch.setattr(Journal, "_write_batch", spy)
    event.listen(journal.engine, "before_cursor_execute", on_execute)
    try:
        resumed = await asyncio.gather(
            *(_execute.resume_run(workflows.checked, run_id) for run_id in ids)
        )
    finally:
        event.remove(journal.engine, "before_cursor_execute", on_execute)

    # Each run's draft came from the journal; its check and review ran now.
    assert [(r.result, r.replayed, r.ran) for r in resumed] == [(EXPECTED, 1, 2)] * len(ids)
    assert len(model.requests) == 2 * len(ids)
    assert batches[0] == ["claim"] * len(ids)
    assert sum("claim" in kinds for kinds in batches) == 1
    assert threads == {"kagura-journal"}
    assert {r.status for r in journal.list_runs(limit=None)} == {"completed"}


async def test_a_cancelled_run_is_resumable_at_once(
    journal: Journal, model: FakeModel, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    await cancelled_after_its_draft(journal, gate, "order-9")
    # Cancelled is not failed, and gives the lease up: the run is interrupted at once.
    assert [r.run_id for r in journal.list_runs(status="interrupted")] == ["order-9"]

    gate.touch()
    assert await workflows.gated.resume("order-9") == EXPECTED
    assert prompts(model) == ["Draft a note about tea.", EXPECTED]
    steps = journal.load_steps("order-9")
    assert set(steps) == {"gated/draft#0", "gated/gate#0", "gated/review#0"}


async def cancelled_while_queued(journal: Journal, run: Any, kind: str, times: int = 1) -> None:
    """Start ``run`` (a coroutine that starts or resumes a run) and cancel it while its start
    or claim is queued for the journal's thread and not yet written: the thread is woken only
    once the cancelled caller has done what it does at once (queue a release, before the fix:
    written in the same batch, before the start, it found nothing to release)."""
    woken: list[asyncio.AbstractEventLoop] = []
    queued = asyncio.Event()

    def held(self: Journal, loop: asyncio.AbstractEventLoop) -> None:
        woken.append(loop)
        queued.set()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Journal, "_wake_writer", held)
        task = asyncio.create_task(run)
        await queued.wait()
        assert [getattr(r, "kind", None) for r in journal._queue] == [kind]
        task.cancel()
        for _ in range(3):
            await asyncio.sleep(0)  # the task takes the cancellation
            if times > 1:  # as anyio does: again at every turn until the task has left
                task.cancel()
    journal._wake_writer(woken[0])
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("times", [1, 4])
async def test_a_run_cancelled_while_its_start_is_queued_is_resumable_at_once(
    journal: Journal, model: FakeModel, tmp_path: Path, times: int
) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    run = workflows.gated.run("tea", str(gate), run_id="order-11")
    await cancelled_while_queued(journal, run, "start", times)
    if times > 1:  # cancelled again while it waited: let go all the same, a moment later
        await await_until(lambda: journal.list_runs(status="interrupted"), "the release")
    assert [r.run_id for r in journal.list_runs(status="interrupted")] == ["order-11"]
    assert await workflows.gated.resume("order-11") == EXPECTED


async def test_a_resume_cancelled_while_its_claim_is_queued_leaves_the_run_resumable(
    journal: Journal, model: FakeModel, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    await cancelled_after_its_draft(journal, gate, "order-12")
    resume = workflows.gated.resume("order-12")
    await cancelled_while_queued(journal, resume, "claim")
    assert [r.run_id for r in journal.list_runs(status="interrupted")] == ["order-12"]
    gate.touch()
    assert await workflows.gated.resume("order-12") == EXPECTED


async def test_resuming_a_live_run_is_refused(
    journal: Journal, model: FakeModel, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    task = asyncio.create_task(workflows.gated.run("tea", str(gate), run_id="order-10"))
    await await_until(lambda: "gated/draft#0" in journal.load_steps("order-10"), "the draft")
    with pytest.raises(RunInProgressError) as refused:
        await workflows.gated.resume("order-10")
    message = str(refused.value)
    assert "'order-10' is being executed by process" in message
    assert str(os.getpid()) in message
    assert "lease of 30s" in message
    assert [r.run_id for r in journal.list_runs(status="running")] == ["order-10"]
    assert journal.list_runs(status="interrupted") == []

    gate.touch()
    async with asyncio.timeout(20):
        assert await task == EXPECTED
    assert len(model.requests) == 2


def test_wait_until_is_bounded() -> None:
    with pytest.raises(pytest.fail.Exception, match="timed out"):
        wait_until(lambda: False, "nothing", timeout=0.05)


# -- many runs at once: starts and finishes are committed in groups ------------------------------


async def test_many_runs_started_at_once_each_run_once_and_are_journaled(
    journal: Journal, model: FakeModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transactions: list[int] = []
    write = Journal._write_batch

    def counted(self: Journal, batch: list[Any]) -> None:
        transactions.append(len(batch))
        write(self, batch)

    monkeypatch.setattr(Journal, "_write_batch", counted)
    gate = tmp_path / "gate"
    gate.touch()
    topics = [f"topic {n}" for n in range(40)]
    # The same ids twice over, in one burst: each id's start shares a batch with its repeat.
    async with asyncio.timeout(30):
        results = await asyncio.gather(
            *(
                workflows.gated.run(topic, str(gate), run_id=f"burst-{n}")
                for _ in range(2)
                for n, topic in enumerate(topics)
            )
        )
    expected = [f"Review this: Draft a note about {topic}." for topic in topics]
    assert results == expected * 2
    assert len(model.requests) == 2 * len(topics)  # every run's two agent calls, once
    records = {r.run_id: r for r in journal.list_runs(limit=100)}
    assert set(records) == {f"burst-{n}" for n in range(len(topics))}
    assert {(r.status, r.attempts, r.steps) for r in records.values()} == {("completed", 1, 3)}
    # 80 starts, 120 steps and 40 finishes (and the repeats' waits), in far fewer commits.
    assert sum(transactions) >= 80 + 120 + 40
    assert len(transactions) < 80


async def test_a_start_that_cannot_be_written_raises_instead_of_hanging(
    journal: Journal, model: FakeModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any) -> set[str]:
        raise RuntimeError("the database refused the insert")

    gate = tmp_path / "gate"
    gate.touch()
    with monkeypatch.context() as patched:
        patched.setattr(Journal, "_insert_runs", refuse)
        async with asyncio.timeout(10):
            with pytest.raises(RuntimeError, match="refused the insert"):
                await workflows.gated.run("tea", str(gate), run_id="refused-1")
    assert model.requests == []  # nothing ran without its run on record
    assert await workflows.gated.run("tea", str(gate), run_id="refused-1") == EXPECTED


async def test_a_run_id_as_long_as_a_run_id_may_be_is_journaled_and_recorded(
    db: str, journal: Journal, model: FakeModel, tmp_path: Path
) -> None:
    """The longest run id, its run failed and resumed: the journal keys the run by it, and
    both attempts' workflow spans are recorded under their ids, the run's and the run's with
    ``~2`` after it. On PostgreSQL the spans' ids were 64 characters long, and a batch holding
    a span with a longer one was refused whole."""
    from kagura.observability import EventStore
    from kagura.observability._recorder import default_recorder

    run_id, gate = "r" * MAX_RUN_ID, tmp_path / "gate"
    with pytest.raises(FileNotFoundError):
        await workflows.checked.run("tea", str(gate), run_id=run_id)
    gate.touch()
    assert await workflows.checked.resume(run_id) == EXPECTED
    record = journal.get_run(run_id)
    assert record is not None and (record.status, record.attempts) == ("completed", 2)
    recorder = default_recorder()
    assert recorder is not None and recorder.flush()
    spans = EventStore(db).get_executions(kind="workflow")
    assert sorted((s["id"], s["run_id"], s["status"]) for s in spans) == [
        (run_id, run_id, "failed"),
        (f"{run_id}~2", f"{run_id}~2", "completed"),
    ]
    assert recorder.failed_batches == 0


@pytest.mark.parametrize(
    ("run_id", "said"),
    [
        ("r" * (MAX_RUN_ID + 1), "run_id is 201 characters long; a run id is at most 200"),
        ("", "run_id is empty"),
        (42, "run_id must be a str"),
    ],
)
async def test_a_run_id_the_store_cannot_key_a_run_by_is_refused_before_anything_runs(
    journal: Journal, model: FakeModel, run_id: Any, said: str
) -> None:
    with pytest.raises(UsageError, match=said):
        await workflows.plain.run("tea", run_id=run_id)
    assert model.requests == []
    assert journal.list_runs() == []
