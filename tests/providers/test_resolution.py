"""How a model string (or nothing) becomes a model, and what fails early when it cannot."""

from __future__ import annotations

import traceback
from typing import Any

import pytest

from kagura import MissingCredentialsError, UsageError, agent, workflow
from kagura.providers import Model, ModelRequest, ModelResponse, model_id, resolve_model
from kagura.providers.local import LocalModel
from kagura.providers.openai import OpenAIChatModel
from kagura.testing import FakeModel, capture_events, override_model

SECRET = "sk-resolution-secret-0123456789"


@pytest.fixture
def no_openai_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def openai_calls(monkeypatch: pytest.MonkeyPatch) -> list[ModelRequest]:
    """Requests that reached the OpenAI adapter (none should, in these tests)."""
    calls: list[ModelRequest] = []

    async def spy(self: OpenAIChatModel, request: ModelRequest) -> ModelResponse:
        calls.append(request)
        raise AssertionError("the OpenAI provider must not be called")

    monkeypatch.setattr(OpenAIChatModel, "request", spy)
    return calls


def _secret_free(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc)) + repr(exc)
    assert SECRET not in text


# -- defaults -------------------------------------------------------------------------------------


def test_default_is_the_embedded_model(no_openai_key: None) -> None:
    model = resolve_model(None)
    assert isinstance(model, LocalModel)
    assert model.id == "local/smollm2"


def test_kagura_model_sets_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAGURA_MODEL", "fake/configured")
    model = resolve_model(None)
    assert isinstance(model, FakeModel)
    assert model.id == "fake/configured"
    # An agent's own model still wins over the default.
    assert resolve_model("fake/explicit").id == "fake/explicit"


async def test_agents_without_a_model_use_kagura_model(monkeypatch: pytest.MonkeyPatch) -> None:
    @agent
    async def echo(text: str) -> str:
        """Echo {{ text }}"""

    monkeypatch.setenv("KAGURA_MODEL", "fake/configured")
    with capture_events() as events:
        assert await echo("this") == "Echo this"
    assert events.spans(kind="llm")[0].name == "fake/configured"


def test_spaces_around_a_model_string_are_no_part_of_it(
    monkeypatch: pytest.MonkeyPatch, no_openai_key: None
) -> None:
    assert resolve_model(" gpt-4o-mini\n").id == "openai/gpt-4o-mini"
    assert resolve_model("  ").id == "local/smollm2"  # blank names no model: the default
    monkeypatch.setenv("KAGURA_MODEL", " fake/configured ")
    assert resolve_model(None).id == "fake/configured"
    monkeypatch.setenv("KAGURA_MODEL", "  ")  # blank is unset, as for every setting
    assert resolve_model(None).id == "local/smollm2"
    monkeypatch.setenv("KAGURA_MODEL_OVERRIDE", "  ")
    assert resolve_model("fake/explicit").id == "fake/explicit"
    monkeypatch.setenv("KAGURA_MODEL_OVERRIDE", " fake/forced ")
    assert resolve_model("fake/explicit").id == "fake/forced"


def test_model_instances_are_used_as_given() -> None:
    model = FakeModel()
    assert resolve_model(model) is model


@pytest.mark.parametrize(
    ("spec", "provider", "name"),
    [
        ("gpt-4o-mini", "openai", "gpt-4o-mini"),
        ("openai/gpt-4o-mini", "openai", "gpt-4o-mini"),
        ("ollama/llama3.2", "ollama", "llama3.2"),
        ("openrouter/meta-llama/llama-3-8b", "openrouter", "meta-llama/llama-3-8b"),
        ("fake", "fake", "echo"),
        ("local/smollm2", "local", "smollm2"),
    ],
)
def test_model_strings(spec: str, provider: str, name: str) -> None:
    model = resolve_model(spec)
    assert (model.provider, model.model_name) == (provider, name)


@pytest.mark.parametrize(
    ("spec", "model"),
    [
        ("gpt-4o-mini", "openai/gpt-4o-mini"),
        (" openai/gpt-4o-mini\n", "openai/gpt-4o-mini"),
        ("fake", "fake/echo"),
        ("local/smollm2", "local/smollm2"),
    ],
)
def test_model_id_is_the_id_of_the_model_a_string_names(
    monkeypatch: pytest.MonkeyPatch, spec: str, model: str
) -> None:
    # Neither override: they change the model of a call, not the name of the one a string names.
    monkeypatch.setenv("KAGURA_MODEL_OVERRIDE", "fake/forced")
    with override_model(FakeModel(name="overridden")):
        assert model_id(spec) == model


@pytest.mark.parametrize(
    ("spec", "said"), [("  ", "names a model"), (None, "names a model"), ("acme/x", "'acme'")]
)
def test_model_id_refuses_what_names_no_model(spec: Any, said: str) -> None:
    with pytest.raises(UsageError, match=said):
        model_id(spec)


def test_endpoint_base_urls_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    model = resolve_model("ollama/llama3.2")
    assert isinstance(model, OpenAIChatModel)
    monkeypatch.delenv("OLLAMA_BASE_URL", raising=False)
    assert model.base_url == "http://localhost:11434/v1"
    monkeypatch.setenv("OLLAMA_BASE_URL", "http://gpu-box:11434/v1")
    assert model.base_url == "http://gpu-box:11434/v1"
    model.check_ready()  # a local endpoint needs no key


def test_base_url_accepts_any_org_model_string() -> None:
    model = resolve_model("acme/awesome-7b", base_url="http://127.0.0.1:9/v1")
    assert isinstance(model, OpenAIChatModel)
    assert model.base_url == "http://127.0.0.1:9/v1"


