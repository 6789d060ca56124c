"""A durable run in progress: what agent calls, tool calls and steps consult and feed.

Each journaled call is identified by its step key (the call site within the run: the names of the
calls it is nested in plus a sequence number, stable under ``asyncio.gather`` and ``create_task``
because tasks start in creation order) and checked by a hash of its inputs. A step found in the
journal returns its recorded output without running; a step found under the same key with another
name or inputs means the code took another path, which raises :class:`NonDeterminismError` rather
than mixing results of two different executions.

Calls started in parallel branches after other awaits are numbered in the order they start, which
a resumed run need not repeat: such a call is found by its inputs among the journaled calls of its
name and parent. One that was never journaled, whose number a sibling's call holds, cannot be told
from another path; calls named for their branch (``step(f"store {doc}", ...)``) have keys of their
own, and a branch's new step is not checked against its place among its parent's steps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import decimal
import fractions
import hashlib
import inspect
import re
import sys
import weakref
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar, cast, get_args, get_type_hints, overload

import pydantic_core
from pydantic import RootModel, TypeAdapter

from .._context import Span, checked_name, current_span
from .._instrument import span_finished, span_started, status_of
from .._output import describe_error
from .._recording import ensure_recording
from .._redact import by_name, looks_secret, redact_text, repr_of, signature_of
from ..errors import NonDeterminismError, RunTakenOverError, UsageError
from ._journal import Journal, StepRecord

P = ParamSpec("P")
T = TypeVar("T")

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

#: What a run whose code took another path than its journal can do.
_WAY_ON = (
    "; resume the run with the code it was started with, or do the work again under a new run id"
)


def input_hash(value: Any, *, sort_keys: bool = False) -> str:
    """A stable hash of a call's inputs (memory addresses in reprs are ignored), the same in
    every process: sets are taken in sorted order (see :func:`canonical`), and with
    ``sort_keys`` so are the keys of dicts (a tool's arguments, whose order the model chooses)."""

    try:
        found = canonical(value, sort_keys=sort_keys, hashing=True)
        data = pydantic_core.to_json(found, fallback=_stable_repr)
    except Exception:  # no JSON for it (bytes that are not UTF-8, a dict that holds itself)
        data = _stable_repr(value).encode()
    return hashlib.sha256(data).hexdigest()


def canonical(value: Any, *, sort_keys: bool = False, hashing: bool = False) -> Any:
    """``value`` with its sets as sorted lists, wherever they are: in dicts, lists and tuples,
    and in pydantic models and dataclasses, which are then given as pydantic's JSON-able form
    of them. A set's order is its hash seed's and its history's, so JSON of it in that order
    differs from one process, or one building of the set, to the next, and so would a hash of
    it or its stored text. With ``sort_keys``, the keys of dicts (not of models) are sorted too.
    ``hashing`` is for a hash, not for text to be read back: an object with no JSON is taken
    as its repr, and a set that is a dict's key as the tuple of its sorted items.

    A model or dataclass whose sets were in sorted order already, or that has none, is left as
    it is: its JSON is what it was before their sets were sorted, so hashes journaled then still
    match.
    """
    if isinstance(value, set | frozenset):
        items = [canonical(item, sort_keys=sort_keys, hashing=hashing) for item in value]
        return sorted(items, key=_sort_key)
    if isinstance(value, dict):
        pairs = [
            (
                tuple(canonical(key))
                if hashing and isinstance(key, frozenset) and not _order_unseeded(key)
                else key,
                canonical(item, sort_keys=sort_keys, hashing=hashing),
            )
            for key, item in value.items()
        ]
        return dict(sorted(pairs, key=lambda pair: str(pair[0])) if sort_keys else pairs)
    if isinstance(value, list | tuple):
        return [canonical(item, sort_keys=sort_keys, hashing=hashing) for item in value]
    if isinstance(value, str | int | float | bytes | None):
        return value
    # Pydantic writes the sets of a model or a dataclass in their order: its JSON-able form of
    # the object is taken, and the arrays in it that were sets are sorted.
    fallback = _stable_repr if hashing else None
    data = pydantic_core.to_jsonable_python(value, fallback=fallback)
    ordered = _sets_sorted(value, data)
    return value if ordered is data else ordered


def _sets_sorted(obj: Any, data: Any) -> Any:
    """``data``, pydantic's JSON-able form of ``obj``, with the arrays it made of the sets in
    ``obj`` sorted; ``data`` itself when they all were already. Walked side by side: pydantic
    wrote each set in the order it iterates in now. Where a serializer of the user's made
    something else of a part (another shape), that part is left as it is."""
    if isinstance(obj, set | frozenset):
        if not isinstance(data, list) or len(data) != len(obj) or _order_unseeded(obj):
            return data
        items = [_sets_sorted(item, found) for item, found in zip(obj, data, strict=True)]
        items.sort(key=_sort_key)
        return data if all(a is b for a, b in zip(items, data, strict=True)) else items
    if isinstance(obj, RootModel):
        return _sets_sorted(obj.root, data)
    changed: dict[Any, Any] = {}
    for key, part in _parts(obj, data):
        ordered = _sets_sorted(part, data[key])
        if ordered is not data[key]:
            changed[key] = ordered
    if not changed:
        return data
    if isinstance(data, list):
        return [changed.get(index, item) for index, item in enumerate(data)]
    return {**data, **changed}


#: Values whose hash is the same in every process: numbers (str's and bytes' depend on the hash
#: seed), and None from Python 3.12 (before, its hash was its address).
_UNSEEDED: tuple[type, ...] = (int, float, complex, decimal.Decimal, fractions.Fraction)
if sys.version_info >= (3, 12):
    _UNSEEDED += (type(None),)


def _order_unseeded(items: set[Any] | frozenset[Any]) -> bool:
    """Whether a set of ``items``, built the same way, iterates in the same order in every
    process: their hashes, which place them, do not depend on the hash seed (numbers and None,
    and tuples and frozensets of them). Such a set in a model or dataclass is left in that
    order, as the version before sets were sorted wrote it, so that journals written then still
    resume; the cost is that the same numbers added in another order may iterate otherwise
    (when two of them collide in the set's table), and then hash otherwise."""
    return all(
        isinstance(item, _UNSEEDED)
        or (isinstance(item, tuple | frozenset) and _order_unseeded(frozenset(item)))
        for item in items
    )


def _parts(obj: Any, data: Any) -> list[tuple[Any, Any]]:
    """The parts of ``obj`` (items, fields) that may hold sets, each with its key in ``data``
    (its JSON-able form)."""
    if isinstance(obj, list | tuple) and isinstance(data, list) and len(data) == len(obj):
        return list(enumerate(obj))
    if not isinstance(data, dict):
        return []
    if isinstance(obj, dict):
        # Keys that are one in JSON (1 and "1") make fewer: then they cannot be told apart.
        return list(zip(data, obj.values(), strict=True)) if len(data) == len(obj) else []
    cls = type(obj)
    fields = getattr(cls, "__pydantic_fields__", None)  # models and pydantic's dataclasses
    if isinstance(fields, dict):
        named = [(info.serialization_alias or name, name) for name, info in fields.items()]
        computed = getattr(cls, "__pydantic_computed_fields__", None) or {}
        named += [(info.alias or name, name) for name, info in computed.items()]
        parts = [(key, getattr(obj, name, None)) for key, name in named]
        parts += list((getattr(obj, "__pydantic_extra__", None) or {}).items())
    elif dataclasses.is_dataclass(obj):
        parts = [(field.name, getattr(obj, field.name)) for field in dataclasses.fields(obj)]
    else:
        return []
    return [(key, part) for key, part in parts if key in data]


def _sort_key(value: Any) -> bytes:
    try:
        return pydantic_core.to_json(value, fallback=_stable_repr)
    except Exception:
        return _stable_repr(value).encode()


def _stable_repr(value: Any) -> str:
    return _ADDRESS.sub("", repr_of(value))


class DurableRun:
    """The journal of one run, loaded at its start, and where new steps are recorded.

    ``replay_only`` runs (``kagura.testing.replay``) never call out: a step missing from the
    journal is an error, and nothing is written. ``replayed`` counts the steps this execution
    took from the journal, ``recorded`` those it ran and journaled.
    """

    __slots__ = (
        "_by_inputs",
        "_by_position",
        "_taken",
        "journal",
        "main_task",
        "owner",
        "recorded",
        "replay_only",
        "replayed",
        "run_id",
        "steps",
    )

    def __init__(
        self,
        run_id: str,
        journal: Journal | None,
        steps: dict[str, StepRecord],
        *,
        owner: str = "",
        replay_only: bool = False,
    ) -> None:
        self.run_id: str = run_id
        self.journal: Journal | None = journal
        self.owner: str = owner
        self.steps: dict[str, StepRecord] = steps
        self.replay_only: bool = replay_only
        self.replayed: int = 0
        self.recorded: int = 0
        self._by_position: dict[tuple[str, int], StepRecord] | None = None
        #: The journal's steps by parent, name, kind and inputs (made when first needed).
        self._by_inputs: dict[tuple[str, str, str, str], list[StepRecord]] | None = None
        #: Keys of the journaled steps this execution has replayed or recorded.
        self._taken: set[str] = set()
        #: The task that runs the workflow's own code, once it runs (others are its branches).
        self.main_task: asyncio.Task[Any] | None = None

    def lookup(
        self, key: str, name: str, kind: str, digest: str, position: int = -1
    ) -> StepRecord | None:
        """The journaled step this call replays, or ``None`` if it is to run and be recorded; raises
        :class:`NonDeterminismError` when the journal has another step in its place."""
        record = self.steps.get(key)
        if record is not None and (record.name != name or record.kind != kind):
            raise NonDeterminismError(
                key,
                f"the journal has {record.kind} {record.name!r} here, the code now calls "
                f"{kind} {name!r}{_WAY_ON}",
            )
        if record is not None and record.input_hash == digest and key not in self._taken:
            return self._replayed(record)
        # Calls of one name started in parallel branches after other awaits are numbered in the
        # order they start, which a resumed run (its earlier calls answered from the journal at
        # once) need not repeat: a sibling of this name journaled with these very inputs is
        # this call.
        sibling = self._sibling(key, name, kind, digest)
        if sibling is not None:
            return self._replayed(sibling)
        if record is None:
            if self.replay_only:
                raise NonDeterminismError(
                    key, f"{kind} {name!r} is not in the journal of run {self.run_id!r}"
                )
            # A branch's steps take their places among their parent's in the order they start,
            # which a resumed run need not repeat either: only the workflow's own sequence of
            # steps tells a renamed one.
            if kind != "tool" and position >= 0 and not self._in_branch():
                self._check_position(key, name, kind, position)
            return None
        if kind == "tool" and not self.replay_only:
            # The agent around this tool call is running again, and a model need not ask for
            # the same arguments twice: run the tool anew rather than fail the run.
            return None
        raise NonDeterminismError(key, self._other_inputs(key, name, kind))

    def _replayed(self, record: StepRecord) -> StepRecord:
        self._taken.add(record.step_key)
        self.replayed += 1
        return record

    def _in_branch(self) -> bool:
        """Whether the running task is another than the workflow's own (a parallel branch)."""
        return self.main_task is not None and asyncio.current_task() is not self.main_task

    def _sibling(self, key: str, name: str, kind: str, digest: str) -> StepRecord | None:
        """A call of ``name`` under the same parent as ``key`` with these inputs, journaled by
        an earlier execution, that this execution has not replayed yet."""
        if self._by_inputs is None:
            self._by_inputs = {}
            for record in self.steps.values():
                found = (
                    record.step_key.rpartition("/")[0],
                    record.name,
                    record.kind,
                    record.input_hash,
                )
                self._by_inputs.setdefault(found, []).append(record)
        wanted = (key.rpartition("/")[0], name, kind, digest)
        for record in self._by_inputs.get(wanted, ()):
            if record.step_key not in self._taken:
                return record
        return None

    def _other_inputs(self, key: str, name: str, kind: str) -> str:
        said = f"{kind} {name!r} is called with other inputs than the journal recorded"
        parent = key.rpartition("/")[0]
        journaled = sum(
            1
            for r in self.steps.values()
            if r.name == name and r.kind == kind and r.step_key.rpartition("/")[0] == parent
        )
        if journaled > 1 or self._in_branch():
            # Maybe not another path: calls started in parallel, in another order.
            said += (
                f" (or, if calls of {name!r} are started in parallel after other awaits, the one "
                f"with these inputs had not been journaled: such calls are numbered in the order "
                f"they start, which a resumed run need not repeat; give each its own name, such "
                f'as step(f"{name} {{item}}", ...) around the call, for runs started from now on)'
            )
            return said
        return said + _WAY_ON

    def _check_position(self, key: str, name: str, kind: str, position: int) -> None:
        """A new step where the journal has another one (renamed, replaced or reordered code)."""
        if self._by_position is None:
            self._by_position = {
                (r.step_key.rpartition("/")[0], r.position): r
                for r in self.steps.values()
                if r.position is not None and r.kind != "tool"
            }
        there = self._by_position.get((key.rpartition("/")[0], position))
        if there is not None and there.step_key != key:
            raise NonDeterminismError(
                key,
                f"the journal has {there.kind} {there.name!r} ({there.step_key}) at this point "
                f"of the run, the code now calls {kind} {name!r}{_WAY_ON}",
            )

    def check_held(self) -> None:
        """Raise :class:`~kagura.errors.RunTakenOverError` if this process is known to hold the
        run no more: a new step is not begun for a run whose steps can no longer be journaled
        (another process has the run, and runs the step too). Code that catches the error of
        a refused commit and goes on is stopped at its next step."""
        journal = self.journal
        if journal is not None and journal.lost(self.run_id, self.owner):
            raise RunTakenOverError(self.run_id)

    async def record(
        self,
        key: str,
        name: str,
        kind: str,
        digest: str,
        output: str | None,
        position: int = -1,
    ) -> None:
        """Journal a completed step and return once it is committed: nothing of the workflow
        sees the step's result before it is durable. Raises
        :class:`~kagura.errors.RunTakenOverError` when another process has taken the run over
        (the step is then not journaled), :class:`~kagura.errors.StoreError` when the store
        cannot be written."""
        if self.replay_only or self.journal is None:
            return
        pos = position if position >= 0 else None
        await self.journal.commit_step(
            self.run_id, self.owner, key, name, kind, digest, output, pos
        )
        self.steps[key] = StepRecord(key, name, kind, digest, output, None, pos)
        # This execution's own: no later call with the same inputs replays it.
        self._taken.add(key)
        self.recorded += 1


current_durable_run: ContextVar[DurableRun | None] = ContextVar("kagura_durable_run", default=None)


async def journaled(
    durable: DurableRun | None,
    span: Span,
    kind: str,
    inputs: Any,
    run: Callable[[], Awaitable[T]],
    *,
    dump: Callable[[T], str | None],
    load: Callable[[str | None], T],
    position: int = -1,
) -> tuple[T, bool]:
    """One journaled step of ``durable`` (an agent call, a tool call or a :func:`step`, named
    ``span.name``): its recorded result when the journal has it, without calling ``run``; else
    ``run()``'s, journaled before it is returned, so that a crash from then on never runs it
    again. Returns the result, and whether it came from the journal. ``dump`` and ``load``
    turn a result into the journal's JSON text and back; ``position`` is the step's place among
    its siblings (checked against the journal, except for tool calls). Outside a durable run
    (``durable`` is ``None``) it is ``run()``."""
    if durable is None:
        return await run(), False
    # A tool's arguments are the model's: the same call may come with its keys in another order.
    digest = input_hash(inputs, sort_keys=kind == "tool")
    record = durable.lookup(span.step_key, span.name, kind, digest, position)
    if record is not None:
        return read_back(span, kind, load, record.output), True
    durable.check_held()
    result = await run()
    await durable.record(span.step_key, span.name, kind, digest, dump(result), position)
    return result, False


def read_back(span: Span, kind: str, load: Callable[[str | None], T], output: str | None) -> T:
    """A journaled step's result, read back with ``load``; a
    :class:`~kagura.errors.NonDeterminismError` if it no longer reads as the step's type."""
    try:
        return load(output)
    except ValueError as exc:  # pydantic's ValidationError among them
        # Its result type changed since it was journaled: another path, as other inputs are.
        raise NonDeterminismError(
            span.step_key,
            f"the journal's result of {kind} {span.name!r} does not read back as the type it "
            f"returns now ({describe_error(exc)}); resume the run with the code it was "
            f"started with",
        ) from exc


# Two overloads: with ``Awaitable[T] | T`` alone, mypy cannot solve T for an async ``fn``.
# ``name`` and ``fn`` are positional-only: ``fn`` may take keywords called ``name`` or ``fn``.
@overload
async def step(
    name: str, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
) -> T: ...
@overload
async def step(name: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...
async def step(
    name: str, fn: Callable[P, Awaitable[T] | T], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    """Run ``fn(*args, **kwargs)`` as a named, recorded step of the current workflow.

    In a durable run the step's result is journaled, and a resumed run returns it without
    calling ``fn`` again: use it for side effects that must happen once (charging a card,
    sending an email). The journal entry is committed before ``step`` returns (as for agent and
    tool calls), so nothing after the step runs until it is; a process that dies between
    ``fn``'s effect and that commit runs ``fn`` again on resume: steps run at least once, so
    give the effect an idempotency key where the service takes one.
    The result must be JSON-serialisable; on replay it is validated against ``fn``'s return
    annotation when it has one. Outside a durable run it just runs and records.
    """
    # A step's name may be made of data (f"store {doc}"), and is a part of its journal key:
    # refused one, a run that worked would fail. Commands show it with its escapes instead.
    if isinstance(name, str) and looks_secret(name):
        # Made of data, it may hold a URL with its password (f"upload {url}"), which the name
        # columns would keep and OpenTelemetry export as they are: redacted as recorded values
        # are. The same name redacts the same way, so a resumed run finds its steps. Checked
        # after: the redacted name is the one stored, and may be the longer.
        name = redact_text(name)
    checked_name("step", name, plain=False)
    ensure_recording()
    span = Span("step", name, current_span.get())
    token = current_span.set(span)
    span_started(span, {"inputs": by_name(_signature(fn), args, kwargs)})

    async def run() -> T:
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return cast(T, result)  # the awaited result of fn: its declared T

    try:
        value, replayed = await journaled(
            current_durable_run.get(),
            span,
            "step",
            {"args": args, "kwargs": kwargs},
            run,
            dump=lambda v: _dump_step(name, v, fn),
            load=lambda output: cast(T, _load(output, fn)),
            position=span.position,
        )
    except BaseException as exc:
        span_finished(span, status_of(exc), exc)
        raise
    finally:
        current_span.reset(token)
    attributes = {"output": value, "replayed": True} if replayed else {"output": value}
    span_finished(span, "completed", attributes=attributes)
    return value


def _dump_step(name: str, value: Any, fn: Callable[..., Any]) -> str:
    """The step's result as the journal keeps it, refused (its effect has happened: the error
    says so) when a resumed run could not replay it: it has no JSON, or its JSON does not read
    back as ``fn``'s return annotation, which is how a replay reads it."""
    try:
        text = pydantic_core.to_json(value).decode()
    except Exception as exc:
        raise UsageError(
            f"step {name!r}: its result cannot be journaled, so a resumed run could not replay "
            f"it ({exc}); return a JSON value (str, numbers, lists, dicts, pydantic models)"
        ) from exc
    found = _returned(fn)
    if found is not None:
        reads_back(text, found[1], found[0], f"step {name!r}", "a resumed run could not replay it")
    return text


def _load(output: str | None, fn: Callable[..., Any]) -> Any:
    found = _returned(fn)
    return from_journal(output, None if found is None else found[1])


def from_journal(text: str | None, adapter: TypeAdapter[Any] | None) -> Any:
    """A journaled result (its JSON, ``None`` for none) as a replay gives it: read through the
    validator of its function's return annotation, or as JSON as it is without one."""
    if text is None:
        return None
    if adapter is None:
        return pydantic_core.from_json(text)
    return adapter.validate_json(text)


# Kept per function, weakly (a function made per call goes with its call, and what it holds):
# a step's function is usually one of a few, and reading its signature or making its validator
# takes longer than the step's own bookkeeping.
_signatures: weakref.WeakKeyDictionary[Any, inspect.Signature | None] = weakref.WeakKeyDictionary()
_validators: weakref.WeakKeyDictionary[Any, tuple[Any, TypeAdapter[Any]] | None] = (
    weakref.WeakKeyDictionary()
)


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    """``fn``'s signature, for its step's arguments to be recorded by name."""
    return _kept(_signatures, fn, signature_of)


def _returned(fn: Callable[..., Any]) -> tuple[Any, TypeAdapter[Any]] | None:
    """``fn``'s return annotation and its validator; ``None`` when it has none, or none that
    can be resolved or validated (its result is then JSON as it is)."""
    # Kept by function: a bound method is made anew at each access, its function is not.
    return _kept(_validators, fn, _validator, key=getattr(fn, "__func__", fn))


_K = TypeVar("_K")


def _kept(
    cache: weakref.WeakKeyDictionary[Any, _K],
    fn: Callable[..., Any],
    make: Callable[[Callable[..., Any]], _K],
    key: Any = None,
) -> _K:
    """``make(fn)``, kept in ``cache`` while its key (``fn`` by default) lives; made each time
    for a key that cannot be kept (no weak reference to it, or no hash)."""
    key = fn if key is None else key
    try:
        return cache[key]
    except KeyError:
        found = cache[key] = make(fn)
        return found
    except TypeError:
        return make(fn)


def reads_back(text: str, adapter: TypeAdapter[Any], hint: Any, what: str, so: str) -> None:
    """Raise :class:`~kagura.errors.UsageError` unless ``text`` (a result's JSON, about to be
    journaled) reads back through ``adapter``, as a replay will read it: ``what`` names the
    result, ``so`` what could then not be done."""
    try:
        adapter.validate_json(text)
    except ValueError as exc:  # pydantic's ValidationError among them
        raise UsageError(
            f"{what}: its result {text[:100]} does not read back as its return type "
            f"{type_name(hint)} ({describe_error(exc)}), so {so}; return what the annotation "
            f"says, or change it"
        ) from exc


def _validator(fn: Callable[..., Any]) -> tuple[Any, TypeAdapter[Any]] | None:
    try:
        hint = get_type_hints(fn).get("return")
        return None if hint is None else (hint, TypeAdapter(hint))
    except Exception:
        return None


def type_name(hint: Any) -> str:
    """A type as code names it: ``str``, ``Order``, ``list[int]``."""
    return hint.__name__ if isinstance(hint, type) and not get_args(hint) else repr(hint)
