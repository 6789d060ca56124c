"""The worker actor: where a submitted run or a batch item executes.

One process, many runs at once on its event loop. A run is started with ``workflow.run(...,
run_id=...)``, the durable path: its steps are journaled in the shared store before the workflow
sees them. When the worker's process dies, Ray starts it again and sends the calls it had in
flight again (``max_task_retries=-1``); the run's id is the same, so ``workflow.run`` finds the
journal, claims the run (its old process is known gone on this host at once, on another host
when its lease runs out) and replays the finished steps instead of calling a model again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from .._context import Span, current_span
from ..errors import RunCancelledError
from ._config import WorkerSettings

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
        workflow: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        run_id: str,
        parent: Parent,
    ) -> Any:
        """Run ``workflow`` durably as ``run_id`` (or finish it, or return its result)."""
        try:
            with under(parent):
                result = await workflow.run(*args, run_id=run_id, **kwargs)
        except asyncio.CancelledError:
            # Cancelled by its handle: the run ends as cancelled rather than staying
            # resumable, so that recovery does not start again what its caller stopped.
            await asyncio.shield(asyncio.to_thread(_mark_cancelled, run_id))
            raise
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
        fn: Callable[[Any], Awaitable[Any]],
        item: Any,
        parent: Parent,
        budgets: tuple[Any, ...],
    ) -> tuple[bool, Any]:
        """``await fn(item)`` under the batch's budgets: ``(True, result)`` or ``(False,
        error)``, so that one item's error does not lose the batch."""
        try:
            with under(parent), contextlib.ExitStack() as stack:
                for budget in budgets:
                    stack.enter_context(budget)
                return True, await fn(item)
        except Exception as error:
            return False, error


def _mark_cancelled(run_id: str) -> None:
    from ..durable import journal_for

    journal = journal_for()
    owner = uuid.uuid4().hex
    if journal.claim(run_id, owner, allow_failed=False):
        journal.finish(run_id, owner, error=RunCancelledError(run_id))
