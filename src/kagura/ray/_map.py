"""``map``: one agent or workflow over many items, across the workers of the cluster."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import ray

from .. import _settings
from .._checks import count
from .._tool import awaits_when_called
from .._workflow import Workflow
from ..errors import UsageError, WorkerLostError
from ..parallel import Partial
from ..resilience import (
    CostBudget,
    RetryBudget,
    current_cost_budgets,
    current_retry_budgets,
    registry,
)
from . import _cluster, _shared
from ._worker import parent_here, ship

T = TypeVar("T")
U = TypeVar("U")

#: How many times a batch item may be in flight on a worker whose process dies before it fails
#: with :class:`~kagura.errors.WorkerLostError`. Ray restarts workers without limit, and would
#: send the item again for ever: an item that kills the process it runs in would hold its batch
#: for ever. Which of the items in flight there killed it is not known, so each counts the loss,
#: as Ray's own ``max_task_retries`` and Dask's ``allowed-failures`` count theirs.
WORKER_LOSSES = 3


async def map(
    fn: Callable[[T], Awaitable[U]],
    items: Iterable[T],
    *,
    concurrency: int = 64,
    retry_budget: RetryBudget | None = None,
    cost_budget: CostBudget | None = None,
    progress: bool | None = None,
    description: str = "working",
) -> Partial[int, U]:
    """``await fn(item)`` for every item, across the workers of the cluster, ``concurrency`` at
    a time: a :class:`~kagura.parallel.Partial` whose ``results`` (by input position, in input
    order) hold what succeeded and whose ``errors`` hold each failed item's exception, so that
    one item's error loses none of the others.

    ``fn`` is an agent, a workflow or an async function of one argument, sent to the workers
    once. ``retry_budget`` and ``cost_budget`` hold for the whole batch, whichever workers spend
    them, and so do the budgets around the call (a workflow's, a ``with budget:``); afterwards
    they show what the batch spent. Cancelling the call cancels its items on the workers.
    ``progress=None`` draws a progress bar when stderr is a terminal. An item whose worker's
    process died is sent again, to the next worker; one that was in flight on dying workers three
    times fails with :class:`~kagura.errors.WorkerLostError`, and the batch goes on (its last try
    is made apart from the other items sent again: one that kills its worker every time takes
    none of them with it).
    """
    # Checked before anything is sent: a function that is not async would fail every item on
    # the workers, one by one.
    if not awaits_when_called(fn):
        raise UsageError(
            f"kagura.ray.map needs an agent, a workflow or an async function (async def), got "
            f"{fn!r}" + (", which is not async: define it with `async def`" if callable(fn) else "")
        )
    count(concurrency, "concurrency", at_least=1)
    try:
        each = iter(items)
    except TypeError:
        raise UsageError(
            f"kagura.ray.map takes its items as an iterable (a list, a generator), got "
            f"{items!r} ({type(items).__name__})"
        ) from None
    values = builtins.list(each)
    # Starting the pool waits for the workers to be up: not on the event loop. The batch is in
    # flight from here: a configure() or shutdown() meanwhile is refused.
    pool, done = await asyncio.to_thread(_cluster.busy_pool, f"a batch of {len(values)} items")
    try:
        function = ship(fn)
        # A durable workflow's item runs under a run id of the driver's choosing, the same however
        # many times the item is sent: an item sent again after its worker died resumes its run from
        # the journal, rather than starting another that sends its finished steps again (and
        # leaving the first interrupted for recovery to run a second time).
        batch = f"map-{uuid.uuid4().hex[:12]}" if _durable(fn) else None
        # The driver's model rate limits and named breakers, one object each for the cluster.
        taken = registry()
        shipped_registry = [ray.put(taken)] if taken else None
        # The budgets around the call (a workflow's, a ``with budget:``) hold for its items as for
        # its own calls, with those given here.
        given = [budget for budget in (retry_budget, cost_budget) if budget is not None]
        budgets = tuple(
            dict.fromkeys([*given, *current_retry_budgets(), *current_cost_budgets()], None)
        )
        # What the driver spent on its own since an earlier batch counts for this one.
        await _shared.settle(budgets)
    except BaseException:
        done()
        raise
    parent = parent_here()
    gate = asyncio.Semaphore(concurrency)
    suspects = _Suspects()
    outcomes: builtins.list[tuple[bool, Any]] = [(False, None)] * len(values)
    show = sys.stderr.isatty() if progress is None else progress
    advance: Callable[[], None] = lambda: None  # noqa: E731

    async def one(index: int, item: T) -> None:
        async with gate:
            run_id = None if batch is None else f"{batch}-{index}"
            outcomes[index] = await _sent(
                pool, index, suspects, function, item, run_id, parent, budgets, shipped_registry
            )
        advance()

    async def run_all() -> None:
        async with asyncio.TaskGroup() as group:
            for index, item in enumerate(values):
                group.create_task(one(index, item))

    try:
        if show:
            from rich.progress import Progress

            with Progress(transient=False) as bar:
                task_id = bar.add_task(description, total=len(values))
                advance = lambda: bar.advance(task_id)  # noqa: E731
                await run_all()
        else:
            await run_all()
    finally:
        # And the driver's budget objects show what the batch spent, cancelled (a timeout) or
        # not: the driver's calls after it are checked against that.
        await asyncio.shield(_shared.settle(budgets))
        done()
    # The batch's spans are in the store before the caller looks at its trace.
    await asyncio.gather(*(worker.flush.remote() for worker in pool.workers))
    partial: Partial[int, U] = Partial()
    for index, (ok, value) in enumerate(outcomes):
        if ok:
            partial.results[index] = value
        else:
            partial.errors[index] = value
    return partial


def _durable(fn: Any) -> bool:
    """Does ``fn`` run durably when called (as ``Workflow.__call__`` decides, on the driver's
    settings: the workers take ``KAGURA_DURABLE`` from it)?"""
    if not isinstance(fn, Workflow):
        return False
    return fn.durable if fn.durable is not None else _settings.durable_default()


async def _sent(
    pool: _cluster.Pool, index: int, suspects: _Suspects, *args: Any
) -> tuple[bool, Any]:
    """One item's call on the workers (``args`` as ``Worker.call`` takes them): sent again,
    to the next worker, when its worker's process dies, up to :data:`WORKER_LOSSES` times, the
    sends after a loss under ``suspects``' rules."""
    lost: BaseException | None = None
    for losses in range(WORKER_LOSSES):
        try:
            if losses == 0:
                return await _call(pool, index, args)
            async with suspects.sending(last=losses == WORKER_LOSSES - 1):
                return await _call(pool, index, args)
        except ray.exceptions.RayActorError as error:  # its worker's process died
            lost = error
    failed = WorkerLostError(index, WORKER_LOSSES)
    failed.__cause__ = lost
    return False, failed


async def _call(pool: _cluster.Pool, index: int, args: tuple[Any, ...]) -> tuple[bool, Any]:
    # Not sent again by Ray (the workers' own option, for durable runs, is for ever): by
    # _sent, which counts the losses.
    try:
        call: Any = pool.next().call.options(max_task_retries=0).remote(*args)
    except ray.exceptions.RayError:
        raise
    except Exception as error:  # Ray pickles the task's arguments here: the item did not pickle
        return False, _unsendable(index, args[1], error)
    try:
        outcome: tuple[bool, Any] = await call
    except asyncio.CancelledError:
        ray.cancel(call)  # the item stops where it runs, not only here
        raise
    except ray.exceptions.RayActorError:
        raise
    except ray.exceptions.RayError as error:  # the item's call itself broke
        return False, getattr(error, "cause", None) or error
    return outcome


def _unsendable(index: int, item: Any, error: Exception) -> UsageError:
    """The error of an item that cannot be sent to a worker, in place of Ray's (a TypeError
    whose message of many lines names neither the batch nor the item's position)."""
    why = error.__cause__ if isinstance(error.__cause__, Exception) else error
    failed = UsageError(
        f"batch item {index} ({type(item).__name__}) cannot be sent to a worker: it does not "
        f"pickle ({type(why).__name__}: {why}); pass items that pickle (plain data), and make "
        f"what does not (a lock, a connection, a client) in the function, on the worker"
    )
    failed.__cause__ = error
    return failed


class _Suspects:
    """The items of a batch that lost their worker, sent again. Which of the items in flight on
    a dying worker killed it is not known, so each counts the loss; an item at its last try is
    sent alone among them, so that one that kills its worker every time does not take another
    past its last try (its other sends, and the rest of the batch, go on as before: the items
    of a lost node come back at once)."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._again = 0  # items sent again, not at their last try
        self._last = False  # an item at its last try

    @contextlib.asynccontextmanager
    async def sending(self, *, last: bool) -> AsyncIterator[None]:
        async with self._changed:
            if last:
                await self._changed.wait_for(lambda: not self._last and not self._again)
                self._last = True
            else:
                await self._changed.wait_for(lambda: not self._last)
                self._again += 1
        try:
            yield
        finally:
            async with self._changed:
                if last:
                    self._last = False
                else:
                    self._again -= 1
                self._changed.notify_all()
