"""``@workflow``: plain async Python that composes agents, recorded as one run.

A workflow call opens a span that every agent call inside it joins through the context variable,
including calls made in ``asyncio.gather`` and ``create_task`` (asyncio copies the context into
each task). Workflows called inside workflows become child runs of the same tree. Resilience
settings given to ``@workflow(...)`` become the defaults of every agent call in the run, and
budgets are made fresh for each run.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from contextlib import ExitStack
from typing import Any, Generic, ParamSpec, TypeVar, Unpack, overload

from . import _instrument, _settings
from ._checks import count, real
from ._context import Span, checked_name, current_span
from ._instrument import span_finished, span_started, status_of
from ._recording import ensure_recording
from ._redact import by_name, signature_of
from ._tool import with_resolved_annotations
from .durable import _execute as _durable
from .durable import _script
from .durable._run import current_durable_run
from .errors import UsageError
from .resilience._budget import CostBudget, RetryBudget
from .resilience._policies import (
    Policies,
    PolicyOptions,
    reset_workflow_policies,
    set_workflow_policies,
)

P = ParamSpec("P")
R = TypeVar("R")

WorkflowFunction = Callable[P, Coroutine[Any, Any, R]]


class Workflow(Generic[P, R]):
    """A recorded async function. Create it with :func:`workflow`."""

    def __init__(
        self,
        fn: WorkflowFunction[P, R],
        *,
        name: str | None = None,
        policies: Policies | None = None,
        retry_budget: int | None = None,
        budget_usd: float | None = None,
        budget_tokens: int | None = None,
        durable: bool | None = None,
    ) -> None:
        if isinstance(fn, Workflow):
            raise UsageError(
                f"{fn.name!r} is already a workflow: apply @workflow once, to its 'async def'"
            )
        if not inspect.iscoroutinefunction(fn):
            raise UsageError(
                f"@workflow needs an 'async def' function; "
                f"{getattr(fn, '__qualname__', fn)!r} is not"
            )
        functools.update_wrapper(self, fn)
        self.fn = fn
        self._signature = signature_of(fn)  # its runs' arguments are recorded by name
        self.name: str = checked_name("workflow", name or fn.__name__)
        self.policies = policies
        self.retry_budget = retry_budget
        self.budget_usd = budget_usd
        self.budget_tokens = budget_tokens
        self.durable = durable
        if retry_budget is not None:
            # Checked now rather than at the first run, and by the name given here (RetryBudget
            # would call it max_retries).
            count(retry_budget, "retry_budget", at_least=0)
        if durable is not None and not isinstance(durable, bool):
            raise UsageError(f"durable must be True, False or None, got {durable!r}")
        if budget_usd is not None:
            real(budget_usd, "budget_usd")
        if budget_tokens is not None:
            count(budget_tokens, "budget_tokens", at_least=0)
        if budget_usd is not None or budget_tokens is not None:
            CostBudget(usd=budget_usd, tokens=budget_tokens)

    # A plain method returning the run's coroutine: an ``async def`` would add a coroutine per
    # call only to await the inner one. Typed ``Coroutine[object, object, R]`` as an agent's call
    # is (see Agent.__call__): with ``Any`` there, mypy loses the result type in asyncio.gather.
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[object, object, R]:
        durable = self.durable if self.durable is not None else _settings.durable_default()
        if durable and current_durable_run.get() is None:
            return _durable.start(self, args, kwargs, None)
        return self.execute(args, kwargs)

    #: Lets ``Retry`` (and anyone asking) know that calling a workflow returns an awaitable.
    _is_async_callable = True

    # Typed with Any: a ParamSpec cannot be followed by the run_id keyword.
    async def run(self, *args: Any, run_id: str | None = None, **kwargs: Any) -> R:
        """Run durably under ``run_id`` (a new id when omitted): each step is journaled, and
        starting the same id again, while it runs or after it completed, returns the same
        result instead of running twice. (A workflow parameter named ``run_id`` is shadowed.)"""
        result: R = await _durable.start(self, args, kwargs, run_id)
        return result

    async def resume(self, run_id: str) -> R:
        """Finish run ``run_id`` after its process died or it failed, in this process: steps
        found in the journal return their recorded results without calling a provider."""
        result: R = await _durable.resume(self, run_id)
        return result

    async def execute(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], *, span_id: str | None = None
    ) -> R:
        """Run the function once, here and now, as one ``workflow`` span (with id ``span_id``
        when given) under the workflow's policies and budgets; nothing is journaled here.

        The seam :mod:`kagura.durable` runs a workflow through (a durable run sets its journal
        up around this call); a plain call of the workflow is this too."""
        if _script.loads_in_progress:  # a workflow's module is being imported to resume a run
            _script.check_not_loading(f"workflow {self.name!r} was started")
        ensure_recording()
        outer = current_span.get()
        span = Span("workflow", self.name, outer, span_id=span_id)
        # Undone by setting ``outer`` back rather than by a reset token: a token would be one
        # more object per run in flight for the garbage collector to track.
        current_span.set(span)
        if _instrument.recording:
            span_started(span, {"inputs": by_name(self._signature, args, kwargs)})
        policy_token = None if self.policies is None else set_workflow_policies(self.policies)
        run: Coroutine[Any, Any, R] | None = None
        try:
            # The run's coroutine keeps what it needs of its arguments; the tuple is let go now.
            run = self.fn(*args, **kwargs)
            del args, kwargs
            if self.retry_budget is None and self.budget_usd is None and self.budget_tokens is None:
                result = await run
            else:
                with ExitStack() as budgets:
                    if self.retry_budget is not None:
                        budgets.enter_context(RetryBudget(self.retry_budget))
                    if self.budget_usd is not None or self.budget_tokens is not None:
                        budgets.enter_context(
                            CostBudget(usd=self.budget_usd, tokens=self.budget_tokens)
                        )
                    result = await run
        except BaseException as exc:
            if run is not None:
                run.close()  # unless it was awaited (then this does nothing): no "never awaited"
            span_finished(span, status_of(exc), exc)
            raise
        finally:
            if policy_token is not None:
                reset_workflow_policies(policy_token)
            current_span.set(outer)
        span_finished(
            span, "completed", attributes={"output": result} if _instrument.recording else None
        )
        return result

    def __reduce__(self) -> tuple[Any, ...]:
        # Made again where it is unpickled (a Ray worker), from the function with its
        # annotations resolved: durable runs read them to load arguments and results.
        # And where its durable runs find it, as this process sees it (see keep_target).
        return _workflow_from, (
            with_resolved_annotations(self.fn),
            {
                "name": self.name,
                "policies": self.policies,
                "retry_budget": self.retry_budget,
                "budget_usd": self.budget_usd,
                "budget_tokens": self.budget_tokens,
                "durable": self.durable,
            },
            _durable.target_of(self),
        )

    def __repr__(self) -> str:
        return f"<Workflow {self.name}>"


def _workflow_from(
    fn: WorkflowFunction[..., Any], settings: dict[str, Any], target: str | None = None
) -> Workflow[..., Any]:
    made = Workflow(fn, **settings)
    if target is not None:  # None: pickled by a Kagura that did not send it
        _durable.keep_target(made, target)
    return made


class WorkflowOptions(PolicyOptions, total=False):
    """The settings of :func:`workflow`, all optional. The resilience settings (those of
    :class:`~kagura.resilience.PolicyOptions`) become the defaults of every agent call in the
    run."""

    #: The workflow's name in recordings and the journal (default: the function's).
    name: str | None
    #: A cap on the retries of the whole run.
    retry_budget: int | None
    #: Caps on what the run's LLM calls may spend, in US dollars and in tokens.
    budget_usd: float | None
    budget_tokens: int | None
    #: Journal the run's steps so that it can be resumed (default: ``KAGURA_DURABLE``).
    durable: bool | None


@overload
def workflow(fn: WorkflowFunction[P, R], /) -> Workflow[P, R]: ...
@overload
def workflow(
    **options: Unpack[WorkflowOptions],
) -> Callable[[WorkflowFunction[P, R]], Workflow[P, R]]: ...
def workflow(
    fn: WorkflowFunction[P, R] | None = None, /, **options: Unpack[WorkflowOptions]
) -> Workflow[P, R] | Callable[[WorkflowFunction[P, R]], Workflow[P, R]]:
    """Record an async function as a workflow run; agent calls inside it join the run.

    ``retry``, ``timeout``, ``total_timeout``, ``breaker`` and ``rate_limit`` become the defaults of
    every agent call in the run (an agent's own settings win). ``retry_budget`` caps the retries of
    the whole run; ``budget_usd`` and ``budget_tokens`` cap what its LLM calls may spend, after
    which calls raise :class:`kagura.resilience.BudgetExceeded`.

    ``durable=True`` journals every completed agent call, tool call and ``kagura.step`` of each
    top-level run, so that a run that died can be resumed without paying for them again
    (``KAGURA_DURABLE=1`` makes it the default); see :meth:`Workflow.run` and
    :meth:`Workflow.resume`.
    """
    unknown = options.keys() - WorkflowOptions.__optional_keys__
    if unknown:
        raise TypeError(f"workflow() got unexpected keyword arguments {', '.join(sorted(unknown))}")
    given = Policies.from_options(options)
    policies = None if given == Policies() else given

    def decorate(f: WorkflowFunction[P, R]) -> Workflow[P, R]:
        return Workflow(
            f,
            name=options.get("name"),
            policies=policies,
            retry_budget=options.get("retry_budget"),
            budget_usd=options.get("budget_usd"),
            budget_tokens=options.get("budget_tokens"),
            durable=options.get("durable"),
        )

    if fn is not None:
        return decorate(fn)
    return decorate
