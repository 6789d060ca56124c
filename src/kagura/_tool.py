"""``@tool``: a Python function the model may call, described to it by a JSON schema."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import itertools
import re
from collections.abc import Awaitable, Callable
from typing import Any, Generic, ParamSpec, TypeVar, cast, get_type_hints, overload

import pydantic
import pydantic_core

from ._output import not_json, read_json
from .errors import UsageError
from .providers import ToolSpec

P = ParamSpec("P")
R = TypeVar("R")

_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Params)\s*:\s*$", re.IGNORECASE)
_PARAM = re.compile(r"^\s*(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_OTHER_SECTION = re.compile(
    r"^(Returns?|Yields?|Raises|Examples?|Notes?|Warnings?|See Also|References|Todo)\s*:\s*$",
    re.IGNORECASE,
)


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Description and per-parameter text from a Google-style docstring.

    Hand-written because this small subset is all a tool schema needs, and a docstring-parsing
    dependency would be imported by every program that defines a tool.
    """
    lines = inspect.cleandoc(doc).splitlines()
    description: list[str] = []
    params: dict[str, str] = {}
    section = "description"  # then "args", or "other" for Returns:, Raises:, ...
    param_indent: int | None = None
    current: str | None = None
    for line in lines:
        if _SECTION.match(line):
            section, param_indent, current = "args", None, None
            continue
        if _OTHER_SECTION.match(line) or (
            section == "args" and line[:1].strip() and line.rstrip().endswith(":")
        ):
            section = "other"  # its text describes neither the tool nor a parameter
            continue
        if section == "description":
            description.append(line)
        elif section == "args" and line.strip():
            indent = len(line) - len(line.lstrip())
            match = _PARAM.match(line)
            # A deeper-indented line continues the previous parameter, even if it has a colon.
            if match and (param_indent is None or indent <= param_indent):
                param_indent = indent
                current = match.group(1).lstrip("*")
                params[current] = match.group(2).strip()
            elif current:
                params[current] += " " + line.strip()
    return "\n".join(description).strip(), params