# -- KAGURA_MODEL_OVERRIDE ---------------------------------------------------------------------


async def test_override_env_forces_every_agent_onto_one_model(
    monkeypatch: pytest.MonkeyPatch, no_openai_key: None, openai_calls: list[ModelRequest]
) -> None:
    own = FakeModel(["own answer"])

    @agent(model=own)
    async def scripted(text: str) -> str:
        """A {{ text }}"""

    @agent(model="gpt-4o-mini")
    async def remote(text: str) -> str:
        """B {{ text }}"""

    monkeypatch.setenv("KAGURA_MODEL_OVERRIDE", "fake/forced")
    with capture_events() as events:
        assert await scripted("x") == "A x"
        assert await remote("y") == "B y"  # no key needed: OpenAI is never used
    assert own.requests == []
    assert openai_calls == []
    assert {s.name for s in events.spans(kind="llm")} == {"fake/forced"}


def test_override_env_beats_kagura_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAGURA_MODEL", "fake/default")
    monkeypatch.setenv("KAGURA_MODEL_OVERRIDE", "fake/forced")
    assert resolve_model(None).id == "fake/forced"
    assert resolve_model("gpt-4o-mini", base_url="http://x/v1", api_key=SECRET).id == "fake/forced"


def test_test_override_beats_the_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAGURA_MODEL_OVERRIDE", "fake/forced")
    fake = FakeModel()
    with override_model(fake):
        assert resolve_model("gpt-4o-mini") is fake
    assert resolve_model("gpt-4o-mini").id == "fake/forced"


# -- early failures ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["nosuch/model", "anthropic/claude-3"])
def test_unknown_prefix_is_a_usage_error_at_decoration(spec: str) -> None:
    with pytest.raises(UsageError) as info:

        @agent(model=spec, api_key=SECRET)
        async def f(x: str) -> str:
            """{{ x }}"""

    message = str(info.value)
    assert spec.split("/")[0] in message
    assert "base_url" in message
    for known in ("openai", "ollama", "local", "fake"):
        assert known in message
    _secret_free(info.value)


@pytest.mark.parametrize(("spec", "match"), [("openai/", "names no model"), ("local/big", "local")])
def test_bad_model_names_fail_at_decoration(spec: str, match: str) -> None:
    with pytest.raises(UsageError, match=match) as info:

        @agent(model=spec, api_key=SECRET)
        async def f(x: str) -> str:
            """{{ x }}"""

    _secret_free(info.value)


async def test_missing_openai_key_fails_at_once_without_calling_the_provider(
    no_openai_key: None, openai_calls: list[ModelRequest]
) -> None:
    @agent(model="gpt-4o-mini")
    async def remote(text: str) -> str:
        """{{ text }}"""

    @workflow
    async def pipeline(text: str) -> str:
        return await remote(text)

    with capture_events() as events, pytest.raises(MissingCredentialsError) as info:
        await pipeline("x")
    error = info.value
    assert "OPENAI_API_KEY" in str(error)
    assert "KAGURA_MODEL_OVERRIDE" in str(error)
    assert error.env_var == "OPENAI_API_KEY"
    assert openai_calls == []
    assert events.spans(kind="llm") == []  # not even an attempt was made
    assert events.spans(kind="agent")[0].error_type == "MissingCredentialsError"


async def test_missing_key_also_fails_when_openai_is_the_default(
    monkeypatch: pytest.MonkeyPatch, no_openai_key: None, openai_calls: list[ModelRequest]
) -> None:
    monkeypatch.setenv("KAGURA_MODEL", "openai/gpt-4o-mini")

    @agent
    async def remote(text: str) -> str:
        """{{ text }}"""

    with pytest.raises(MissingCredentialsError, match="OPENAI_API_KEY"):
        await remote("x")
    assert openai_calls == []


def test_key_from_the_environment_is_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    model = resolve_model("gpt-4o-mini")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(MissingCredentialsError):
        model.check_ready()
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    model.check_ready()


def test_api_key_never_appears_in_usage_errors() -> None:
    cases: list[dict[str, Any]] = [
        {"model": "gpt-4o-mini", "temperature": 9},
        {"model": "gpt-4o-mini", "max_tokens": 0},
        {"model": "bogus/model"},
        {"model": "litellm/"},
    ]
    for options in cases:
        with pytest.raises(UsageError) as info:

            @agent(api_key=SECRET, **options)
            async def f(x: str) -> str:
                """{{ x }}"""

        _secret_free(info.value)


async def test_explicit_api_key_is_enough_and_never_shown(
    no_openai_key: None, openai_calls: list[ModelRequest]
) -> None:
    @agent(model="gpt-4o-mini", api_key=SECRET)
    async def remote(text: str) -> str:
        """{{ text }}"""

    assert SECRET not in repr(remote)
    assert SECRET not in repr(resolve_model("gpt-4o-mini", api_key=SECRET))
    with capture_events() as events, pytest.raises(AssertionError, match="must not be called"):
        await remote("x")
    assert len(openai_calls) == 1  # no MissingCredentialsError: the request was sent
    assert SECRET not in repr(events.events)


async def test_custom_models_plug_in() -> None:
    class Constant(Model):
        provider = "custom"
        model_name = "constant"

        async def request(self, request: ModelRequest) -> ModelResponse:
            return ModelResponse("  the constant answer ")

    @agent(model=Constant())
    async def ask(text: str) -> str:
        """{{ text }}"""

    with capture_events() as events:
        assert await ask("x") == "the constant answer"
    assert events.spans(kind="llm")[0].name == "custom/constant"
