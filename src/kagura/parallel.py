"""Running many agent calls at once, on top of ``asyncio.TaskGroup``.

- :func:`gather`: like ``asyncio.gather`` with a concurrency limit; on the first error the
  siblings are cancelled (and awaited) and that error is raised, unless ``return_exceptions``.
- :func:`map`: one async function over many items, with a concurrency limit and a progress bar when
  run in a terminal.
- :func:`gather_partial`: what finished by a deadline, plus the errors and what was cancelled:
  graceful degradation without losing the parts that worked.

Every task started here runs in a copy of the caller's context, so agent calls join the caller's
workflow run, and none outlives the call: cancelling the caller cancels them all.
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import sys
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, overload

from ._checks import count, real
from .errors import UsageError

T = TypeVar("T")
K = TypeVar("K")
U = TypeVar("U")

__all__ = ["Partial", "gather", "gather_partial", "map"]


def _check_limit(limit: int | None) -> asyncio.Semaphore | None:
    if limit is None:
        return None
    return asyncio.Semaphore(count(limit, "the concurrency limit", at_least=1))


async def _limited(aw: Awaitable[T], semaphore: asyncio.Semaphore | None) -> T:
    if semaphore is None:
        return await aw
    try:
        await semaphore.acquire()
    except BaseException:
        # Cancelled while waiting for a slot: the awaitable never started; close it quietly.
        _close_unstarted((aw,))
        raise
    try:
        return await aw
    finally:
        semaphore.release()


def _close_unstarted(aws: Iterable[Awaitable[Any]]) -> None:
    # Coroutines that never became tasks would warn "never awaited"; close them quietly.
    for aw in aws:
        close = getattr(aw, "close", None)
        if asyncio.iscoroutine(aw) and close is not None:
            close()


@overload
async def gather(
    *aws: Awaitable[T], limit: int | None = None, return_exceptions: Literal[False] = False
) -> list[T]: ...
@overload
async def gather(
    *aws: Awaitable[T], limit: int | None = None, return_exceptions: bool
) -> list[T | BaseException]: ...
async def gather(
    *aws: Awaitable[Any], limit: int | None = None, return_exceptions: bool = False
) -> list[Any]:
    """Await all of ``aws`` concurrently (at most ``limit`` at a time), results in order.

    Without ``return_exceptions`` the first failure cancels the others and is raised as itself
    (not as an ``ExceptionGroup``); with it, exceptions take their place in the results.
    """
    try:
        semaphore = _check_limit(limit)
        for aw in aws:
            if not inspect.isawaitable(aw):
                hint = ": unpack it, gather(*awaitables)" if isinstance(aw, list | tuple) else ""
                raise UsageError(f"gather takes awaitables, got {aw!r}{hint}")
    except UsageError:
        _close_unstarted(aws)
        for aw in aws:
            if isinstance(aw, list | tuple):
                _close_unstarted(aw)
        raise
    results: list[Any] = [None] * len(aws)
    failures: list[BaseException] = []
    tasks: list[asyncio.Task[None]] = []

    def failed(index: int, error: BaseException) -> None:
        if return_exceptions:
            results[index] = error
            return
        failures.append(error)
        if len(failures) == 1:
            # Stopped here rather than by the task group, which would do it by cancelling this
            # gather's caller and then taking that back (not always: CPython gh-116720),
            # leaving the caller's count of cancellations (Task.cancelling(), read by task
            # groups, timeouts and anyio) wrong when someone else cancelled it meanwhile. After
            # this turn, as the task group does: a sibling made in it has begun by then.
            asyncio.get_running_loop().call_soon(stop)

    def stop() -> None:
        for task in tasks:
            task.cancel()

    async def run(index: int, aw: Awaitable[Any]) -> None:
        try:
            results[index] = await _limited(aw, semaphore)
        except asyncio.CancelledError as error:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # this gather is being cancelled: by its caller, or a sibling's failure
            # The awaitable was cancelled by someone else (a task handed in, cancelled by its
            # owner): that is its outcome, as with asyncio.gather, not a result of None.
            failed(index, error)
        except Exception as error:
            failed(index, error)

    caller = asyncio.current_task()
    cancelling = 0 if caller is None else caller.cancelling()
    try:
        async with asyncio.TaskGroup() as group:
            for index, aw in enumerate(aws):
                tasks.append(group.create_task(run(index, aw)))
    except asyncio.CancelledError:
        if not failures:
            raise
        # The caller was cancelled too, after a part failed or in the same turn: the failure
        # is raised, as a task group raises its errors rather than the cancellation, and the
        # cancellation stays counted (Task.cancelling()) for whoever asked for it.
    except BaseExceptionGroup as group_error:
        # A part raised what is not an Exception (not KeyboardInterrupt or SystemExit, which
        # the group raises as themselves). The group cancelled this gather's caller to stop
        # the block, which Python 3.11 does not take back when the block had already ended
        # (CPython gh-116720): else the caller stays marked as being cancelled for whatever
        # asks (Task.cancelling(): task groups, timeouts, anyio, the next gather).
        while caller is not None and caller.cancelling() > cancelling:
            caller.uncancel()
        raise _first(group_error.exceptions) from None
    if failures:
        raise _first(failures)
    return results


def _first(errors: Sequence[BaseException]) -> BaseException:
    first = errors[0]
    if isinstance(first, BaseExceptionGroup):
        return _first(first.exceptions)
    if len(errors) > 1:
        first.add_note(f"kagura: {len(errors) - 1} other task(s) failed at the same time")
    return first


@overload
async def map(
    fn: Callable[[T], Awaitable[U]],
    items: Iterable[T],
    *,
    concurrency: int = 8,
    return_exceptions: Literal[False] = False,
    progress: bool | None = None,
    description: str = "working",
) -> list[U]: ...
@overload
async def map(
    fn: Callable[[T], Awaitable[U]],
    items: Iterable[T],
    *,
    concurrency: int = 8,
    return_exceptions: bool,
    progress: bool | None = None,
    description: str = "working",
) -> list[U | BaseException]: ...
async def map(
    fn: Callable[[T], Awaitable[U]],
    items: Iterable[T],
    *,
    concurrency: int = 8,
    return_exceptions: bool = False,
    progress: bool | None = None,
    description: str = "working",
) -> list[Any]:
    """``[await fn(item) for item in items]``, ``concurrency`` at a time, results in order.

    ``progress=None`` shows a rich progress bar when stderr is a terminal; ``True``/``False``
    force it on or off.
    """
    values = builtins.list(items)
    show = sys.stderr.isatty() if progress is None else progress
    if not show:
        started: builtins.list[Awaitable[U]] = []
        try:
            for value in values:
                started.append(fn(value))
        except BaseException:
            # fn raised for one item before any ran: the coroutines made for the items before
            # it would be left to warn "never awaited".
            _close_unstarted(started)
            raise
        return await gather(*started, limit=concurrency, return_exceptions=return_exceptions)
    from rich.progress import Progress

    with Progress(transient=False) as bar:
        task_id = bar.add_task(description, total=len(values))

        async def tracked(value: T) -> U:
            try:
                return await fn(value)
            finally:
                bar.advance(task_id)

        return await gather(
            *(tracked(v) for v in values), limit=concurrency, return_exceptions=return_exceptions
        )


@dataclass
class Partial(Generic[K, T]):
    """What :func:`gather_partial` got: results by key, errors by key, and the keys cancelled
    because the deadline came first."""

    results: dict[K, T] = field(default_factory=dict)
    errors: dict[K, Exception] = field(default_factory=dict)
    cancelled: builtins.list[K] = field(default_factory=builtins.list)

    @property
    def complete(self) -> bool:
        return not self.errors and not self.cancelled


@overload
async def gather_partial(  # type: ignore[overload-overlap]  # a mapping of awaitable keys: rare
    aws: Mapping[K, Awaitable[T]], *, deadline: float | None = None, limit: int | None = None
) -> Partial[K, T]: ...
@overload
async def gather_partial(
    aws: Iterable[Awaitable[T]], *, deadline: float | None = None, limit: int | None = None
) -> Partial[int, T]: ...
async def gather_partial(
    aws: Mapping[Any, Awaitable[T]] | Iterable[Awaitable[T]],
    *,
    deadline: float | None = None,
    limit: int | None = None,
) -> Partial[Any, T]:
    """Run ``aws`` concurrently and return whatever finished, without raising for failures.

    ``aws`` is a mapping (keys name the parts) or an iterable (keys are positions). After
    ``deadline`` seconds, unfinished parts are cancelled and listed in ``cancelled``. Cancelling
    the caller still cancels everything and propagates, once every part has finished.
    """
    named: dict[Any, Awaitable[T]] = (
        dict(aws.items()) if isinstance(aws, Mapping) else dict(enumerate(aws))
    )
    try:
        semaphore = _check_limit(limit)
        if deadline is not None:
            deadline = real(deadline, "deadline (seconds)")
            if deadline < 0:
                raise UsageError(f"deadline (seconds) must not be negative, got {deadline!r}")
        for key, aw in named.items():
            # Refused as gather refuses it, before anything starts: not reported as that
            # part's TypeError once the others have run.
            if not inspect.isawaitable(aw):
                raise UsageError(f"gather_partial takes awaitables, got {aw!r} for {key!r}")
    except UsageError:
        _close_unstarted(named.values())
        raise
    partial: Partial[Any, T] = Partial()
    tasks = {key: asyncio.ensure_future(_limited(aw, semaphore)) for key, aw in named.items()}
    try:
        if tasks:
            await asyncio.wait(tasks.values(), timeout=deadline)
    finally:
        await _stopped(tasks.values())
    for key, task in tasks.items():
        if task.cancelled():
            partial.cancelled.append(key)
            continue
        error = task.exception()
        if error is None:
            partial.results[key] = task.result()
        elif isinstance(error, Exception):
            partial.errors[key] = error
        else:
            raise error
    return partial


async def _stopped(tasks: Collection[asyncio.Future[Any]]) -> None:
    """Cancels what is left of ``tasks`` and waits until all have finished, however often the
    caller is cancelled meanwhile (a cancellation that came is raised then): none outlives the
    call. Every part's error is read, those of parts that failed before the caller was cancelled
    too, which asyncio would otherwise log as "Task exception was never retrieved"."""
    for task in tasks:
        task.cancel()  # nothing, for those done
    finishing = asyncio.gather(*tasks, return_exceptions=True)
    cancelled: asyncio.CancelledError | None = None
    while not finishing.done():
        try:
            await asyncio.shield(finishing)
        except asyncio.CancelledError as error:
            cancelled = error
    if cancelled is not None:
        raise cancelled
