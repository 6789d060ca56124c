"""Starting, resuming and replaying durable workflow runs."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import logging
import sys
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, get_type_hints, overload, runtime_checkable

import pydantic_core
from pydantic import TypeAdapter

from .._context import run_owner
from .._process import HOST
from ..errors import RunFailedError, RunInProgressError, RunTakenOverError, UsageError
from ._journal import (
    Journal,
    RunRecord,
    attempt_span_id,
    journal_for,
    lease_seconds,
)
from ._run import DurableRun, canonical, current_durable_run, from_journal, reads_back
from ._script import check_not_loading, check_source, loading_target

_log = logging.getLogger("kagura.durable")
T = TypeVar("T")


@runtime_checkable
class Workflow(Protocol):
    """What a durable run needs of a workflow; :class:`kagura.Workflow` is one. Typed here,
    rather than imported, so that durable runs depend on the workflow's seam and the workflow
    module on durable runs, not each on the other."""

    @property
    def name(self) -> str: ...

    @property
    def fn(self) -> Callable[..., Coroutine[Any, Any, Any]]: ...

    def execute(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], *, span_id: str | None = None
    ) -> Coroutine[Any, Any, Any]:
        """Run the workflow once as one span (see :meth:`kagura.Workflow.execute`)."""
        ...


_R = TypeVar("_R")
_R_co = TypeVar("_R_co", covariant=True)


# Covariant, which kagura.Workflow's result type is not: a Workflow[..., str] is then one
# returning ``object`` too, as a caller's expected type (a list of Awaitable[object]) may ask.
class WorkflowOf(Workflow, Protocol[_R_co]):
    """A workflow whose runs return ``_R_co``: what :func:`replay` of it returns."""

    def execute(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], *, span_id: str | None = None
    ) -> Coroutine[Any, Any, _R_co]: ...


@dataclass(frozen=True, slots=True)
class _Facts:
    target: str
    signature: inspect.Signature
    #: The annotations of its parameters and of its result ("return"), by name, each with the
    #: validator of its stored JSON (``None``: not annotated): resolved once, not for every run
    #: started, resumed or answered from the store.
    adapters: dict[str, tuple[Any, TypeAdapter[Any]] | None] = field(default_factory=dict)

    def annotated(self, fn: Callable[..., Any], name: str) -> tuple[Any, TypeAdapter[Any]] | None:
        """The annotation named ``name`` and its validator."""
        if name not in self.adapters:
            hint = get_type_hints(fn).get(name)
            self.adapters[name] = None if hint is None else (hint, TypeAdapter(hint))
        return self.adapters[name]

    def adapter(self, fn: Callable[..., Any], name: str) -> TypeAdapter[Any] | None:
        found = self.annotated(fn, name)
        return None if found is None else found[1]


# Asked at every run's start, and resolving a script's path takes system calls: kept per
# workflow, weakly, so that a workflow let go of is not kept alive by the cache.
_facts: weakref.WeakKeyDictionary[Workflow, _Facts] = weakref.WeakKeyDictionary()


def _facts_of(workflow: Workflow) -> _Facts:
    facts = _facts.get(workflow)
    if facts is None:
        facts = _facts[workflow] = _Facts(_target(workflow.fn), inspect.signature(workflow.fn))
    return facts


def target_of(workflow: Workflow) -> str:
    """Where another process finds this workflow: ``module:qualname`` or ``file.py:qualname``."""
    return _facts_of(workflow).target


def keep_target(workflow: Workflow, target: str) -> None:
    """Take ``target`` as where another process finds ``workflow``: its :func:`target_of` in the
    process it was pickled in. Where it is unpickled (a Ray worker), a workflow of the driver's
    script has ``__main__`` for its module, and ``__main__`` there is another program (Ray's
    worker), so its runs would be journaled with a target no process can load."""
    _facts[workflow] = _Facts(target, inspect.signature(workflow.fn))


def _target(fn: Callable[..., Any]) -> str:
    module = fn.__module__
    if module == "__main__":
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if main_file:
            return f"{Path(main_file).resolve()}:{fn.__qualname__}"
    return f"{module}:{fn.__qualname__}"


def import_target(target: str) -> Workflow:
    """The workflow object named by :func:`target_of` (used by ``kagura runs resume``)."""
    location, _, qualname = target.rpartition(":")
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    if location.endswith(".py") and main_file and Path(main_file).resolve() == Path(location):
        module = main  # the script running now defines it: no second import
    elif location.endswith(".py"):
        check_source(location, target)  # a script's unguarded main code: refused before it runs
        spec = importlib.util.spec_from_file_location("kagura_resumed_main", location)
        if spec is None or spec.loader is None:
            raise UsageError(f"cannot load the workflow's file {location!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        with loading_target(target):
            spec.loader.exec_module(module)  # under another name: its __main__ block does not run
    else:
        with loading_target(target):  # finding the module's spec imports its packages
            check_source(location, target)
            module = importlib.import_module(location)
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not isinstance(found, Workflow):
        if location == "__main__":
            raise UsageError(
                f"{target!r} was defined in code that is not in a file (an interactive "
                f"session, `python -c`, a notebook), which no other process can import: "
                f"resume its runs from that code, with {qualname}.resume(run_id), or move the "
                f"workflow into a module or script"
            )
        raise UsageError(f"{target!r} does not name a @workflow")
    return found


def _dump_arguments(
    workflow: Workflow, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[inspect.BoundArguments, str]:
    bound = _facts_of(workflow).signature.bind(*args, **kwargs)
    bound.apply_defaults()
    try:
        # Sets in sorted order: the text is compared when the run id is asked for again.
        text = pydantic_core.to_json(canonical(dict(bound.arguments))).decode()
    except pydantic_core.PydanticSerializationError as exc:
        raise UsageError(
            f"durable workflow {workflow.name!r}: its arguments must be JSON-serialisable so that "
            f"another process can resume the run ({exc})"
        ) from exc
    return bound, text


def _load_arguments(workflow: Workflow, text: str | None) -> inspect.BoundArguments:
    facts = _facts_of(workflow)
    stored: dict[str, Any] = pydantic_core.from_json(text) if text else {}
    parameters = facts.signature.parameters
    unknown = [name for name in stored if name not in parameters]
    missing = [
        name
        for name, parameter in parameters.items()
        if name not in stored
        and parameter.default is inspect.Parameter.empty
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]
    if unknown or missing:
        raise UsageError(
            f"durable workflow {workflow.name!r} no longer takes the arguments its run was "
            f"started with ({', '.join(stored) or 'none'}): it now takes "
            f"({', '.join(parameters) or 'none'}); resume the run with the code it was started "
            f"with"
        )
    values: OrderedDict[str, Any] = OrderedDict()
    for name in parameters:
        if name in stored:
            adapter = facts.adapter(workflow.fn, name)
            values[name] = (
                stored[name] if adapter is None else adapter.validate_python(stored[name])
            )
    return inspect.BoundArguments(facts.signature, values)


def _load_result(workflow: Workflow, text: str | None) -> Any:
    return from_journal(text, _result_adapter(workflow))


def _result_adapter(workflow: Workflow) -> TypeAdapter[Any] | None:
    """The validator of the workflow's return annotation; ``None`` without one, or with one
    that has none (a name that does not resolve, a type pydantic refuses): its result is then
    JSON as it is."""
    found = _result_annotation(workflow)
    return None if found is None else found[1]


def _result_annotation(workflow: Workflow) -> tuple[Any, TypeAdapter[Any]] | None:
    """The workflow's return annotation and its validator (see :func:`_result_adapter`)."""
    try:
        return _facts_of(workflow).annotated(workflow.fn, "return")
    except Exception:
        return None


