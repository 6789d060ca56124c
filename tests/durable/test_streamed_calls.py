"""Streamed agent calls in durable runs: journaled when they finish, before the reader sees the
end of the stream; a resumed run yields the journaled result as one item, with no provider call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import kagura
from kagura import agent, workflow
from kagura.durable import Journal, journal_for
from kagura.testing import FakeModel, override_model

from . import workflows


class Note(BaseModel):
    title: str
    words: int


@agent(model="fake/echo")
async def tell(topic: str) -> str:
    """Tell a story about {{ topic }}."""


@agent(model="fake/echo")
async def note(topic: str) -> Note:
    """A note about {{ topic }}."""


#: What each execution of the workflow found journaled when its first stream had ended.
SEEN: list[list[tuple[str, str]]] = []


def journaled(run_id: str) -> list[tuple[str, str]]:
    return sorted((s.name, s.kind) for s in journal_for().load_steps(run_id).values())


@workflow(durable=True)
async def storyteller(topic: str, gate: str) -> dict[str, Any]:
    pieces = [piece async for piece in tell.stream(topic)]
    # The stream ended: its result is in the journal already (durable before visible).
    SEEN.append(journaled(kagura.current_run_id() or ""))
    notes = [item async for item in note.stream(topic)]
    await kagura.step("gate", workflows.require_file, gate)
    return {"pieces": pieces, "notes": notes}


async def test_a_resumed_run_yields_a_journaled_stream_as_one_item(
    journal: Journal, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    SEEN.clear()
    model = FakeModel()  # an echo, or the simplest value of the schema
    with override_model(model), pytest.raises(FileNotFoundError):
        await storyteller.run("tides", str(gate), run_id="story-1")
    assert len(model.requests) == 2
    assert SEEN == [[("tell", "agent")]]  # journaled before the stream's end reached the run
    steps = journal.load_steps("story-1")
    assert {(s.name, s.kind) for s in steps.values()} == {("tell", "agent"), ("note", "agent")}

    gate.touch()
    with override_model(model):
        result = await storyteller.resume("story-1")
    assert len(model.requests) == 2  # both streamed calls came from the journal
    assert result["pieces"] == ["Tell a story about tides."]  # the whole text, one item
    (replayed_note,) = result["notes"]
    assert replayed_note == Note.model_validate_json(steps["storyteller/note#0"].output or "")
