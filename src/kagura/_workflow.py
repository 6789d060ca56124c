"""``@workflow``: plain async Python that composes agents, recorded as one run.

A workflow call opens a span that every agent call inside it joins through the context variable,
including calls made in ``asyncio.gather`` and ``create_task`` (asyncio copies the context into
each task). Workflows called inside workflows become child runs of the same tree.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, Generic, ParamSpec, TypeVar, overload

from ._context import Span, current_span
from ._instrument import span_finished, span_started, status_of
from .errors import UsageError

P = ParamSpec("P")
R = TypeVar("R")

WorkflowFunction = Callable[P, Coroutine[Any, Any, R]]


class Workflow(Generic[P, R]):
    """A recorded async function. Create it with :func:`workflow`."""

    def __init__(self, fn: WorkflowFunction[P, R], *, name: str | None = None) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise UsageError(
                f"@workflow needs an 'async def' function; "
                f"{getattr(fn, '__qualname__', fn)!r} is not"
            )
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.name = name or fn.__name__

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        span = Span("workflow", self.name, current_span.get())
        token = current_span.set(span)
        span_started(span, {"inputs": {"args": args, "kwargs": kwargs}})
        try:
            result = await self.fn(*args, **kwargs)
        except BaseException as exc:
            span_finished(span, status_of(exc), exc)
            raise
        finally:
            current_span.reset(token)
        span_finished(span, "completed", attributes={"output": result})
        return result

    def __repr__(self) -> str:
        return f"<Workflow {self.name}>"


@overload
def workflow(fn: WorkflowFunction[P, R], /) -> Workflow[P, R]: ...
@overload
def workflow(*, name: str | None = None) -> Callable[[WorkflowFunction[P, R]], Workflow[P, R]]: ...
def workflow(
    fn: WorkflowFunction[P, R] | None = None, /, *, name: str | None = None
) -> Workflow[P, R] | Callable[[WorkflowFunction[P, R]], Workflow[P, R]]:
    """Record an async function as a workflow run; agent calls inside it join the run."""
    if fn is not None:
        return Workflow(fn, name=name)

    def decorate(f: WorkflowFunction[P, R]) -> Workflow[P, R]:
        return Workflow(f, name=name)

    return decorate