async def start(
    workflow: Workflow, args: tuple[Any, ...], kwargs: dict[str, Any], run_id: str | None
) -> Any:
    """Run ``workflow`` durably under ``run_id``: once, whoever asks and however often."""
    check_not_loading(f"workflow {workflow.name!r} started a durable run")
    run_id = Journal.run_id_for(run_id)
    bound, arguments = _dump_arguments(workflow, args, kwargs)
    journal = journal_for()
    owner = run_owner.get()
    if owner is None:
        owner = uuid.uuid4().hex
    else:
        run_owner.set(None)  # for this run only, not for durable runs its steps may start
    outcome, record, steps = await _taken(
        journal,
        run_id,
        owner,
        journal.start_soon(run_id, workflow.name, target_of(workflow), arguments, owner),
    )
    if record.workflow != workflow.name:
        raise UsageError(
            f"run id {run_id!r} belongs to workflow {record.workflow!r}, not {workflow.name!r}"
        )
    if outcome != "started" and record.arguments != arguments:
        # One run id is one piece of work: other arguments would silently get another's result.
        if outcome == "claimed":
            await journal.release_soon(run_id, owner)
        raise UsageError(
            f"run id {run_id!r} was started with other arguments ({record.arguments}); use "
            f"another run id, or {workflow.name}.resume({run_id!r}) to finish it as it was started"
        )
    if outcome == "completed":
        return _load_result(workflow, record.result)
    if outcome == "failed":
        raise RunFailedError(run_id, record.error, record.error_type)
    if outcome == "busy":
        return await _wait_for(workflow, journal, run_id)
    durable = DurableRun(run_id, journal, steps, owner=owner)
    return await _execute(workflow, journal, record, durable, bound)


