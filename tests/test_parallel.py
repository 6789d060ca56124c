"""``kagura.parallel``: gather with a limit, map, and gather_partial with a deadline."""

from __future__ import annotations

import asyncio
import gc
import inspect
from typing import Any

import pytest

from kagura import agent, parallel, workflow
from kagura.errors import ProviderError, UsageError
from kagura.parallel import Partial, gather, gather_partial
from kagura.testing import FakeModel, Reply, capture_events, override_model


async def yield_turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


class Tracker:
    """Counts how many tracked coroutines run at once."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.started: list[int] = []

    async def job(self, value: int, turns: int = 3) -> int:
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.started.append(value)
        try:
            await yield_turns(turns + value % 3)
            return value * 10
        finally:
            self.running -= 1


async def never_finishes(flag: list[str], name: str) -> None:
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        flag.append(name)
        raise


async def assert_no_other_tasks() -> None:
    await yield_turns(5)
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current and not t.done()] == []


@agent
async def ask(q: str) -> str:
    """{{ q }}"""


@pytest.fixture
def fake() -> Any:
    model = FakeModel()
    with override_model(model):
        yield model


# -- gather --------------------------------------------------------------------------------


async def test_gather_returns_results_in_order() -> None:
    tracker = Tracker()
    results = await gather(*(tracker.job(i, turns=10 - i) for i in range(6)))
    assert results == [0, 10, 20, 30, 40, 50]
    assert tracker.peak == 6


async def test_gather_of_nothing() -> None:
    assert await gather() == []


@pytest.mark.parametrize("limit", [1, 2, 3])
async def test_gather_never_runs_more_than_the_limit(limit: int) -> None:
    tracker = Tracker()
    results = await gather(*(tracker.job(i) for i in range(10)), limit=limit)
    assert results == [i * 10 for i in range(10)]
    assert tracker.peak == limit


async def test_gather_limit_must_be_positive() -> None:
    tracker = Tracker()
    with pytest.raises(UsageError):
        await gather(tracker.job(1), limit=0)
    assert tracker.started == []


async def test_the_first_error_cancels_the_siblings_and_is_raised_as_itself() -> None:
    cancelled: list[str] = []
    error = ProviderError("boom", status_code=500)

    async def fails() -> None:
        await yield_turns(2)
        raise error

    with pytest.raises(ProviderError) as caught:
        await gather(never_finishes(cancelled, "a"), fails(), never_finishes(cancelled, "b"))
    assert caught.value is error
    assert not isinstance(caught.value, BaseExceptionGroup)
    assert sorted(cancelled) == ["a", "b"]
    await assert_no_other_tasks()


async def test_an_error_with_a_limit_also_cancels_waiting_work() -> None:
    tracker = Tracker()

    async def fails() -> int:
        raise ValueError("bad item")

    with pytest.raises(ValueError, match="bad item"):
        await gather(fails(), *(tracker.job(i, turns=50) for i in range(5)), limit=2)
    # The work queued behind the limit never started.
    assert len(tracker.started) <= 2
    await assert_no_other_tasks()


async def test_return_exceptions_puts_errors_in_place() -> None:
    async def ok(v: int) -> int:
        await asyncio.sleep(0)
        return v

    async def bad(msg: str) -> int:
        raise KeyError(msg)

    results = await gather(ok(1), bad("x"), ok(3), return_exceptions=True)
    assert results[0] == 1
    assert isinstance(results[1], KeyError)
    assert results[2] == 3


@pytest.mark.parametrize("return_exceptions", [False, True])
async def test_a_task_cancelled_by_its_owner_is_not_a_result_of_none(
    return_exceptions: bool,
) -> None:
    # A task handed in and cancelled elsewhere (a watchdog): as with asyncio.gather, that is its
    # outcome. A None in its place could not be told from a result.
    async def answer() -> str:
        return "one"

    started = asyncio.Event()

    async def waits() -> str:
        started.set()
        await asyncio.Future()
        return "never"

    victim = asyncio.create_task(waits())

    async def watchdog() -> None:
        await started.wait()
        victim.cancel()

    watching = asyncio.create_task(watchdog())
    if return_exceptions:
        results = await gather(answer(), victim, return_exceptions=True)
        assert results[0] == "one"
        assert isinstance(results[1], asyncio.CancelledError)
    else:
        with pytest.raises(asyncio.CancelledError):
            await gather(answer(), victim)
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await watching
    await assert_no_other_tasks()


async def test_a_failed_gather_leaves_its_caller_not_cancelled() -> None:
    async def fails() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError):
        await gather(fails(), never_finishes([], "other"))
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    async with asyncio.timeout(None):  # what reads the count still works as it should
        await asyncio.sleep(0)


async def test_cancelling_gather_cancels_everything() -> None:
    cancelled: list[str] = []
    waiting = never_finishes(cancelled, "b")
    task = asyncio.create_task(gather(never_finishes(cancelled, "a"), waiting, limit=1))
    await yield_turns(5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled == ["a"]  # "b" was waiting for the limit and never started
    # ... and it was closed, so no "coroutine was never awaited" warning follows.
    assert inspect.getcoroutinestate(waiting) == inspect.CORO_CLOSED
    await assert_no_other_tasks()


async def test_work_queued_behind_the_limit_is_closed_when_a_sibling_fails() -> None:
    async def fails() -> None:
        raise ValueError("bad")

    queued = [never_finishes([], str(i)) for i in range(3)]
    with pytest.raises(ValueError):
        await gather(fails(), *queued, limit=1)
    assert all(inspect.getcoroutinestate(c) == inspect.CORO_CLOSED for c in queued)


# -- map -----------------------------------------------------------------------------------


async def test_map_returns_results_in_order_with_a_concurrency_limit() -> None:
    tracker = Tracker()
    results = await parallel.map(tracker.job, range(12), concurrency=3, progress=False)
    assert results == [i * 10 for i in range(12)]
    assert tracker.peak == 3


async def test_map_with_a_progress_bar_off_a_terminal() -> None:
    tracker = Tracker()
    results = await parallel.map(
        tracker.job, [1, 2, 3, 4], concurrency=2, progress=True, description="testing"
    )
    assert results == [10, 20, 30, 40]
    assert tracker.peak == 2


async def test_map_default_progress_is_off_when_not_a_terminal() -> None:
    tracker = Tracker()
    assert await parallel.map(tracker.job, iter([5, 6])) == [50, 60]


async def test_map_raises_the_first_error() -> None:
    async def check(v: int) -> int:
        await asyncio.sleep(0)
        if v == 3:
            raise ValueError(f"bad {v}")
        return v

    with pytest.raises(ValueError, match="bad 3"):
        await parallel.map(check, range(6), concurrency=2, progress=False)
    with pytest.raises(ValueError, match="bad 3"):
        await parallel.map(check, range(6), concurrency=2, progress=True)
    results = await parallel.map(check, range(5), return_exceptions=True, progress=False)
    assert isinstance(results[3], ValueError)
    assert results[:3] == [0, 1, 2]


async def test_map_of_nothing() -> None:
    assert await parallel.map(Tracker().job, [], progress=True) == []


# -- gather_partial ------------------------------------------------------------------------


async def test_gather_partial_collects_results_errors_and_cancelled_keys() -> None:
    cancelled: list[str] = []

    async def answer(v: str) -> str:
        await asyncio.sleep(0)
        return v.upper()

    async def broken() -> str:
        raise ProviderError("down", status_code=503)

    partial = await gather_partial(
        {
            "summary": answer("s"),
            "tags": broken(),
            "title": answer("t"),
            "slow": never_finishes(cancelled, "slow"),
        },
        deadline=0.05,
    )
    assert isinstance(partial, Partial)
    assert partial.results == {"summary": "S", "title": "T"}
    assert list(partial.errors) == ["tags"]
    assert isinstance(partial.errors["tags"], ProviderError)
    assert partial.cancelled == ["slow"]
    assert cancelled == ["slow"]
    assert not partial.complete
    await assert_no_other_tasks()


async def test_gather_partial_without_a_deadline_waits_for_everything() -> None:
    tracker = Tracker()
    partial = await gather_partial([tracker.job(i) for i in range(4)], limit=2)
    assert partial.results == {0: 0, 1: 10, 2: 20, 3: 30}
    assert partial.complete
    assert tracker.peak == 2


async def test_gather_partial_of_nothing() -> None:
    partial = await gather_partial({}, deadline=1)
    assert partial.complete
    assert partial.results == {}


async def test_cancelling_the_caller_of_gather_partial_cancels_everything() -> None:
    cancelled: list[str] = []
    task = asyncio.create_task(
        gather_partial({"a": never_finishes(cancelled, "a"), "b": never_finishes(cancelled, "b")})
    )
    await yield_turns(5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(cancelled) == ["a", "b"]
    await assert_no_other_tasks()


# -- agents inside the helpers -------------------------------------------------------------


async def test_agent_calls_in_the_helpers_join_the_callers_workflow_run(fake: FakeModel) -> None:
    @workflow
    async def pipeline(items: list[str]) -> Any:
        gathered = await gather(ask("g1"), ask("g2"), limit=1)
        mapped = await parallel.map(ask, items, concurrency=2, progress=False)
        partial = await gather_partial({"p": ask("p1")}, deadline=10)
        return gathered, mapped, partial.results

    with capture_events() as events:
        gathered, mapped, partial = await pipeline(["m1", "m2", "m3"])
    assert gathered == ["g1", "g2"]
    assert mapped == ["m1", "m2", "m3"]
    assert partial == {"p": "p1"}
    (run,) = events.spans(kind="workflow")
    agents = events.spans(kind="agent")
    assert len(agents) == 6
    for span in agents:
        assert span.run_id == run.run_id
        assert span.parent_id == run.span_id
    for span in events.spans(kind="llm"):
        assert span.run_id == run.run_id


async def test_a_failing_agent_in_gather_cancels_its_siblings() -> None:
    slow = FakeModel([Reply("late", delay=3600), Reply("late", delay=3600)], name="slow")
    broken = FakeModel([ProviderError("bad request", status_code=400)], name="broken")

    @agent(model=slow)
    async def slow_agent(q: str) -> str:
        """{{ q }}"""

    @agent(model=broken)
    async def broken_agent(q: str) -> str:
        """{{ q }}"""

    with capture_events() as events, pytest.raises(ProviderError) as caught:
        await gather(slow_agent("a"), broken_agent("b"), slow_agent("c"))
    assert caught.value.status_code == 400
    statuses = sorted(s.status for s in events.spans(kind="agent"))
    assert statuses == ["cancelled", "cancelled", "failed"]
    await assert_no_other_tasks()


async def test_a_list_given_to_gather_is_refused_and_its_coroutines_closed() -> None:
    tracker = Tracker()
    jobs = [tracker.job(1), tracker.job(2)]
    with pytest.raises(UsageError, match=r"gather takes awaitables.*gather\(\*awaitables\)"):
        await gather(jobs)  # type: ignore[arg-type]
    assert all(inspect.getcoroutinestate(job) == inspect.CORO_CLOSED for job in jobs)


@pytest.mark.parametrize("limit", [float("nan"), 1.5, "2"])
async def test_a_limit_that_is_not_a_whole_number_is_refused(limit: Any) -> None:
    tracker = Tracker()
    with pytest.raises(UsageError, match="whole number"):
        await gather(tracker.job(1), limit=limit)
    job = tracker.job(2)
    with pytest.raises(UsageError, match="whole number"):
        await gather_partial([job], limit=limit)
    assert inspect.getcoroutinestate(job) == inspect.CORO_CLOSED
    assert tracker.started == []


@pytest.mark.parametrize("deadline", ["5", float("nan")])
async def test_a_deadline_that_is_not_a_number_is_refused(deadline: Any) -> None:
    job = Tracker().job(1)
    with pytest.raises(UsageError, match="deadline"):
        await gather_partial({"a": job}, deadline=deadline)
    assert inspect.getcoroutinestate(job) == inspect.CORO_CLOSED


async def test_a_negative_deadline_is_refused() -> None:
    job = Tracker().job(1)
    with pytest.raises(UsageError, match=r"deadline .* must not be negative, got -1"):
        await gather_partial({"a": job}, deadline=-1)
    assert inspect.getcoroutinestate(job) == inspect.CORO_CLOSED


async def test_gather_partial_refuses_what_is_not_awaitable_as_gather_does() -> None:
    # Refused before anything runs, rather than reported as that part's TypeError.
    tracker = Tracker()
    jobs = [tracker.job(1), tracker.job(2)]
    with pytest.raises(UsageError, match="gather_partial takes awaitables, got 5 for 'b'"):
        await gather_partial({"a": jobs[0], "b": 5, "c": jobs[1]})  # type: ignore[dict-item]
    assert all(inspect.getcoroutinestate(job) == inspect.CORO_CLOSED for job in jobs)
    assert tracker.started == []


async def test_map_closes_the_coroutines_made_when_fn_raises_for_a_later_item() -> None:
    tracker = Tracker()
    made: list[Any] = []

    def start(value: int) -> Any:
        if value == 2:
            raise ValueError("no coroutine for 2")
        made.append(tracker.job(value))
        return made[-1]

    with pytest.raises(ValueError, match="no coroutine for 2"):
        await parallel.map(start, [0, 1, 2, 3], progress=False)
    # Closed, so no "coroutine was never awaited" warning follows.
    assert len(made) == 2
    assert all(inspect.getcoroutinestate(job) == inspect.CORO_CLOSED for job in made)
    assert tracker.started == []


# -- cancellation ----------------------------------------------------------------------------


async def test_gather_partial_cancelled_after_a_part_failed_reads_that_parts_error() -> None:
    # Else asyncio logs "Task exception was never retrieved" once the part's task is collected.
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    failed = asyncio.Event()

    async def fails() -> None:
        try:
            raise ValueError("part")
        finally:
            failed.set()

    try:
        task = asyncio.create_task(gather_partial([fails(), never_finishes([], "slow")]))
        await failed.wait()
        task.cancel()
        # Not awaited itself: the loop's handle that resumes this test would hold it a turn.
        await asyncio.wait([task])
        assert task.cancelled()
        del task
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert [c["message"] for c in reported] == []


def stubborn(started: asyncio.Event, cancelled: asyncio.Event, finished: list[str]) -> Any:
    """A part that takes its time to finish once cancelled: until ``release`` is set."""

    async def part(release: asyncio.Event) -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            await release.wait()
            raise
        finally:
            finished.append("part")

    return part


@pytest.mark.parametrize("helper", ["gather", "gather_partial", "map"])
async def test_a_caller_cancelled_again_while_the_parts_finish_waits_for_them(helper: str) -> None:
    started, cancelled, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
    finished: list[str] = []
    part = stubborn(started, cancelled, finished)
    call = {
        "gather": lambda: gather(part(release)),
        "gather_partial": lambda: gather_partial([part(release)]),
        "map": lambda: parallel.map(part, [release], progress=False),
    }[helper]
    task = asyncio.create_task(call())
    await started.wait()
    task.cancel()
    await cancelled.wait()
    task.cancel()  # the call takes it in its next step, before the part is released
    asyncio.get_running_loop().call_soon(release.set)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished == ["part"]  # none outlives the call
    await assert_no_other_tasks()


async def test_a_cancel_in_the_turn_a_part_fails_stays_counted() -> None:
    # As a task group leaves it: the failure is raised, and whoever cancelled still sees their
    # request in Task.cancelling() (an asyncio.timeout around the call takes it back).
    caller = asyncio.current_task()
    assert caller is not None

    async def fails() -> None:
        await asyncio.sleep(0)
        caller.cancel()  # a supervisor, a timeout, Ctrl-C: in the same turn as the failure
        raise KeyError("part")

    try:
        with pytest.raises(KeyError):
            await gather(fails(), never_finishes([], "other"))
        assert caller.cancelling() == 1
    finally:
        while caller.cancelling():
            caller.uncancel()


class Abort(BaseException):
    """Neither an Exception nor KeyboardInterrupt or SystemExit."""


async def test_a_part_raising_a_base_exception_leaves_the_callers_cancellations_as_they_were() -> (
    None
):
    async def aborts() -> None:
        await asyncio.sleep(0)
        raise Abort

    caller = asyncio.current_task()
    assert caller is not None
    with pytest.raises(Abort):
        await gather(aborts(), never_finishes([], "other"))
    assert caller.cancelling() == 0
