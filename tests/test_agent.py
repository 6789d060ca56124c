"""``@agent``: decorator forms, what the model is sent, and what a call records."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from kagura import (
    Agent,
    ProviderError,
    Usage,
    UsageError,
    agent,
    current_run_id,
    get_current_span,
    workflow,
)
from kagura.providers import ModelRequest, ModelResponse
from kagura.testing import FakeModel, Reply, capture_events, override_model

if TYPE_CHECKING:
    from decimal import Decimal  # for the type checker only: never defined at run time


async def test_bare_decorator_uses_the_overridden_model() -> None:
    @agent
    async def echo(text: str) -> str:
        """Repeat: {{ text }}"""

    assert isinstance(echo, Agent)
    fake = FakeModel()
    with override_model(fake):
        assert await echo("hello") == "Repeat: hello"
    assert len(fake.requests) == 1


async def test_decorator_with_arguments_builds_the_request() -> None:
    fake = FakeModel(["ok"])

    @agent(
        model=fake,
        temperature=0.3,
        max_tokens=64,
        system="You are terse.",
        top_p=0.9,
        seed=7,
        response_format_hint={"nested": True},
    )
    async def terse(text: str) -> str:
        """Answer {{ text }}"""

    assert await terse("q") == "ok"
    request = fake.requests[0]
    assert request.temperature == 0.3
    assert request.max_tokens == 64
    assert request.messages == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Answer q"},
    ]
    # Unknown keywords are passed through to the provider untouched.
    assert request.extra == {"top_p": 0.9, "seed": 7, "response_format_hint": {"nested": True}}
    assert request.tools == []


async def test_defaults_send_no_sampling_settings() -> None:
    fake = FakeModel(["ok"])

    @agent(model=fake)
    async def plain(text: str) -> str:
        """{{ text }}"""

    await plain("q")
    request = fake.requests[0]
    assert request.temperature is None
    assert request.max_tokens is None
    assert request.extra == {}
    assert [m["role"] for m in request.messages] == ["user"]


def test_agent_keeps_the_function_identity() -> None:
    @agent(model=FakeModel())
    async def summarise(text: str) -> str:
        """Summarise {{ text }}"""

    assert summarise.__name__ == "summarise"
    assert summarise.__doc__ == "Summarise {{ text }}"
    assert summarise.name == "summarise"
    assert repr(summarise) == "<Agent summarise>"

    @agent(model=FakeModel(), name="summariser-v2")
    async def renamed(text: str) -> str:
        """{{ text }}"""

    assert renamed.name == "summariser-v2"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"output_retries": -1}, "output_retries"),
        ({"max_tool_rounds": 0}, "max_tool_rounds"),
        # Of the wrong type: said here, not as an AttributeError at the first call.
        ({"temperature": "0.7"}, "temperature must be a number"),
        ({"temperature": float("nan")}, "temperature must be a number"),
        ({"max_tokens": "256"}, "max_tokens must be a whole number"),
        ({"output_retries": None}, "output_retries must be a whole number"),
        ({"max_tool_rounds": 2.5}, "max_tool_rounds must be a whole number"),
        ({"model": 5}, "model must be a model string"),
        ({"base_url": 8080}, "base_url must be a str"),
        ({"system": ["be brief"]}, "system must be a str"),
        ({"breaker": "summaries"}, "breaker must be a kagura.resilience.CircuitBreaker"),
        ({"rate_limit": 500}, "rate_limit must be a kagura.resilience.RateLimiter"),
        ({"timeout": "30s"}, "timeout must be a number of seconds or a timedelta"),
        ({"total_timeout": float("nan")}, "total_timeout must be a number"),
        # A limit of 0 lets nothing finish: every attempt would time out, having sent nothing.
        ({"timeout": 0}, "timeout must be more than 0 seconds"),
        ({"total_timeout": 0.0}, "total_timeout must be more than 0 seconds"),
        ({"provider_kwargs": "seed=1"}, "provider_kwargs must be a dict"),
        ({"provider_kwargs": {"messages": [], "seed": 1}}, "provider_kwargs cannot set messages"),
        ({"tools": len}, "tools must be a list"),
        ({"fallback": None}, "fallback must be a model, or a list of models"),
        ({"fallback": ["fake", 5]}, "fallback models are model strings"),
    ],
)
def test_bad_options_are_usage_errors_at_decoration(options: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):

        @agent(**{"model": FakeModel(), **options})
        async def f(x: str) -> str:
            """{{ x }}"""


async def test_the_body_is_never_executed() -> None:
    with pytest.warns(UserWarning):

        @agent(model=FakeModel(["from the model"]))
        async def not_run(x: str) -> str:
            """{{ x }}"""
            raise AssertionError("the body must not run")

    assert await not_run("x") == "from the model"


async def test_override_model_beats_the_agents_own_model() -> None:
    own = FakeModel(["own"])
    forced = FakeModel(["forced", "forced in a task"])

    @agent(model=own)
    async def pick(x: str) -> str:
        """{{ x }}"""

    with override_model(forced):
        assert await pick("x") == "forced"
        # Tasks started inside the block see the override too.
        assert await asyncio.create_task(pick("x")) == "forced in a task"
    assert own.requests == []
    assert await pick("x") == "own"
    assert len(forced.requests) == 2


async def test_model_string_fake_echoes() -> None:
    @agent(model="fake")
    async def echo(text: str) -> str:
        """Echo {{ text }}"""

    assert await echo("this") == "Echo this"


async def test_provider_errors_propagate_and_are_recorded() -> None:
    fake = FakeModel([ProviderError("bad request", model="fake/echo", status_code=400)])

    @agent(model=fake)
    async def fragile(x: str) -> str:
        """{{ x }}"""

    with capture_events() as events, pytest.raises(ProviderError) as info:
        await fragile("x")
    assert info.value.status_code == 400
    assert len(fake.requests) == 1  # a client error is not worth another attempt
    (llm,) = events.spans(kind="llm")
    (span,) = events.spans(kind="agent")
    assert llm.status == span.status == "failed"
    assert span.error_type == "ProviderError"
    assert "bad request" in (span.error or "")


async def test_agent_span_records_model_inputs_output_usage_and_cost() -> None:
    fake = FakeModel([Reply("not a number", usage=Usage(10, 3)), Reply("42", usage=Usage(20, 1))])

    @agent(model=fake)
    async def count(text: str, limit: int = 5) -> int:
        """Count {{ text }} up to {{ limit }}"""

    with capture_events() as events:
        assert await count("sheep") == 42
    (started,) = [e for e in events.started if e.kind == "agent"]
    assert started.name == "count"
    assert started.attributes["model"] == "fake/echo"
    assert started.attributes["inputs"] == {"text": "sheep", "limit": 5}
    (finished,) = events.spans(kind="agent")
    assert finished.span_id == started.span_id
    assert finished.status == "completed"
    assert finished.attributes["output"] == 42
    assert finished.usage == Usage(30, 4)
    assert finished.cost_usd == 0.0
    attempts = events.spans(kind="llm")
    assert [a.usage for a in attempts] == [Usage(10, 3), Usage(20, 1)]
    assert all(a.parent_id == finished.span_id for a in attempts)
    assert [a.attributes["output"] for a in attempts] == ["not a number", "42"]


async def test_failed_agent_span_still_carries_usage() -> None:
    fake = FakeModel([Reply("bad", usage=Usage(5, 1))])

    @agent(model=fake, output_retries=0)
    async def strict(x: str) -> int:
        """{{ x }}"""

    with capture_events() as events, pytest.raises(Exception, match="did not match"):
        await strict("x")
    (span,) = events.spans(kind="agent")
    assert span.status == "failed"
    assert span.error_type == "OutputParseError"
    assert span.usage == Usage(5, 1)


def test_a_wrong_call_raises_at_the_call_as_for_an_async_function() -> None:
    @agent(model=FakeModel())
    async def pair(a: str, b: str) -> str:
        """{{ a }} {{ b }}"""

    # Nothing awaited: like an ``async def``, the call itself checks its arguments.
    with pytest.raises(TypeError, match="agent 'pair'"):
        pair("only one")
    with pytest.raises(TypeError, match="agent 'pair'"):
        pair("a", "b", c="extra")


async def test_a_one_parameter_agent_takes_its_value_by_position_or_by_name() -> None:
    fake = FakeModel()

    @agent(model=fake)
    async def echo(text: str) -> str:
        """Say {{ text }}"""

    assert await echo("hi") == "Say hi"
    assert await echo(text="there") == "Say there"
    assert [r.messages[-1]["content"] for r in fake.requests] == ["Say hi", "Say there"]
    with pytest.raises(TypeError, match="agent 'echo'"):
        echo("a", "b")


async def test_code_under_a_provider_sees_the_run_it_belongs_to() -> None:
    seen: list[str | None] = []

    class Peeking(FakeModel):
        async def request(self, request: ModelRequest) -> ModelResponse:
            seen.append(current_run_id())
            return await super().request(request)

    @agent(model=Peeking())
    async def solo(x: str) -> str:
        """{{ x }}"""

    @workflow
    async def pipeline(x: str) -> str:
        parts = await asyncio.gather(solo(x), solo(x))
        return await solo("".join(parts))

    with capture_events() as events:
        await solo("alone")
        await pipeline("in a run")
    (alone,) = [s for s in events.spans(kind="agent") if s.parent_id is None]
    (run,) = events.spans(kind="workflow")
    assert seen == [alone.run_id, run.run_id, run.run_id, run.run_id]


async def test_agent_outside_a_workflow_is_its_own_run() -> None:
    @agent(model=FakeModel())
    async def solo(x: str) -> str:
        """{{ x }}"""

    with capture_events() as events:
        await solo("x")
    (span,) = events.spans(kind="agent")
    assert span.parent_id is None
    assert span.run_id == span.span_id
    assert get_current_span() is None


async def test_concurrent_calls_are_independent() -> None:
    fake = FakeModel()

    @agent(model=fake)
    async def echo(n: int) -> str:
        """item {{ n }}"""

    results = await asyncio.gather(*(echo(i) for i in range(20)))
    assert results == [f"item {i}" for i in range(20)]
    assert len(fake.requests) == 20


async def test_run_returns_the_output_with_model_usage_and_cost() -> None:
    fake = FakeModel(["hello there"])

    @agent(model=fake)
    async def greet(name: str) -> str:
        """Greet {{ name }}"""

    result = await greet.run("Ada")
    assert result.output == "hello there"
    assert result.model == "fake/echo"
    assert result.usage.completion_tokens == 2
    assert result.cost_usd == 0.0
    assert result.span_id and result.run_id == result.span_id  # a top-level call is its own run


async def test_run_names_the_fallback_model_that_answered() -> None:
    from kagura.errors import ProviderError

    primary = FakeModel([ProviderError("down", status_code=400)], name="primary")
    backup = FakeModel(["from the backup"], name="backup")

    @agent(model=primary, fallback=[backup], retry=False)
    async def ask(q: str) -> str:
        """{{ q }}"""

    result = await ask.run("anything")
    assert (result.output, result.model) == ("from the backup", "fake/backup")


def test_an_agent_refuses_options_it_does_not_know() -> None:
    async def ask(q: str) -> str:
        """{{ q }}"""

    with pytest.raises(TypeError, match="top_p; provider keywords go in provider_kwargs="):
        Agent(ask, top_p=0.9)


async def test_provider_keywords_given_bare_join_provider_kwargs() -> None:
    fake = FakeModel(["ok"])

    @agent(model=fake, provider_kwargs={"top_p": 0.5}, seed=7)
    async def ask(q: str) -> str:
        """{{ q }}"""

    await ask("q")
    assert fake.requests[0].extra == {"top_p": 0.5, "seed": 7}


def test_a_bad_retry_setting_is_refused_by_agents_and_workflows() -> None:
    async def ask(q: str) -> str:
        """{{ q }}"""

    with pytest.raises(UsageError, match="retry must be"):
        agent(retry=3)(ask)
    with pytest.raises(UsageError, match="retry must be"):
        workflow(retry="often")(ask)
    with pytest.raises(TypeError, match="retri"):
        workflow(retri=3)(ask)


def test_the_call_path_holds_no_closure_cells() -> None:
    # A variable a nested function uses is made a cell at every call of the function that holds
    # it: one more object per call in flight for the garbage collector to count, and a fan-out
    # of thousands of calls then collects more often (a full collection more per 2,000 runs).
    from kagura._agent import Agent
    from kagura._llm import attempt
    from kagura._workflow import Workflow
    from kagura.resilience._policies import call_model
    from kagura.resilience._retry import Retry

    hot = (Agent._call, Agent._answer, Agent._run, call_model, Retry.run_attempts, attempt)
    for function in (*hot, Workflow.execute):
        assert function.__code__.co_cellvars == (), function.__qualname__


async def test_one_fallback_model_may_be_given_alone() -> None:
    primary = FakeModel([ProviderError("down", model="fake/primary")])
    backup = FakeModel(["from the backup"])

    @agent(model=primary, fallback=backup, retry=False)
    async def ask(q: str) -> str:
        """{{ q }}"""

    assert ask.fallback == (backup,)
    assert await ask("q") == "from the backup"

    @agent(model=primary, fallback="fake")
    async def by_name(q: str) -> str:
        """{{ q }}"""

    assert by_name.fallback == ("fake",)  # one model, not the letters of its name


async def test_a_parameter_annotation_named_only_for_the_type_checker_does_not_block_an_agent() -> (
    None
):
    # Only the return type is resolved: "Decimal" is imported under TYPE_CHECKING above.
    @agent(model=FakeModel(["noted"]))
    async def summarise(amount: Decimal, note: str) -> str:
        """Amount {{ amount }}: {{ note }}"""

    assert await summarise(3, "paid") == "noted"  # type: ignore[arg-type]


def test_a_return_type_defined_after_the_agent_is_refused_with_advice_that_fits() -> None:
    # As a class defined further down the module is when the agent is made: not there yet.
    with pytest.raises(UsageError, match=r"'NotYetDefined'.*module level before the agent"):

        @agent(model=FakeModel())
        async def later(q: str) -> NotYetDefined:  # type: ignore[name-defined]  # noqa: F821
            """{{ q }}"""


@pytest.mark.parametrize("annotation", ["list[int", "int | 3"])
def test_a_return_annotation_that_is_not_a_type_is_a_usage_error(annotation: str) -> None:
    async def typo(q: str):  # type: ignore[no-untyped-def]
        """{{ q }}"""

    typo.__annotations__["return"] = annotation
    with pytest.raises(UsageError, match=r"return annotation .* is not a type"):
        agent(model=FakeModel())(typo)


@pytest.mark.parametrize("model", [5, None])
def test_using_something_not_a_model_is_a_usage_error(model: object) -> None:
    @agent(model=FakeModel())
    async def ask(q: str) -> str:
        """{{ q }}"""

    with pytest.raises(UsageError, match=r"ask.using\(\) takes a model string.*got " + str(model)):
        ask.using(model)  # type: ignore[arg-type]


def test_an_agent_made_an_agent_again_is_told_it_already_is_one() -> None:
    async def ask(q: str) -> str:
        """{{ q }}"""

    with pytest.raises(UsageError, match=r"'ask' is already an agent.*ask.using\(model\)"):
        agent(agent(ask))  # type: ignore[arg-type]


def test_an_agent_written_as_a_method_is_refused_at_decoration() -> None:
    with pytest.raises(UsageError, match=r"written as a method.*'self'.*module level"):

        class Assistant:
            @agent(model=FakeModel())
            async def reply(self, text: str) -> str:
                """Reply to {{ text }}"""