@dataclass(frozen=True, slots=True)
class Resumed:
    """What resuming a run did: its result, and how many of its steps came from the journal
    (not run again) and how many ran now. A run that had already completed took none."""

    run_id: str
    result: Any
    replayed: int
    ran: int
    already_completed: bool = False


async def resume(workflow: Workflow, run_id: str) -> Any:
    """Finish an interrupted or failed run: journaled steps return their recorded results."""
    return (await resume_run(workflow, run_id)).result


async def resume_run(workflow: Workflow, run_id: str) -> Resumed:
    """:func:`resume`, saying what it did (see :class:`Resumed`)."""
    journal = journal_for()
    owner = uuid.uuid4().hex
    record, steps = await _taken(
        journal, run_id, owner, journal.claim_soon(run_id, owner, workflow.name)
    )
    try:
        if record is None:
            raise UsageError(f"there is no durable run {run_id!r} in the store")
        if record.workflow != workflow.name:
            raise UsageError(
                f"run {run_id!r} belongs to workflow {record.workflow!r}, not {workflow.name!r}"
            )
        if steps is None:
            if record.status == "completed":
                return Resumed(run_id, _load_result(workflow, record.result), 0, 0, True)
            raise RunInProgressError(_busy_message(record))
        bound = _load_arguments(workflow, record.arguments)
    except BaseException:
        # Claimed, but it cannot run here (a key that does not decrypt it, arguments that no
        # longer load): let it go at once, rather than hold it until the lease runs out.
        await _let_go(journal, run_id, owner)
        raise
    durable = DurableRun(run_id, journal, steps, owner=owner)
    result = await _execute(workflow, journal, record, durable, bound)
    return Resumed(run_id, result, durable.replayed, durable.recorded)


async def _taken(journal: Journal, run_id: str, owner: str, pending: asyncio.Future[T]) -> T:
    """The answer of a start or claim by which ``owner`` may have taken ``run_id``. If the
    caller is cancelled meanwhile (or the answer is an error: a run claimed that no key
    decrypts), the run is let go, but only once the request is committed: it is written in the
    journal's next batch whatever happens to its caller, and a release queued before that would
    be written first, find nothing to release, and leave the run held by no one until its lease
    ran out."""
    try:
        return await asyncio.shield(pending)
    except BaseException:
        released = _released_once_answered(journal, run_id, owner, pending)
        # Waited for, so that whoever resumes the run next finds it let go. A second
        # cancellation (anyio cancels a task at every turn of the loop until it has left the
        # cancelled scope) ends the wait, not the release.
        await asyncio.shield(released)
        raise


def _released_once_answered(
    journal: Journal, run_id: str, owner: str, pending: asyncio.Future[Any]
) -> asyncio.Future[None]:
    """Queues the release of ``run_id`` by ``owner`` once ``pending`` is answered (from its
    callback: it happens whatever becomes of the caller); done once the release is committed,
    or failed (a run the start or claim did not take is left as it is, quietly)."""
    released: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def settled(release: asyncio.Future[None]) -> None:
        if not release.cancelled():
            release.exception()  # retrieved: nothing to release is not an error here
        if not released.done():
            released.set_result(None)

    def release(_: asyncio.Future[Any]) -> None:
        journal.release_soon(run_id, owner).add_done_callback(settled)

    pending.add_done_callback(release)
    return released


