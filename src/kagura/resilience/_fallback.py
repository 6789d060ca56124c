"""Fallback chains: try options in order until one answers; the answer says which one did.

Options are any async callables taking the same arguments: agents, the same agent on another
model (``my_agent.using("local/smollm2")``), or plain functions. A ``default`` value answers when
every option failed. Cancellation is never a reason to fall back: it propagates.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, TypeVar

from .._context import Span, current_span
from .._instrument import span_event
from .._redact import str_of
from .._tool import awaits_when_called
from ..errors import UsageError
from ._classify import exception_types

P = ParamSpec("P")
T = TypeVar("T")

_NO_DEFAULT: Any = object()


@dataclass(frozen=True, slots=True)
class Answer(Generic[T]):
    """The value, the name of the option that produced it (``"default"`` for the default value),
    and the failures of the options tried before it."""

    value: T
    source: str
    errors: tuple[tuple[str, Exception], ...] = ()

    @property
    def degraded(self) -> bool:
        """True when the first choice did not answer."""
        return bool(self.errors)


def _name(option: Callable[..., Any]) -> str:
    return str(getattr(option, "name", None) or getattr(option, "__qualname__", repr(option)))


class Fallback(Generic[P, T]):
    """Try ``options`` in order: ``await Fallback(fast, reliable, default="n/a")(text)``.

    Args:
        options: async callables tried in order with the call's arguments.
        default: returned (as source ``"default"``) when every option failed; without it the last
            error is raised, with the earlier ones attached as notes and chained as its context.
        on: the exception types that move on to the next option (default: any ``Exception``).
            Cancellation never does, whatever ``on`` says (``BaseException`` included).
    """

    def __init__(
        self,
        *options: Callable[P, Awaitable[T]],
        default: T = _NO_DEFAULT,
        on: type[Exception] | tuple[type[Exception], ...] = Exception,
    ) -> None:
        if not options:
            raise UsageError("Fallback needs at least one option")
        for option in options:
            if not callable(option):
                raise UsageError(
                    f"Fallback's options are async callables (agents, async functions), "
                    f"got {option!r}"
                )
            # Checked here, as Retry(...) checks what it decorates: a sync option would only
            # fail when reached, as a TypeError taken for that option's failure.
            if not awaits_when_called(option):
                raise UsageError(
                    f"Fallback's options are async callables (agents, async functions); "
                    f"{option!r} is not: wrap a sync function in an async def"
                )
        self.options = options
        self.default = default
        self.on: type[BaseException] | tuple[type[BaseException], ...] = exception_types(
            on, "Fallback's on"
        )

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Answer[T]:
        errors: list[tuple[str, Exception]] = []
        for option in self.options:
            name = _name(option)
            try:
                value = await option(*args, **kwargs)
            # Exception, not self.on: a cancellation (a BaseException) always propagates, even
            # under on=BaseException, as Retry never retries one whatever its retry_on says.
            except Exception as error:
                if not isinstance(error, self.on):
                    raise
                errors.append((name, error))
                record_fallback(current_span.get(), name, None, error)
                continue
            return Answer(value, name, tuple(errors))
        if self.default is not _NO_DEFAULT:
            return Answer(self.default, "default", tuple(errors))
        last = errors.pop()[1]
        tried_first(last, errors, "option")
        raise last


def tried_first(
    last: BaseException, errors: Sequence[tuple[str, BaseException]], kind: str
) -> None:
    """Before ``last`` (the last option's error) is raised: the failures of the options tried
    before it, in order, noted on it and chained to it as its context, as they would be had
    each option been tried in the ``except`` of the one before.

    An error may be raised to every call (a shared task's or future's exception): then each
    call would add to it, and keep every earlier call's errors alive. So a note already there
    is not added again, and nothing is added past :data:`_MOST_LINKED` notes or links, which
    no chain of fallbacks, nested ones included, comes near."""
    notes = getattr(last, "__notes__", ())
    for name, earlier in errors:
        note = (
            f"kagura: fallback {kind} {name!r} failed first: {type(earlier).__name__}: "
            f"{str_of(earlier)}"
        )
        if note not in notes and len(notes) < _MOST_LINKED:
            last.add_note(note)
            notes = last.__notes__
    later = last
    for _, earlier in reversed(errors):
        chain = _shown_chain(later)
        end = chain[-1]
        # Never over a context already there, nor into a loop (one error raised twice).
        if (
            end.__context__ is None
            and len(chain) < _MOST_LINKED
            and not {id(e) for e in chain} & {id(e) for e in _shown_chain(earlier)}
        ):
            end.__context__ = earlier
        later = earlier


#: The most notes :func:`tried_first` leaves on an error, and the longest chain it extends.
_MOST_LINKED = 16


def _shown_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the errors a traceback of it shows below it: each one's cause, or else
    its context unless suppressed."""
    chain = [error]
    while True:
        end = chain[-1]
        following = end.__cause__
        if following is None and not end.__suppress_context__:
            following = end.__context__
        if following is None or any(following is e for e in chain):
            return chain
        chain.append(following)


def record_fallback(
    span: Span | None, failed: str, next_: str | None, error: BaseException
) -> None:
    """Record on ``span`` that ``failed`` failed with ``error`` and ``next_`` is tried next
    (``None``: the next option of a :class:`Fallback`, or its default)."""
    attributes = {"failed": failed}
    if next_ is not None:
        attributes["next"] = next_
    attributes["error"] = f"{type(error).__name__}: {str_of(error)}"
    span_event(span, "fallback", **attributes)
