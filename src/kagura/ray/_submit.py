"""``submit``: one durable workflow run on a worker of the cluster, and the handle to its result."""

from __future__ import annotations

import inspect
from collections.abc import Generator
from typing import Any, Generic, TypeVar

import pydantic_core
import ray
from ray.exceptions import TaskCancelledError

from .._workflow import Workflow
from ..durable import Journal, journal_for
from ..errors import RunCancelledError, UsageError
from ..resilience import registry
from . import _cluster
from ._worker import parent_here, ship

R = TypeVar("R")


class RunHandle(Generic[R]):
    """A run submitted to the cluster. ``await handle`` gives its result (or raises its error),
    wherever and however many times it ran; :attr:`run_id` names it in the journal and in
    ``kagura monitor``; :meth:`cancel` stops it wherever it runs."""

    __slots__ = ("_ref", "run_id")

    def __init__(self, run_id: str, ref: ray.ObjectRef[R]) -> None:
        self.run_id: str = run_id
        self._ref = ref

    def __await__(self) -> Generator[Any, None, R]:
        return self._result().__await__()

    async def _result(self) -> R:
        try:
            result: R = await self._ref
        except (TaskCancelledError, ray.exceptions.RayTaskError) as error:
            raise _unwrapped(error, self.run_id) from None
        return result

    def result(self, timeout: float | None = None) -> R:
        """Wait for the result from synchronous code."""
        try:
            result: R = ray.get(self._ref, timeout=timeout)
        except (TaskCancelledError, ray.exceptions.RayTaskError) as error:
            raise _unwrapped(error, self.run_id) from None
        return result

    def cancel(self) -> None:
        """Cancel the run on its worker: the workflow gets ``asyncio.CancelledError`` where it
        is, and the run is recorded as cancelled (:class:`~kagura.errors.RunCancelledError`).
        Awaiting the handle then raises that error."""
        ray.cancel(self._ref)

    def __repr__(self) -> str:
        return f"<RunHandle {self.run_id}>"


def _unwrapped(error: Exception, run_id: str) -> BaseException:
    """The run's own exception as the workflow raised it (Ray wraps it), or
    :class:`RunCancelledError` for a cancelled run."""
    if isinstance(error, TaskCancelledError):
        return RunCancelledError(run_id)
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
    worker = _cluster.pool().next()
    ref: ray.ObjectRef[R] = worker.run.remote(
        ship(workflow), args, kwargs, run_id, parent_here(), registry() or None
    )
    return RunHandle(run_id, ref)


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
