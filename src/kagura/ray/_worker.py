"""The worker actor: where a submitted run or a batch item executes.

One process, many runs at once on its event loop. A run is started with ``workflow.run(...,
run_id=...)``, the durable path: its steps are journaled in the shared store before the workflow
sees them. When the worker's process dies, Ray starts it again and sends the calls it had in
flight again (``max_task_retries=-1``); the run's id is the same, so ``workflow.run`` finds the
journal, claims the run (its old process is known gone on this host at once, on another host
when its lease runs out) and replays the finished steps instead of calling a model again.
(Batch items are sent again by :func:`kagura.ray.map`, which gives up on one after a few losses.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import pickle
import socket
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from .._context import Span, current_span, run_owner
from .._redact import str_of
from ..errors import RunCancelledError, RunError
from ..resilience import Registry, use_registry
from ._config import WorkerSettings

#: A callable sent to the workers once (``ray.put``) and named in each task by its reference,
#: in a list so that Ray passes the reference rather than the value (see :func:`shipped`).
Shipped = list[Any]

# What the driver has sent once, by the callable it was made of: a workflow or an agent is
# pickled once per driver, not with every run or item.
_sent: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def ship(fn: Any) -> Shipped:
    """``fn`` (a workflow, an agent, a function) for the workers, put in Ray's object store
    once. Unpickling it cost a worker about 3 ms a run (an agent is made again, its prompt
    compiled), measured by benchmarks/bench_ray.py, when it travelled with every task."""
    import ray

    try:
        reference = _sent.get(fn)
    except TypeError:  # not weakly referable: sent every time
        return [ray.put(fn)]
    if reference is None:
        reference = _sent[fn] = ray.put(fn)
    return [reference]


# In a worker: what was shipped, unpickled once (a task each, so that runs arriving together
# wait for one unpickling), the most recent kept.
_received: OrderedDict[str, asyncio.Task[Any]] = OrderedDict()
_RECEIVED_KEPT = 256


async def received(box: Shipped) -> Any:
    """The callable :func:`ship` sent, in this worker."""
    reference = box[0]
    key = reference.hex()
    task = _received.get(key)
    if task is None or (task.done() and task.exception() is not None):
        task = _received[key] = asyncio.ensure_future(_fetch(reference))
        while len(_received) > _RECEIVED_KEPT:
            _received.popitem(last=False)
    else:
        _received.move_to_end(key)
    return await asyncio.shield(task)


async def _fetch(reference: Any) -> Any:
    return await reference


#: Where a task's spans hang in the caller's run tree: the caller's span id, run id and step
#: key (``None`` when the caller was in no run).
Parent = tuple[str, str, str] | None


def parent_here() -> Parent:
    """The current span, as a task takes it to another process."""
    span = current_span.get()
    if span is None:
        return None
    return span.span_id, span.run_id, span.step_key


@contextlib.contextmanager
def under(parent: Parent) -> Iterator[None]:
    """Make the spans of the code inside children of the caller's span, in the caller's run."""
    if parent is None:
        yield
        return
    span_id, run_id, step_key = parent
    # A stand-in: it is never started or finished here (the caller records it), only pointed at.
    stand_in = Span.detached("workflow", "remote", span_id, None, run_id, step_key, time.time_ns())
    token = current_span.set(stand_in)
    try:
        yield
    finally:
        current_span.reset(token)


class Worker:
    """A Ray actor (made one by :class:`kagura.ray._cluster.Pool`)."""

    def __init__(self, settings: WorkerSettings) -> None:
        settings.apply()
        settings.check()
        from . import _models, _shared

        _shared.install_in_worker()
        _models.install_in_worker(settings.config)

    def ready(self) -> tuple[str, int]:
        """This worker's host and process id, once it is set up."""
        return socket.gethostname(), os.getpid()

    async def run(
        self,
        shipped: Shipped,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        run_id: str,
        parent: Parent,
        taken: Registry | None,
        owner: str,
    ) -> Any:
        """Run ``workflow`` durably as ``run_id`` (or finish it, or return its result), with
        the driver's model rate limits and named breakers (``taken``). ``owner``: the token the
        run is held by, if this task starts or resumes it (the driver's, for its handle)."""
        if taken:
            use_registry(taken)
        workflow = await received(shipped)
        try:
            with under(parent):
                run_owner.set(owner)
                result = await workflow.run(*args, run_id=run_id, **kwargs)
        except asyncio.CancelledError:
            # Cancelled by its handle: the run ends as cancelled rather than staying
            # resumable, so that recovery does not start again what its caller stopped.
            await asyncio.shield(asyncio.to_thread(_mark_cancelled, run_id, owner))
            raise
        except Exception as error:
            # One that does not pickle would reach the caller as Ray's UnserializableException
            # (its message in terminal colours), the run's own type and message lost.
            sent = _sendable(error, "run")
            if sent is error:
                raise
            raise sent from None
        # What the caller sees next is the run's trace: its spans are in the store first.
        await self.flush()
        return result

    async def flush(self) -> None:
        """Wait until what this worker recorded is in the store."""
        from ..observability import default_recorder

        recorder = default_recorder()
        if recorder is not None:
            await asyncio.to_thread(recorder.flush)

    async def call(
        self,
        shipped: Shipped,
        item: Any,
        run_id: str | None,
        parent: Parent,
        budgets: tuple[Any, ...],
        taken: Shipped | None,
    ) -> tuple[bool, Any]:
        """``await fn(item)`` under the batch's budgets and the driver's registry (``taken``,
        shipped once for the batch): ``(True, result)`` or ``(False, error)``, so that one
        item's error does not lose the batch. With ``run_id``, ``fn`` is a durable workflow
        and the item its run ``run_id``: sent again, it resumes that run."""
        try:
            if taken is not None:
                use_registry(await received(taken))
            sent = await received(shipped)
            fn: Callable[[Any], Awaitable[Any]] = (
                sent if run_id is None else functools.partial(sent.run, run_id=run_id)
            )
            with under(parent), contextlib.ExitStack() as stack:
                for budget in budgets:
                    stack.enter_context(budget)
                return True, await fn(item)
        except Exception as error:
            return False, _sendable(error, "item")


def _sendable(error: Exception, whose: str) -> Exception:
    """``error``, or, when it cannot travel back to the driver (an attribute that does not
    pickle, a constructor that does not take its own args back), a :class:`RunError` saying
    what it was: else Ray's error about pickling it would stand in its place, and the item's
    (or the run's: ``whose``) own type and message be lost."""
    from ray import cloudpickle  # Ray's pickler, as it will send the error

    try:
        pickle.loads(cloudpickle.dumps(error))  # type: ignore[no-untyped-call]
    except Exception as why:
        sent = RunError(f"{type(error).__qualname__}: {str_of(error)}")
        sent.add_note(
            f"kagura: the {whose}'s own exception could not be sent back from its worker "
            f"({type(why).__name__}: {why})"
        )
        return sent
    return error


def _mark_cancelled(run_id: str, owner: str) -> None:
    """Record ``run_id`` cancelled, if this task held it (``owner``; it gave it up as it was
    cancelled): not a run it only waited for, which another caller's task holds."""
    from ..durable import journal_for

    journal = journal_for()
    record = journal.get_run(run_id)
    if record is None or record.owner != owner:
        return
    taker = uuid.uuid4().hex
    if journal.claim(run_id, taker, allow_failed=False):
        journal.finish(run_id, taker, error=RunCancelledError(run_id))