class Tool(Generic[P, R]):
    """A callable the model can request. Calling the tool object directly calls the function."""

    # ``R`` is what calling ``fn`` returns: an async function's coroutine, which calling the
    # tool returns as it is.
    def __init__(self, fn: Callable[P, R], *, name: str | None = None) -> None:
        if not callable(fn) or isinstance(fn, type):
            raise UsageError(f"a tool is a function (sync or async) the model may call, got {fn!r}")
        self.fn = fn
        name = name or getattr(fn, "__name__", None)
        if name is None:
            raise UsageError(f"{fn!r} has no __name__ to call it by: name it, tool(fn, name=...)")
        self.name = name
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.name):
            raise UsageError(f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-'")
        self.is_async: bool = awaits_when_called(fn)
        target = _described(fn)
        description, param_docs = _parse_docstring(_doc_of(fn, target))
        self.description: str = description or self.name
        hints = resolved_hints(target, "tool", self.name)  # the parameters' types are the schema
        fields: dict[str, Any] = {}
        #: Parameters passed by position: a positional-only one cannot be given by name.
        self._positional: tuple[str, ...] = ()
        parameters = inspect.signature(fn).parameters
        #: The keywords a partial binds: its caller's to set, not the model's. Their values
        #: (a user id, a token) stay out of the schema sent to the provider, and a call that
        #: names one is refused rather than allowed to override it. (Bound positionals are
        #: already gone from the partial's signature.)
        self._bound: frozenset[str] = (
            frozenset(fn.keywords) if isinstance(fn, functools.partial) else frozenset()
        )
        #: (field of the arguments model, parameter) pairs.
        self._fields: tuple[tuple[str, str], ...] = ()
        for param in parameters.values():
            if param.name in self._bound:
                continue
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise UsageError(f"tool {self.name!r}: *args and **kwargs cannot be described")
            if param.kind is param.POSITIONAL_ONLY:
                self._positional += (param.name,)
            annotation = hints.get(param.name, Any)
            default = ... if param.default is param.empty else param.default
            name, alias = param.name, None
            if name.startswith("_") or hasattr(pydantic.BaseModel, name):
                # A name pydantic keeps for itself (json, schema, copy, model_config, a private
                # _name) is the model's name for a field of another name.
                taken = {*parameters, *fields}
                alias = name
                name = next(f"arg{n}" for n in itertools.count() if f"arg{n}" not in taken)
            fields[name] = (
                annotation,
                pydantic.Field(default, alias=alias, description=param_docs.get(param.name)),
            )
            self._fields += ((name, param.name),)
        try:
            self._arguments_model: type[pydantic.BaseModel] = pydantic.create_model(
                f"{self.name}_arguments", **fields
            )
            schema = self._arguments_model.model_json_schema()
        except Exception as exc:  # a parameter pydantic cannot describe or name
            raise UsageError(
                f"tool {self.name!r}: its parameters cannot be described to the model as a "
                f"JSON schema: {exc}"
            ) from exc
        schema.pop("title", None)
        self.spec: ToolSpec = ToolSpec(self.name, self.description, schema)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def _refuse_bound(self, arguments: Any) -> None:
        """A partial's bound keywords are not the model's to set (nor shown to it)."""
        bound = sorted(self._bound.intersection(arguments)) if isinstance(arguments, dict) else []
        if bound:
            raise ValueError(
                f"unknown argument(s) {', '.join(bound)}: the tool {self.name!r} takes "
                f"{', '.join(param for _, param in self._fields) or 'no arguments'}"
            )

    def _validate_json(self, text: str) -> pydantic.BaseModel:
        """The arguments the model wrote as the JSON ``text``, validated as the JSON they are
        (pydantic's JSON mode): a strict parameter takes the JSON forms its schema asks for (a
        date's string), and arrays nested past pydantic's limit are a ValidationError that goes
        back to the model, not a RecursionError."""
        if self._bound:
            try:
                given = read_json(text)
            except ValueError:
                given = None  # not JSON: validation says so
            self._refuse_bound(given)
        try:
            return self._arguments_model.model_validate_json(text)
        except pydantic.ValidationError as exc:
            if not not_json(exc):
                raise
            try:
                given = read_json(text)
            except ValueError:
                raise exc from None
        # JSON that pydantic's reader refuses but json.loads reads: a string holding half a
        # character (an escaped lone surrogate, "\ud83d"), as small models write. Taken as
        # json.loads reads it, as all arguments were before they were validated as JSON.
        if not isinstance(given, dict):
            raise ValueError(f"tool arguments must be a JSON object, got {given!r}")
        return self._arguments_model.model_validate(given)

    def _validate_dict(self, arguments: dict[str, Any]) -> pydantic.BaseModel:
        try:
            return self._arguments_model.model_validate(arguments)
        except pydantic.ValidationError as exc:
            try:
                # Not through JSON first: a SecretStr would arrive masked, bytes that are not
                # UTF-8 not at all.
                text = pydantic_core.to_json(arguments)
            except ValueError:
                raise exc from None
        return self._arguments_model.model_validate_json(text)

    async def invoke(self, arguments: str | dict[str, Any]) -> Any:
        """Validate the model's arguments (JSON text or a dict) and run the tool.

        JSON text is validated as JSON (a strict ``date`` parameter takes a date's string). A
        dict is validated as the Python values it holds (a ``date``, a ``SecretStr``, bytes),
        or, when they are not valid so, as the JSON they stand for: a dict read from the
        model's JSON holds a date as its string."""
        if isinstance(arguments, str):
            validated = self._validate_json(arguments.strip() or "{}")
        elif isinstance(arguments, dict):
            self._refuse_bound(arguments)
            validated = self._validate_dict(arguments)
        else:
            raise ValueError(f"tool arguments must be a JSON object, got {arguments!r}")
        kwargs = {param: getattr(validated, field) for field, param in self._fields}
        args = [kwargs.pop(name) for name in self._positional]
        if self.is_async:
            return await cast(Callable[..., Awaitable[Any]], self.fn)(*args, **kwargs)
        # Sync tools run in a worker thread so a slow one cannot stall every other task.
        result = await asyncio.to_thread(self.fn, *args, **kwargs)
        if inspect.isawaitable(result):  # a plain function that returns a coroutine
            result = await result
        return result

    def __reduce__(self) -> tuple[Any, ...]:
        # Made again from the function where it is unpickled (a Ray worker): the arguments
        # model pydantic creates here belongs to no module, so it does not pickle.
        return _tool_from, (with_resolved_annotations(self.fn), self.name)

    def __repr__(self) -> str:
        return f"<Tool {self.name}>"


def _tool_from(fn: Callable[..., Any], name: str) -> Tool[Any, Any]:
    return Tool(fn, name=name)


F = TypeVar("F", bound=Callable[..., Any])


def with_resolved_annotations(fn: F) -> F:
    """``fn`` with its annotations as objects rather than text, before it is pickled for
    another process. cloudpickle sends a function's globals only as far as its code uses them,
    so under ``from __future__ import annotations`` a type named only in an annotation
    (``Literal``, a model class) could not be resolved there. Resolved here, where it can be,
    in place: the annotations then say the same as ``typing.get_type_hints`` does."""
    try:
        hints = get_type_hints(fn, include_extras=True)
    except Exception:
        return fn  # left as it is: the other process says what it cannot resolve
    annotations = getattr(fn, "__annotations__", None)
    if isinstance(annotations, dict) and any(isinstance(v, str) for v in annotations.values()):
        annotations.update(hints)
    return fn


@overload
def tool(fn: Callable[P, R], /) -> Tool[P, R]: ...
@overload
def tool(*, name: str | None = None) -> Callable[[Callable[P, R]], Tool[P, R]]: ...
def tool(
    fn: Callable[P, R] | None = None, /, *, name: str | None = None
) -> Tool[P, R] | Callable[[Callable[P, R]], Tool[P, R]]:
    """Make a function (sync or async) callable by agents. Its docstring describes it to the model;
    an ``Args:`` section describes its parameters."""
    if fn is not None:
        return Tool(fn, name=name)

    def decorate(f: Callable[P, R]) -> Tool[P, R]:
        return Tool(f, name=name)

    return decorate


def as_tool(obj: Tool[Any, Any] | Callable[..., Any]) -> Tool[Any, Any]:
    return obj if isinstance(obj, Tool) else Tool(obj)


def awaits_when_called(fn: object) -> bool:
    """Whether calling ``fn`` returns something to await: an ``async def``, an agent (whose
    ``__call__`` returns its coroutine), or an object whose ``__call__`` is an ``async def``."""
    return (
        asyncio.iscoroutinefunction(fn)
        or asyncio.iscoroutinefunction(type(fn).__call__)
        or bool(getattr(fn, "_is_async_callable", False))
    )


def _described(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What documents and annotates the tool ``fn``: a function itself, a partial's function,
    an agent's function, or a callable object's ``__call__``."""
    target: Any = fn.func if isinstance(fn, functools.partial) else inspect.unwrap(fn)
    if not (inspect.isfunction(target) or inspect.ismethod(target)):
        target = type(target).__call__
    return cast(Callable[..., Any], target)


def _doc_of(fn: Callable[..., Any], target: Callable[..., Any]) -> str:
    """The docstring that describes the tool ``fn``: its own (a callable object's is its
    class's), else its ``__call__``'s; a partial's is its function's, not ``partial``'s. The
    docstring :mod:`dataclasses` gives a class that has none (``Search(index: str)``, its
    signature) describes nothing, so it does not count as the class's own."""
    own = None if isinstance(fn, functools.partial) else fn.__doc__
    cls = type(fn)
    if (
        own
        and dataclasses.is_dataclass(cls)
        and re.fullmatch(re.escape(cls.__name__) + r"\(.*\)", own)
    ):
        own = None
    return own or target.__doc__ or ""


def resolved_hints(
    target: object,
    kind: str,
    name: str,
    *,
    globalns: dict[str, Any] | None = None,
    one: str | None = None,
) -> dict[str, Any]:
    """The type hints of ``target``, what annotates the ``kind`` (tool, agent) ``name``, as
    :func:`typing.get_type_hints` resolves them (in ``globalns`` if given). ``one`` names the
    annotation when only one is resolved (an agent's return annotation).

    An annotation is resolved when the tool or agent is made, so one that cannot be is a
    :class:`~kagura.errors.UsageError` then, with the advice that fits: a name not yet defined
    (a class further down the module, or imported only for the type checker), or text that is
    not a type at all."""
    try:
        return get_type_hints(target, globalns=globalns, include_extras=True)
    except NameError as exc:
        raise UsageError(
            f"{kind} {name!r}: {one or 'its annotations'} cannot be resolved ({exc}): "
            f"annotations are looked up in the module's globals when the {kind} is made, so "
            f"define or import the types they name at module level before the {kind} (not "
            f"after it, in a function, or only under 'if TYPE_CHECKING:')"
        ) from exc
    except Exception as exc:  # not an expression ("list[int"), or one that fails ("int | 3")
        raise UsageError(
            f"{kind} {name!r}: {one or 'an annotation'} is not a type ({type(exc).__name__}: {exc})"
        ) from exc
