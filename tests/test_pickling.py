"""What travels to another process (a kagura.ray worker) comes back whole: errors with their
attributes and notes, agents, tools and workflows with their annotations resolved."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kagura import errors


@pytest.mark.parametrize(
    "error",
    [
        errors.ProviderError("slow down", model="m", status_code=429, headers={"Retry-After": "2"}),
        errors.ProviderTimeout("no answer", model="m"),
        errors.CircuitOpenError("openai/gpt", 1.5),
        errors.RunFailedError("run-1", "boom", "ValueError"),
        errors.RunCancelledError("run-1"),
        errors.RunTakenOverError("run-1", "lease ran out"),
        errors.NonDeterminismError("wf/agent#0", "renamed"),
        errors.UsageError("bad"),
        errors.WorkerLostError(7, 3),
    ],
)
def test_an_error_pickles_with_its_attributes_and_notes(error: errors.KaguraError) -> None:
    error.add_note("kagura: a note")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error) and copy.args == error.args
    assert vars(copy) == vars(error)


def test_a_script_with_postponed_annotations_sends_its_agents_to_another_process(
    tmp_path: Path,
) -> None:
    # Under `from __future__ import annotations` an annotation is text; a type named only there
    # (Literal) is not among the globals cloudpickle sends with the function.
    script = tmp_path / "triage.py"
    script.write_text(
        textwrap.dedent(
            '''
            from __future__ import annotations

            import asyncio
            import subprocess
            import sys
            from typing import Literal

            from ray import cloudpickle

            from kagura import agent, tool, workflow


            @tool
            def lookup(code: Literal["a", "b"]) -> str:
                """Look a code up."""
                return code


            @agent(model="fake", tools=[lookup])
            async def triage(text: str) -> Literal["bug", "question"]:
                """Triage {{ text }}"""


            @workflow
            async def flow(ticket: Literal["a"]) -> Literal["bug", "question"]:
                return await triage(ticket)


            if __name__ == "__main__":
                sent = cloudpickle.dumps((triage, flow))
                load = (
                    "import asyncio, sys; from ray import cloudpickle; "
                    "agent, flow = cloudpickle.loads(sys.stdin.buffer.read()); "
                    "print(agent.output.schema is not None, asyncio.run(flow('a')))"
                )
                done = subprocess.run(
                    [sys.executable, "-c", load], input=sent, capture_output=True
                )
                sys.stdout.write(done.stdout.decode() + done.stderr.decode())
            '''
        )
    )
    pytest.importorskip("ray")  # its cloudpickle: what kagura.ray pickles with
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.stdout.strip().endswith("bug"), done.stdout + done.stderr


def test_an_agent_leaves_its_api_key_behind() -> None:
    cloudpickle = pytest.importorskip("ray.cloudpickle")
    from kagura import agent

    @agent(model="openai/gpt-4o-mini", api_key="sk-secret-value")
    async def ask(question: str) -> str:
        """{{ question }}"""

    copy = cloudpickle.loads(cloudpickle.dumps(ask))
    assert b"sk-secret-value" not in cloudpickle.dumps(ask)
    assert copy.model == "openai/gpt-4o-mini" and copy._api_key is None


def test_an_agent_on_another_model_pickles_as_itself() -> None:
    cloudpickle = pytest.importorskip("ray.cloudpickle")
    from kagura import agent

    @agent(model="fake", retry=False)
    async def ask(question: str) -> str:
        """{{ question }}"""

    other = ask.using("fake/other")
    copy = cloudpickle.loads(cloudpickle.dumps(other))
    assert (copy.name, copy.model) == ("ask@fake/other", "fake/other")
    assert copy.policies == ask.policies
