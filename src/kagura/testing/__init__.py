"""Test doubles for Kagura programs: a scriptable fake model, a model override and an event capture.

The model string ``"fake"`` resolves to a :class:`FakeModel` that answers at once with a
deterministic echo of the prompt (or, when a JSON schema is asked for, with the smallest value that
fits it). In tests, script its answers, errors and latency per call::

    fake = FakeModel(["positive", ProviderError("boom", status_code=503), Reply("ok", delay=0.2)])
    with override_model(fake):
        await my_workflow("text")
    assert len(fake.requests) == 3

It streams too (``agent.stream(...)``): a reply's text a word at a time, or the ``chunks`` it is
given, among which an exception breaks the stream at that point::

    FakeModel([Reply(chunks=("Hello", ", wor", ProviderConnectionError("reset")))])
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, overload

from .._events import Event, SpanEvent, SpanFinished, SpanStarted
from .._instrument import add_sink, remove_sink
from ..providers import Model, model_override_var
from ..providers.fake import FakeModel, Reply
from ._network import in_private_network

if TYPE_CHECKING:  # for annotations only: not a name this module offers (tests/test_exports.py)
    from ..durable._execute import WorkflowOf

__all__ = [
    "CapturedEvents",
    "FakeModel",
    "Reply",
    "capture_events",
    "in_private_network",
    "override_model",
    "replay",
]


_M = TypeVar("_M", bound=Model)
_R = TypeVar("_R")


# Two overloads: given the workflow, its result type; else the run's own workflow, whose type
# is not known until it is imported.
@overload
async def replay(run_id: str, workflow: WorkflowOf[_R], *, db: str | None = None) -> _R: ...
@overload
async def replay(run_id: str, workflow: None = None, *, db: str | None = None) -> Any: ...
async def replay(
    run_id: str, workflow: WorkflowOf[Any] | None = None, *, db: str | None = None
) -> Any:
    """Run durable run ``run_id`` again against its journal alone, with no provider at all: a
    check that a changed workflow still follows yesterday's real traffic. Returns its result;
    a step the journal lacks (or that changed) raises :class:`kagura.NonDeterminismError`.
    ``workflow`` defaults to the one the run recorded; pass the new version to check it."""
    from ..durable import replay as replay_run

    return await replay_run(run_id, workflow, db=db)


@contextmanager
def override_model(model: _M) -> Iterator[_M]:
    """Make every agent call in this context (and tasks it starts) use ``model``."""
    token = model_override_var.set(model)
    try:
        yield model
    finally:
        model_override_var.reset(token)


@dataclass
class CapturedEvents:
    """Every instrumentation record emitted inside :func:`capture_events`, in order."""

    events: list[Event] = field(default_factory=list)

    def handle(self, event: Event) -> None:
        """Keep ``event``."""
        self.events.append(event)

    @property
    def finished(self) -> list[SpanFinished]:
        return [e for e in self.events if isinstance(e, SpanFinished)]

    @property
    def started(self) -> list[SpanStarted]:
        return [e for e in self.events if isinstance(e, SpanStarted)]

    @property
    def span_events(self) -> list[SpanEvent]:
        return [e for e in self.events if isinstance(e, SpanEvent)]

    def spans(self, kind: str | None = None, name: str | None = None) -> list[SpanFinished]:
        """The finished spans, of ``kind`` and named ``name`` when given."""
        return [
            e
            for e in self.finished
            if (kind is None or e.kind == kind) and (name is None or e.name == name)
        ]


@contextmanager
def capture_events() -> Iterator[CapturedEvents]:
    """Collect the spans and events Kagura emits while the block runs."""
    sink = CapturedEvents()
    add_sink(sink)
    try:
        yield sink
    finally:
        remove_sink(sink)
