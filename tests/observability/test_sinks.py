"""The sink protocol, as users see it from ``kagura.observability``: a sink installed with
``add_sink`` gets frozen records of every span's start and finish, and events inside spans."""

from __future__ import annotations

import dataclasses

import pytest

from kagura import agent
from kagura.observability import (
    Event,
    Sink,
    SpanEvent,
    SpanFinished,
    SpanStarted,
    add_sink,
    remove_sink,
)
from kagura.testing import FakeModel, override_model


class Collect:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def handle(self, event: Event) -> None:
        self.events.append(event)


@agent
async def greet(name: str) -> str:
    """Greet {{ name }}."""


async def test_a_sink_gets_frozen_records_of_every_span() -> None:
    sink = Collect()
    assert isinstance(sink, Sink)
    add_sink(sink)
    try:
        with override_model(FakeModel()):
            assert await greet("Ada") == "Greet Ada."
    finally:
        remove_sink(sink)
    kinds = [(type(e).__name__, getattr(e, "kind", None)) for e in sink.events]
    assert kinds == [
        ("SpanStarted", "agent"),
        ("SpanStarted", "llm"),
        ("SpanFinished", "llm"),
        ("SpanFinished", "agent"),
    ]
    started, finished = sink.events[0], sink.events[-1]
    assert isinstance(started, SpanStarted) and isinstance(finished, SpanFinished)
    assert (finished.span_id, finished.status) == (started.span_id, "completed")
    with pytest.raises(dataclasses.FrozenInstanceError):
        finished.status = "failed"  # type: ignore[misc]


def test_the_records_are_frozen_dataclasses() -> None:
    for record in (SpanStarted, SpanFinished, SpanEvent):
        assert dataclasses.is_dataclass(record)
        assert record.__dataclass_params__.frozen  # type: ignore[attr-defined]