async def _let_go(journal: Journal, run_id: str, owner: str) -> None:
    """Give up ``owner``'s claim of ``run_id``, if it made one (a release is conditional on the
    owner: a run it did not claim is left as it is)."""
    with contextlib.suppress(Exception):
        await asyncio.shield(journal.release_soon(run_id, owner))


def _busy_message(record: RunRecord) -> str:
    age = time.time() - (record.heartbeat_at or 0)
    where = (
        "this host"
        if record.host == HOST
        else f"{record.host} (another host: its lease is how this one knows it is gone)"
    )
    return (
        f"durable run {record.run_id!r} is being executed by process {record.pid} on {where}, "
        f"last heartbeat {age:.1f}s ago; it can be resumed once that process stops (at once on "
        f"its own host, else when its lease of {record.lease(lease_seconds()):g}s runs out)"
    )


async def _wait_for(workflow: Workflow, journal: Journal, run_id: str) -> Any:
    """Another process runs it: wait for its result instead of running it twice."""
    while True:
        await asyncio.sleep(0.2)
        record = await asyncio.to_thread(journal.get_run, run_id)
        assert record is not None
        if record.status == "completed":
            return _load_result(workflow, record.result)
        if record.status == "failed":
            raise RunFailedError(run_id, record.error, record.error_type)
        if record.status == "interrupted":
            try:
                return await resume(workflow, run_id)
            except RunInProgressError:
                continue  # another waiter took it over first: wait for its result


async def _execute(
    workflow: Workflow,
    journal: Journal,
    record: RunRecord,
    durable: DurableRun,
    bound: inspect.BoundArguments,
) -> Any:
    run_id, owner = record.run_id, durable.owner
    durable.main_task = asyncio.current_task()
    token = current_durable_run.set(durable)
    journal.hold(run_id, owner)  # its lease is renewed by the journal's thread until it ends
    try:
        result = await workflow.execute(
            bound.args, bound.kwargs, span_id=attempt_span_id(run_id, record.attempts)
        )
    except asyncio.CancelledError:
        # Cancelled is not failed: give the lease up so the run can be resumed at once.
        await _let_go(journal, run_id, owner)
        raise
    except RunTakenOverError:
        raise  # the run is another process's now: nothing to write
    except BaseException as exc:
        await asyncio.shield(journal.finish_soon(run_id, owner, error=exc))
        raise
    finally:
        journal.let_go(run_id, owner)
        current_durable_run.reset(token)
    try:
        dumped = _dump_result(workflow, result)
    except Exception as exc:
        # Failed with the reason, not left running: a later ask gets the error, not a wait.
        await asyncio.shield(journal.finish_soon(run_id, owner, error=exc))
        raise
    await asyncio.shield(journal.finish_soon(run_id, owner, result=dumped))
    return result


def _dump_result(workflow: Workflow, result: Any) -> str:
    """The run's result as the journal keeps it for whoever asks for the run again (read back
    through the return annotation, as a step's is): refused (:class:`UsageError`) when it has
    no JSON, rather than kept as its repr and read back as text."""
    try:
        text = pydantic_core.to_json(result).decode()
    except pydantic_core.PydanticSerializationError as exc:
        raise UsageError(
            f"durable workflow {workflow.name!r}: its result cannot be journaled, it has no JSON "
            f"({exc}); return a JSON value (str, numbers, lists, dicts, pydantic models)"
        ) from exc
    found = _result_annotation(workflow)
    if found is not None:  # kept, a result that did not read back would fail every later ask
        hint, adapter = found
        what = f"durable workflow {workflow.name!r}"
        reads_back(text, adapter, hint, what, "the run could not answer with it again")
    return text


