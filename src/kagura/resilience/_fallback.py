"""Fallback chains: try options in order until one answers; the answer says which one did.

Options are any async callables taking the same arguments: agents, the same agent on another
model (``my_agent.using("local/smollm2")``), or plain functions. A ``default`` value answers when
every option failed. Cancellation is never a reason to fall back: it propagates.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, TypeVar

from .._context import Span, current_span
from .._instrument import span_event
from .._redact import str_of
from ..errors import UsageError

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
            error is raised, with the earlier ones attached as notes.
        on: the exception types that move on to the next option (default: any ``Exception``).
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
        self.options = options
        self.default = default
        self.on = on

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Answer[T]:
        errors: list[tuple[str, Exception]] = []
        for option in self.options:
            name = _name(option)
            try:
                value = await option(*args, **kwargs)
            except self.on as error:
                errors.append((name, error))
                record_fallback(current_span.get(), name, None, error)
                continue
            return Answer(value, name, tuple(errors))
        if self.default is not _NO_DEFAULT:
            return Answer(self.default, "default", tuple(errors))
        last = errors[-1][1]
        for earlier_name, earlier in errors[:-1]:
            last.add_note(
                f"kagura: fallback option {earlier_name!r} failed first: "
                f"{type(earlier).__name__}: {earlier}"
            )
        raise last


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
