"""A resumed run that takes another path than its journal fails with NonDeterminismError naming
the step; ``kagura.testing.replay`` runs a recorded run against its journal alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from kagura import NonDeterminismError, UsageError, Workflow, agent, step, workflow
from kagura.durable import Journal
from kagura.testing import FakeModel, override_model, replay

from . import workflows
from .conftest import lines


async def failed_checked_run(tmp_path: Path) -> Path:
    """Run ``checked`` as ``order-1`` until its check fails: the draft is journaled."""
    gate = tmp_path / "gate"
    with pytest.raises(FileNotFoundError):
        await workflows.checked.run("tea", str(gate), run_id="order-1")
    gate.touch()
    return gate


async def test_an_agent_called_with_other_inputs_is_named(
    journal: Journal, model: FakeModel, tmp_path: Path
) -> None:
    await failed_checked_run(tmp_path)
    with pytest.raises(NonDeterminismError) as changed:
        await workflows.checked_other_inputs.resume("order-1")
    assert changed.value.step_key == "checked/draft#0"
    assert str(changed.value) == (
        "step 'checked/draft#0': agent 'draft' is called with other inputs than the journal "
        "recorded; resume the run with the code it was started with, or do the work again "
        "under a new run id"
    )
    assert len(model.requests) == 1  # nothing was sent for the changed call
    record = journal.get_run("order-1")
    assert record is not None
    assert (record.status, record.error_type) == ("failed", "NonDeterminismError")

    # The code as it was still resumes the run.
    assert await workflows.checked.resume("order-1") == "Review this: Draft a note about tea."
    assert len(model.requests) == 2


async def test_another_call_at_a_journaled_step_key_is_named(
    journal: Journal, model: FakeModel, tmp_path: Path
) -> None:
    await failed_checked_run(tmp_path)
    with pytest.raises(NonDeterminismError) as changed:
        await workflows.checked_step_for_agent.resume("order-1")
    assert changed.value.step_key == "checked/draft#0"
    assert "the journal has agent 'draft' here, the code now calls step 'draft'" in str(
        changed.value
    )
    assert len(model.requests) == 1


async def test_replay_runs_against_the_journal_alone(journal: Journal, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.txt"
    with override_model(FakeModel(name="recording")):
        recorded = await workflows.fanout.run("plums", str(ledger), run_id="yesterday")
    before = journal.get_run("yesterday")
    steps = journal.load_steps("yesterday")

    with override_model(FakeModel(name="replaying")) as offline:
        # The workflow is found from the run's recorded target; no provider, no side effects.
        assert await replay("yesterday") == recorded
        assert await replay("yesterday", workflows.fanout) == recorded
    assert isinstance(offline, FakeModel) and offline.requests == []
    assert lines(ledger) == ["charged plums"]
    assert journal.get_run("yesterday") == before  # nothing written
    assert journal.load_steps("yesterday") == steps


async def test_replay_of_changed_code_names_the_new_step(journal: Journal, tmp_path: Path) -> None:
    with override_model(FakeModel()):
        await workflows.fanout.run("plums", str(tmp_path / "ledger.txt"), run_id="yesterday")
    with override_model(FakeModel()) as offline, pytest.raises(NonDeterminismError) as new:
        await replay("yesterday", workflows.fanout_with_summary)
    assert new.value.step_key == "fanout/summarise#0"
    assert "agent 'summarise' is not in the journal of run 'yesterday'" in str(new.value)
    assert isinstance(offline, FakeModel) and offline.requests == []
    record = journal.get_run("yesterday")
    assert record is not None and record.status == "completed"


class Poem(BaseModel):
    title: str
    lines: list[str]


def poet_v1() -> Workflow[..., str]:
    @agent(model=FakeModel())
    async def writer(topic: str) -> str:
        """Write about {{ topic }}."""

    @workflow(durable=True)
    async def poet(topic: str, gate: str) -> str:
        text = await writer(topic)
        await step("gate", workflows.require_file, gate)
        return text

    return poet


async def failed_poem(tmp_path: Path) -> Path:
    """Run ``poet_v1`` as ``poem`` until its gate fails: the writer's answer is journaled."""
    gate = tmp_path / "gate"
    with pytest.raises(FileNotFoundError):
        await poet_v1().run("tea", str(gate), run_id="poem")
    gate.touch()
    return gate


async def test_a_journaled_result_that_no_longer_reads_as_its_type_is_named(
    journal: Journal, tmp_path: Path
) -> None:
    await failed_poem(tmp_path)

    @agent(model=FakeModel())
    async def writer(topic: str) -> Poem:
        """Write about {{ topic }}."""

    @workflow(durable=True)
    async def poet(topic: str, gate: str) -> str:
        return repr(await writer(topic))

    with pytest.raises(NonDeterminismError) as changed:
        await poet.resume("poem")
    assert changed.value.step_key == "poet/writer#0"
    assert "the journal's result of agent 'writer' does not read back as the type it" in str(
        changed.value
    )
    assert "https://" not in str(changed.value)  # pydantic's words, in a line


async def test_a_journaled_streamed_result_that_no_longer_reads_as_its_type_is_named(
    journal: Journal, tmp_path: Path
) -> None:
    await failed_poem(tmp_path)

    @agent(model=FakeModel())
    async def writer(topic: str) -> Poem:
        """Write about {{ topic }}."""

    @workflow(durable=True)
    async def poet(topic: str, gate: str) -> str:
        return repr([item async for item in writer.stream(topic)])

    with pytest.raises(NonDeterminismError) as changed:
        await poet.resume("poem")
    assert changed.value.step_key == "poet/writer#0"
    assert "the journal's result of agent 'writer' does not read back as the type it" in str(
        changed.value
    )


async def test_a_run_whose_workflow_takes_other_arguments_now_says_so(
    journal: Journal, tmp_path: Path
) -> None:
    await failed_poem(tmp_path)

    @workflow(durable=True)
    async def poet(subject: str, gate: str) -> str:
        return subject

    with pytest.raises(UsageError) as changed:
        await poet.resume("poem")
    assert str(changed.value) == (
        "durable workflow 'poet' no longer takes the arguments its run was started with "
        "(topic, gate): it now takes (subject, gate); resume the run with the code it was "
        "started with"
    )