@dataclass(frozen=True, slots=True)
class Recovered:
    """What :func:`recover` did with one interrupted run: ``outcome`` is ``completed``,
    ``failed`` (``error`` says why, and the run is marked failed), ``taken`` (another process
    claimed it first: it finishes it) or ``unloadable`` (its workflow could not be imported;
    the run stays interrupted)."""

    run_id: str
    workflow: str
    outcome: Literal["completed", "failed", "taken", "unloadable"]
    result: Any = None
    error: BaseException | None = None
    replayed: int = 0
    ran: int = 0


async def recover(
    *, all_hosts: bool = False, concurrency: int = 8, db: str | None = None
) -> list[Recovered]:
    """Resume every interrupted durable run, as DBOS does at launch: call it when a process
    starts. By default only the runs this host was executing (known interrupted at once when
    their process is gone); ``all_hosts`` takes those of other hosts too (interrupted once
    their lease has run out). The spans this host's dead processes left running are closed as
    interrupted first. Each run is resumed exactly once, however many processes recover
    at the same moment: the others see it ``taken``. ``concurrency`` runs are resumed at once.
    """
    if concurrency < 1:
        raise UsageError(f"concurrency must be at least 1, got {concurrency}")
    journal = journal_for(db)
    await asyncio.to_thread(journal.close_spans_of_gone_processes)
    interrupted = await asyncio.to_thread(journal.list_runs, status="interrupted", limit=None)
    if not all_hosts:
        interrupted = [r for r in interrupted if r.host == journal.host]
    gate = asyncio.Semaphore(concurrency)
    # Each workflow is imported once, not once per run: importing a script runs its top-level
    # code, and runs interrupted together are mostly of a few workflows.
    workflows: dict[str, Workflow | Exception] = {}

    async def one(record: RunRecord) -> Recovered:
        async with gate:
            return await _recover_one(record, workflows)

    return list(await asyncio.gather(*(one(r) for r in interrupted)))


def _imported(
    record: RunRecord, workflows: dict[str, Workflow | Exception]
) -> Workflow | Exception:
    """The workflow of ``record``, imported on its target's first run, or why it cannot be."""
    target = record.target
    if not target:
        return UsageError(f"run {record.run_id!r} does not say where its workflow is")
    if target not in workflows:
        try:
            workflows[target] = import_target(target)
        except Exception as exc:
            workflows[target] = exc
    return workflows[target]


async def _recover_one(record: RunRecord, workflows: dict[str, Workflow | Exception]) -> Recovered:
    run_id, name = record.run_id, record.workflow
    workflow = _imported(record, workflows)
    if isinstance(workflow, Exception):
        return Recovered(run_id, name, "unloadable", error=workflow)
    try:
        resumed = await resume_run(workflow, run_id)
    except (RunInProgressError, RunTakenOverError) as exc:
        return Recovered(run_id, name, "taken", error=exc)
    except Exception as exc:
        return Recovered(run_id, name, "failed", error=exc)
    if resumed.already_completed:
        return Recovered(run_id, name, "taken", resumed.result)
    return Recovered(run_id, name, "completed", resumed.result, None, resumed.replayed, resumed.ran)


# Two overloads: given the workflow, its result type; else the run's own workflow, whose type
# is not known until it is imported.
@overload
async def replay(run_id: str, workflow: WorkflowOf[_R], *, db: str | None = None) -> _R: ...
@overload
async def replay(run_id: str, workflow: None = None, *, db: str | None = None) -> Any: ...
async def replay(run_id: str, workflow: Workflow | None = None, *, db: str | None = None) -> Any:
    """Run a recorded run again against its journal only: no provider is called, nothing is
    written. A step the journal does not have raises :class:`NonDeterminismError`."""
    journal = journal_for(db)
    record, steps = await asyncio.to_thread(journal.read_run, run_id)
    if record is None:
        raise UsageError(f"there is no durable run {run_id!r} to replay")
    if workflow is None:
        if not record.target:
            raise UsageError(f"run {run_id!r} does not say where its workflow is; pass workflow=")
        workflow = import_target(record.target)
    bound = _load_arguments(workflow, record.arguments)
    durable = DurableRun(run_id, None, steps, replay_only=True)
    durable.main_task = asyncio.current_task()
    token = current_durable_run.set(durable)
    try:
        return await workflow.execute(bound.args, bound.kwargs, span_id=None)
    finally:
        current_durable_run.reset(token)
