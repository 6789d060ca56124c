"""Slow, process-wide provider set-up (an SDK import, loading weights), shared by every caller.

The work is blocking, so it runs in a thread of its own: the event loop keeps serving other tasks
meanwhile. However many calls ask at once, from however many event loops, it runs once; a caller
that gives up (cancelled, or its call's total timeout expired) leaves it running for the others.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future


class SharedSetUp:
    """``await setup()`` runs ``work`` in a thread unless it has already succeeded, or joins the
    run under way. A failure is raised to every caller waiting for it, and the next call runs
    ``work`` again (a failed import is not cached either)."""

    def __init__(self, work: Callable[[], object], name: str) -> None:
        self._work = work
        self._name = name
        self._lock = threading.Lock()
        self._running: Future[None] | None = None
        #: ``work`` has succeeded: nothing is left to wait for.
        self.done = False

    async def __call__(self) -> None:
        if self.done:
            return
        with self._lock:
            future = self._running
            if future is None:
                future = self._running = Future()
                # Running before anyone can await it: a waiter that is cancelled then cancels its
                # own wait (cancel() refuses a running future), not everyone else's.
                future.set_running_or_notify_cancel()
                threading.Thread(
                    target=self._run, args=(future,), name=self._name, daemon=True
                ).start()
        await asyncio.wrap_future(future)

    def _run(self, future: Future[None]) -> None:
        try:
            self._work()
        except BaseException as exc:
            with self._lock:
                self._running = None
            future.set_exception(exc)
        else:
            self.done = True
            with self._lock:
                self._running = None
            future.set_result(None)
