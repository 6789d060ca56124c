"""``@workflow``: one recorded run that every agent call inside it joins."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

import kagura
from kagura import Workflow, agent, current_run_id, get_current_span, workflow
from kagura._events import SpanFinished
from kagura.errors import UsageError
from kagura.testing import CapturedEvents, FakeModel, Reply, capture_events, override_model


@agent
async def classify(text: str) -> str:
    """Classify: {{ text }}"""


@agent
async def summarise(text: str) -> str:
    """Summarise: {{ text }}"""


def by_kind(events: CapturedEvents, kind: str) -> list[SpanFinished]:
    return events.spans(kind=kind)


@pytest.fixture
def fake() -> Any:
    model = FakeModel()
    with override_model(model):
        yield model


async def test_bare_and_named_workflows(fake: FakeModel) -> None:
    @workflow
    async def pipeline(text: str) -> str:
        return await summarise(text)

    @workflow(name="custom-name")
    async def other(text: str) -> str:
        return text.upper()

    assert isinstance(pipeline, Workflow)
    assert pipeline.__name__ == "pipeline"
    assert repr(other) == "<Workflow custom-name>"
    with capture_events() as events:
        assert await pipeline("doc") == "Summarise: doc"
        assert await other("x") == "X"
    names = [s.name for s in by_kind(events, "workflow")]
    assert names == ["pipeline", "custom-name"]


async def test_agent_calls_join_the_workflow_run(fake: FakeModel) -> None:
    @workflow
    async def pipeline(text: str) -> list[str]:
        return [await classify(text), await summarise(text)]

    with capture_events() as events:
        await pipeline("doc")
    (run,) = by_kind(events, "workflow")
    assert run.parent_id is None
    assert run.run_id == run.span_id
    assert run.status == "completed"
    assert run.attributes["output"] == ["Classify: doc", "Summarise: doc"]
    agents = by_kind(events, "agent")
    assert [a.name for a in agents] == ["classify", "summarise"]
    for span in agents:
        assert span.run_id == run.run_id
        assert span.parent_id == run.span_id
    for llm in by_kind(events, "llm"):
        assert llm.run_id == run.run_id


async def test_gather_and_create_task_join_the_run(fake: FakeModel) -> None:
    @workflow
    async def fan_out(text: str) -> tuple[Any, ...]:
        gathered = await asyncio.gather(classify(text), summarise(text))
        task = asyncio.create_task(classify("in a task"))
        return (*gathered, await task)

    with capture_events() as events:
        await fan_out("doc")
    (run,) = by_kind(events, "workflow")
    agents = by_kind(events, "agent")
    assert len(agents) == 3
    assert {a.run_id for a in agents} == {run.run_id}
    assert {a.parent_id for a in agents} == {run.span_id}


async def test_nested_workflows_are_children_of_the_same_run(fake: FakeModel) -> None:
    @workflow
    async def inner(text: str) -> str:
        return await summarise(text)

    @workflow
    async def outer(text: str) -> list[str]:
        return list(await asyncio.gather(inner(text), inner(text + "!")))

    with capture_events() as events:
        await outer("doc")
    workflows = {s.span_id: s for s in by_kind(events, "workflow")}
    (root,) = [s for s in workflows.values() if s.name == "outer"]
    inners = [s for s in workflows.values() if s.name == "inner"]
    assert len(inners) == 2
    for child in inners:
        assert child.parent_id == root.span_id
        assert child.run_id == root.run_id
    for agent_span in by_kind(events, "agent"):
        assert workflows[agent_span.parent_id].name == "inner"  # type: ignore[index]
        assert agent_span.run_id == root.run_id


async def test_run_context_is_visible_inside_and_gone_outside(fake: FakeModel) -> None:
    seen: dict[str, Any] = {}

    @workflow
    async def probe() -> None:
        span = get_current_span()
        assert span is not None
        seen["span"] = span
        seen["run_id"] = current_run_id()
        seen["task_run_id"] = await asyncio.create_task(_run_id_in_task())

    assert current_run_id() is None
    await probe()
    assert current_run_id() is None
    assert get_current_span() is None
    assert seen["span"].kind == "workflow"
    assert seen["span"].name == "probe"
    assert seen["run_id"] == seen["span"].run_id == seen["task_run_id"]


async def _run_id_in_task() -> str | None:
    return current_run_id()


async def test_two_workflow_runs_have_different_run_ids(fake: FakeModel) -> None:
    @workflow
    async def once(text: str) -> str:
        return await classify(text)

    with capture_events() as events:
        await asyncio.gather(once("a"), once("b"))
    runs = by_kind(events, "workflow")
    assert len({r.run_id for r in runs}) == 2
    for run in runs:
        (child,) = [a for a in by_kind(events, "agent") if a.parent_id == run.span_id]
        assert child.run_id == run.run_id


async def test_failed_workflow_is_recorded_and_reraised(fake: FakeModel) -> None:
    @workflow
    async def broken(text: str) -> str:
        await classify(text)
        raise ValueError("bad input")

    with capture_events() as events, pytest.raises(ValueError, match="bad input"):
        await broken("doc")
    (run,) = by_kind(events, "workflow")
    assert run.status == "failed"
    assert run.error == "bad input"
    assert run.error_type == "ValueError"
    assert by_kind(events, "agent")[0].status == "completed"


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


async def test_an_exception_whose_str_fails_is_recorded_as_such_and_reraised_as_itself() -> None:
    # Recording must never change what the workflow's caller gets.
    @workflow
    async def broken(text: str) -> str:
        raise Unprintable()

    with capture_events() as events, pytest.raises(Unprintable):
        await broken("doc")
    (run,) = by_kind(events, "workflow")
    assert (run.status, run.error_type) == ("failed", "Unprintable")
    assert run.error == "<str() of Unprintable failed: RuntimeError('no text')>"


async def test_a_workflow_called_with_wrong_arguments_is_a_failed_run() -> None:
    @workflow
    async def pipeline(text: str) -> str:
        return text

    with capture_events() as events, pytest.raises(TypeError):
        await pipeline()  # type: ignore[call-arg]
    (run,) = by_kind(events, "workflow")
    assert run.status == "failed"
    assert run.error_type == "TypeError"
    assert get_current_span() is None  # the run's span is not left behind as current


async def test_failing_agent_fails_the_workflow() -> None:
    model = FakeModel([RuntimeError("provider exploded")])

    @workflow
    async def pipeline(text: str) -> str:
        return await classify(text)

    with override_model(model), capture_events() as events, pytest.raises(RuntimeError):
        await pipeline("doc")
    assert by_kind(events, "agent")[0].status == "failed"
    assert by_kind(events, "workflow")[0].status == "failed"


async def test_cancelled_workflow_is_recorded_as_cancelled() -> None:
    reached_model = asyncio.Event()

    def hang(_request: object) -> Reply:
        reached_model.set()
        return Reply("never delivered", delay=3600)

    @workflow
    async def slow(text: str) -> str:
        return await classify(text)

    with override_model(FakeModel([hang])), capture_events() as events:
        task = asyncio.create_task(slow("doc"))
        await reached_model.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    statuses = {s.kind: s.status for s in events.finished}
    assert statuses == {"workflow": "cancelled", "agent": "cancelled", "llm": "cancelled"}


async def test_step_keys_are_deterministic_across_runs(fake: FakeModel) -> None:
    @workflow
    async def research(topic: str) -> list[str]:
        first = await classify(topic)
        parallel = await asyncio.gather(
            summarise(topic + " a"), summarise(topic + " b"), classify(topic + " c")
        )
        return [first, *parallel]

    async def run_once(script: list[Any]) -> dict[str, Any]:
        model = FakeModel(script)
        with override_model(model), capture_events() as events:
            await research("ai")
        started = {e.span_id: e for e in events.started}
        keys = [s.step_key for s in events.finished]
        assert len(set(keys)) == len(keys)  # every step has its own key
        (run,) = by_kind(events, "workflow")
        assert all(s.step_key.startswith(run.step_key) for s in events.finished)
        return {
            s.step_key: (s.kind, s.name, started[s.span_id].attributes.get("inputs"))
            for s in events.finished
        }

    # The gathered calls finish in a different order in the second run; the keys must not care.
    first = await run_once(["x", Reply("a", delay=0.01), "b", "c"])
    second = await run_once(["x", "a", Reply("b", delay=0.01), Reply("c", delay=0.005)])
    assert first == second
    assert first["research/summarise#0"][2] == {"text": "ai a"}
    assert first["research/summarise#1"][2] == {"text": "ai b"}
    assert first["research/classify#1"][2] == {"text": "ai c"}


async def test_workflow_inputs_and_outputs_are_recorded(fake: FakeModel) -> None:
    @workflow
    async def add(a: int, b: int = 0) -> int:
        return a + b

    with capture_events() as events:
        assert await add(1, b=2) == 3
    (started,) = events.started
    assert started.attributes["inputs"] == {"a": 1, "b": 2}  # by name, as an agent's are
    assert events.finished[0].attributes["output"] == 3


async def test_names_the_store_cannot_keep_are_refused_where_they_are_given() -> None:
    """Names are kept in columns of 255 characters: PostgreSQL refused a longer one when it was
    written (SQLite kept it), so it is refused where it is given, on every store."""
    long_name = "n" * 256

    async def fn(text: str) -> str:
        """{{ text }}"""
        return text

    with pytest.raises(UsageError, match=r"agent name 'nnn.*256 characters long; .* at most 255"):
        agent(name=long_name)(fn)
    with pytest.raises(UsageError, match=r"workflow name 'nnn.*256 characters long"):
        workflow(name=long_name)(fn)

    @workflow
    async def steps(name: Any) -> str:
        return await kagura.step(name, str.upper, "x")

    with pytest.raises(UsageError, match=r"step name 'nnn.*256 characters long"):
        await steps(long_name)
    with pytest.raises(UsageError, match="a step's name must be a non-empty str, got ''"):
        await steps("")
    assert await steps("n" * 255) == "X"


@pytest.mark.parametrize(
    ("name", "unseen"),
    [
        ("report\x1b]52;c;ZWNobyBwd25lZA==\x07", "\x1b"),  # writes the clipboard
        ("two\nlines", "\n"),
        ("admin\u202egnp.exe", "\u202e"),  # right-to-left override: reads "admin.exe"-like
        ("isolated\u2067name", "\u2067"),
        ("line\u2028separator", "\u2028"),
    ],
)
async def test_agent_and_workflow_names_a_terminal_would_obey_are_refused(
    name: str, unseen: str
) -> None:
    """`kagura monitor` and `kagura runs` show names: one with an escape sequence, a newline or
    a right-to-left override would be obeyed by a terminal, split a row, or read as another."""

    async def fn(text: str) -> str:
        """{{ text }}"""

    which = re.escape(f"holds {unseen!r} (U+{ord(unseen):04X}), a control character")
    fix = re.escape("give it a name without it")
    with pytest.raises(
        UsageError, match=rf"^agent name .*{which}.*{fix} \(@agent\(name=\.\.\.\)\)$"
    ):
        agent(name=name)(fn)
    with pytest.raises(
        UsageError, match=rf"^workflow name .*{which}.*\(@workflow\(name=\.\.\.\)\)$"
    ):
        workflow(name=name)(fn)

    @workflow
    async def steps(step_name: str) -> str:
        return await kagura.step(step_name, str.upper, "x")

    # A step's name may be made of data: kept (and shown with its escapes by the commands).
    assert await steps(name) == "X"
    assert agent(name="naïve résumé 名前")(fn).name == "naïve résumé 名前"  # any script's letters


@pytest.mark.parametrize(
    "name",
    [
        "\U0001f468\u200d\U0001f469\u200d\U0001f467 family",  # an emoji sequence: joiners
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian, with a non-joiner
        "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f scot",  # tags
        "co\u00adop",  # a soft hyphen
        "rtl \u200fmark",  # a right-to-left mark: it reorders nothing after it
    ],
)
def test_names_whose_invisible_characters_are_parts_of_the_text_are_kept(name: str) -> None:
    async def fn(text: str) -> str:
        """{{ text }}"""

    assert agent(name=name)(fn).name == name
    assert workflow(name=name)(fn).name == name


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"durable": "yes"}, "durable must be True, False or None"),
        ({"budget_usd": float("nan")}, "budget_usd must be a number"),
        ({"budget_tokens": 2.5}, "budget_tokens must be a whole number"),
        ({"timeout": 0}, "timeout must be more than 0 seconds"),
        ({"total_timeout": 0}, "total_timeout must be more than 0 seconds"),
        ({"retry_budget": -1}, "retry_budget must be at least 0"),
    ],
)
def test_a_workflow_setting_of_the_wrong_kind_is_refused_at_decoration(
    options: dict[str, Any], said: str
) -> None:
    async def flow() -> None: ...

    with pytest.raises(UsageError, match=said):
        workflow(**options)(flow)


def test_a_workflow_made_a_workflow_again_is_told_it_already_is_one() -> None:
    async def flow() -> None: ...

    with pytest.raises(UsageError, match="'flow' is already a workflow"):
        workflow(workflow(flow))  # type: ignore[arg-type]
