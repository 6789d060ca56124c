"""``submit``: one durable workflow run on a worker of the cluster, and the handle to its result."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
import time
import uuid
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

import pydantic_core
import ray
from ray.exceptions import TaskCancelledError

from .._workflow import Workflow
from ..durable import Journal, journal_for, lease_seconds
from ..errors import RunCancelledError, UsageError
from ..resilience import registry
from . import _cluster
from ._worker import parent_here, ship

R = TypeVar("R")


class RunHandle(Generic[R]):
    """A run submitted to the cluster. ``await handle`` gives its result (or raises its error),
    wherever and however many times it ran; :attr:`run_id` names it in the journal and in
    ``kagura monitor``; :meth:`cancel` stops it wherever it runs."""

    __slots__ = ("_done", "_owner", "_recorded", "_ref", "run_id")

    def __init__(
        self,
        run_id: str,
        ref: ray.ObjectRef[R],
        done: Callable[[], None] = lambda: None,
        owner: str = "",
    ) -> None:
        self.run_id: str = run_id
        self._ref = ref
        # The token the run is held by while this handle's task holds it (see _record_cancelled).
        self._owner = owner
        # Tells the pool the run is no longer in flight: called as soon as the caller hears
        # how it ended, so that a configure() right after sees it so.
        self._done = done
        self._recorded: concurrent.futures.Future[RunCancelledError] | None = None

    def __await__(self) -> Generator[Any, None, R]:
        return self._result().__await__()

    async def _result(self) -> R:
        try:
            result: R = await self._ref
        except TaskCancelledError:
            error = await asyncio.wrap_future(self._cancelled())
            self._done()
            raise error from None
        except ray.exceptions.RayTaskError as error:
            self._done()
            raise _unwrapped(error) from None
        self._done()
        return result

    def result(self, timeout: float | None = None) -> R:
        """Wait for the result from synchronous code (at most ``timeout`` seconds: then
        :class:`TimeoutError`, and the run goes on)."""
        try:
            result: R = ray.get(self._ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(
                f"run {self.run_id!r} did not finish within {timeout:g}s; it goes on: call "
                "result() again, await the handle, or cancel() it"
            ) from None
        except TaskCancelledError:
            error = self._cancelled().result()
            self._done()
            raise error from None
        except ray.exceptions.RayTaskError as error:
            self._done()
            raise _unwrapped(error) from None
        self._done()
        return result

    def cancel(self) -> None:
        """Cancel the run on its worker: the workflow gets ``asyncio.CancelledError`` where it
        is, and the run is recorded as cancelled (:class:`~kagura.errors.RunCancelledError`).
        Awaiting the handle then raises that error, once the journal says so."""
        ray.cancel(self._ref)
        self._cancelled()

    def _cancelled(self) -> concurrent.futures.Future[RunCancelledError]:
        """The recording of the cancellation in the journal, started on first call: its
        outcome is the error the caller gets."""
        if self._recorded is None:
            self._recorded = concurrent.futures.Future()
            # Not a daemon: a driver that exits right after cancel() still records it, else
            # its run would stay resumable and recovery would run it again.
            threading.Thread(
                target=_record_cancelled,
                args=(self.run_id, self._owner, self._recorded),
                name=f"kagura-cancel-{self.run_id}",
            ).start()
        return self._recorded

    def __repr__(self) -> str:
        return f"<RunHandle {self.run_id}>"


#: How often the driver looks again at a cancelled run that it cannot yet claim.
_CANCEL_POLL_SECONDS = 0.2


def _record_cancelled(
    run_id: str, owner: str, recorded: concurrent.futures.Future[RunCancelledError]
) -> None:
    """Record ``run_id`` failed with :class:`RunCancelledError`, unless it ended otherwise, or
    it is not the handle's task that holds it (``owner``): one that only waited for the run,
    which another caller's task holds, leaves it alone.

    The worker records it itself when the cancellation reaches the run (``Worker.run``); but a
    run whose worker died is waiting to be sent again while Ray restarts the worker, and the
    cancellation drops it there: no worker code runs, and the journal would keep the run
    interrupted for recovery to run again. So the driver claims the run too, as soon as it can
    be claimed (at once when the dead worker was on this host, else when its lease runs out),
    and finishes it as cancelled. A claim takes only a run still running whose holder is gone:
    never one that completed, nor one that a live worker holds (which records it itself)."""
    error = RunCancelledError(run_id)
    try:
        journal = journal_for()
        taker = uuid.uuid4().hex
        deadline: float | None = None
        while True:
            record = journal.get_run(run_id)
            if record is None or record.status in ("completed", "failed"):
                break  # never started (dropped before it was), or ended: nothing to record
            if record.owner != owner:
                break  # another caller's run, which this handle's task only waited for
            if journal.claim(run_id, taker, allow_failed=False):
                journal.finish(run_id, taker, error=error)
                break
            now = time.monotonic()
            if deadline is None:
                # A live holder records it at once; a lost one's lease runs out within one
                # lease. Past two, the holder lives on without hearing of the cancellation.
                deadline = now + 2 * record.lease(lease_seconds())
            elif now > deadline:
                error.add_note(
                    f"kagura: the run could not be recorded as cancelled: process {record.pid} "
                    f"on {record.host} still holds it; it may finish, and if it stops it stays "
                    f"resumable (`kagura runs list` shows it)"
                )
                break
            time.sleep(_CANCEL_POLL_SECONDS)
    except Exception as why:  # the store failed: the caller still hears of the cancellation
        error.add_note(
            f"kagura: the run could not be recorded as cancelled ({type(why).__name__}: {why}); "
            "it may stay resumable"
        )
    recorded.set_result(error)


def _unwrapped(error: Exception) -> BaseException:
    """The run's own exception as the workflow raised it (Ray wraps it)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def submit(
    workflow: Workflow[..., R], /, *args: Any, run_id: str | None = None, **kwargs: Any
) -> RunHandle[R]:
    """Run ``workflow(*args, **kwargs)`` as a durable run on a worker of the cluster, and return
    its handle at once (the cluster is joined, and the workers started, on the first call).

    ``run_id`` names the run (default: a new id): submitting an id that completed returns its
    result without running anything, and one running elsewhere waits for it. The arguments must
    be JSON-serialisable, for another worker to resume the run: a submission whose arguments are
    not is refused here, before anything is sent (:class:`~kagura.errors.UsageError`)."""
    if not isinstance(workflow, Workflow):
        raise UsageError(
            f"kagura.ray.submit runs a @workflow, got {workflow!r}; for agents and plain "
            "functions over many items use kagura.ray.map"
        )
    run_id = Journal.run_id_for(run_id)
    _check_arguments(workflow, args, kwargs)
    journal_for()  # the store opens (and is made) here, not in every worker at once
    # In flight from before it is sent: a configure() or shutdown() meanwhile is refused.
    pool, done = _cluster.busy_pool(f"run {run_id!r}")
    owner = uuid.uuid4().hex
    try:
        ref: ray.ObjectRef[R] = pool.next().run.remote(
            ship(workflow), args, kwargs, run_id, parent_here(), registry() or None, owner
        )
    except BaseException:
        done()
        raise
    # And when it ends unheard of (a handle never awaited).
    ref.future().add_done_callback(done)
    return RunHandle(run_id, ref, done, owner)


def _check_arguments(workflow: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """The errors a worker would raise, raised here instead: before anything is sent."""
    try:
        bound = inspect.signature(workflow.fn).bind(*args, **kwargs)
    except TypeError as error:
        raise UsageError(f"workflow {workflow.name!r}: {error}") from None
    try:
        pydantic_core.to_json(dict(bound.arguments))
    except pydantic_core.PydanticSerializationError as error:
        raise UsageError(
            f"workflow {workflow.name!r}: a submitted run is durable, so its arguments must be "
            f"JSON-serialisable for another worker to resume it ({error})"
        ) from None
