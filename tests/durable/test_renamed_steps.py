"""A resumed run whose code renamed or replaced a step fails loudly instead of mixing results."""

from __future__ import annotations

import pytest

from kagura import NonDeterminismError, agent, step, workflow
from kagura.testing import FakeModel

pytestmark = pytest.mark.usefixtures("db")


async def test_a_step_renamed_since_the_journal_was_written_is_named_in_the_error() -> None:
    model = FakeModel()

    @agent(model=model, retry=False)
    async def outline(topic: str) -> str:
        """Outline {{ topic }}"""

    @agent(model=model, retry=False)
    async def sketch(topic: str) -> str:
        """Sketch {{ topic }}"""

    calls = 0

    def fail_once(_: str) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("crash after the first step")
        return "done"

    @workflow(durable=True, name="essay")
    async def first_version(topic: str) -> str:
        plan = await outline(topic)
        return await step("finish", fail_once, plan)

    with pytest.raises(RuntimeError):
        await first_version.run("tides", run_id="renamed-1")

    @workflow(durable=True, name="essay")
    async def second_version(topic: str) -> str:
        plan = await sketch(topic)  # the first step is now another agent
        return await step("finish", fail_once, plan)

    with pytest.raises(NonDeterminismError) as caught:
        await second_version.resume("renamed-1")
    assert caught.value.step_key == "essay/sketch#0"
    assert "outline" in str(caught.value) and "sketch" in str(caught.value)
    assert calls == 1  # nothing after the changed step ran


async def test_an_unchanged_workflow_resumes_past_the_same_steps() -> None:
    model = FakeModel()

    @agent(model=model, retry=False)
    async def outline(topic: str) -> str:
        """Outline {{ topic }}"""

    attempts = 0

    def fail_once(plan: str) -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("crash")
        return plan.upper()

    @workflow(durable=True, name="essay2")
    async def essay(topic: str) -> str:
        plan = await outline(topic)
        return await step("finish", fail_once, plan)

    with pytest.raises(RuntimeError):
        await essay.run("tides", run_id="same-1")
    assert await essay.resume("same-1") == "OUTLINE TIDES"
    assert len(model.requests) == 1  # the outline came from the journal


async def test_a_run_id_started_again_with_other_arguments_is_refused() -> None:
    from kagura import UsageError

    @agent(model=FakeModel(), retry=False)
    async def outline(topic: str) -> str:
        """Outline {{ topic }}"""

    @workflow(durable=True, name="essay3")
    async def essay(topic: str) -> str:
        return await outline(topic)

    assert await essay.run("tides", run_id="args-1") == "Outline tides"
    with pytest.raises(UsageError, match="other arguments"):
        await essay.run("volcanoes", run_id="args-1")
    assert await essay.run("tides", run_id="args-1") == "Outline tides"
