"""register_provider: a prefix claimed in this process (kagura.ray's seam for local models)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kagura import UsageError, agent
from kagura.providers import Model, ModelRequest, ModelResponse, register_provider, resolve_model
from kagura.providers.local import LocalModel
from kagura.testing import FakeModel


class Served(Model):
    provider = "local"

    def __init__(self, name: str) -> None:
        if name != "smollm2":
            raise UsageError(f"unknown local model {name!r}")
        self.model_name = name

    async def request(self, request: ModelRequest) -> ModelResponse:
        return ModelResponse(text="served", model=self.id)


@pytest.fixture
def served_local(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    for name in ("OPENAI_API_KEY", "KAGURA_MODEL", "KAGURA_MODEL_OVERRIDE"):
        monkeypatch.delenv(name, raising=False)
    made: list[str] = []

    def factory(name: str) -> Model:
        made.append(name)
        return Served(name)

    register_provider("local", factory)
    try:
        yield made
    finally:
        register_provider("local", None)


def test_a_registered_prefix_resolves_to_its_factory(served_local: list[str]) -> None:
    model = resolve_model("local/smollm2")
    assert isinstance(model, Served)
    assert model.id == "local/smollm2"
    # One model per string, as for the built-in providers.
    assert resolve_model("local/smollm2") is model
    assert served_local == ["smollm2"]


def test_the_default_model_and_the_override_go_through_it(
    served_local: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(resolve_model(None), Served)
    monkeypatch.setenv("KAGURA_MODEL_OVERRIDE", "local/smollm2")
    assert isinstance(resolve_model("fake"), Served)


def test_models_resolved_before_are_forgotten() -> None:
    before = resolve_model("local/smollm2")
    assert isinstance(before, LocalModel)
    register_provider("local", Served)
    try:
        assert isinstance(resolve_model("local/smollm2"), Served)
    finally:
        register_provider("local", None)
    after = resolve_model("local/smollm2")
    assert isinstance(after, LocalModel)
    assert after is not before


async def test_an_agent_calls_the_registered_model(served_local: list[str]) -> None:
    @agent(model="local/smollm2")
    async def echo(text: str) -> str:
        """{{ text }}"""

    assert await echo("hello") == "served"


def test_the_factory_refuses_names_at_definition(served_local: list[str]) -> None:
    with pytest.raises(UsageError, match="unknown local model 'other'"):

        @agent(model="local/other")
        async def nothing(text: str) -> str:
            """{{ text }}"""


def test_other_prefixes_are_untouched(served_local: list[str]) -> None:
    assert isinstance(resolve_model("fake/x"), FakeModel)


def test_a_new_prefix_is_known_to_the_error_message() -> None:
    register_provider("mine", Served)
    try:
        assert isinstance(resolve_model("mine/smollm2"), Served)
        with pytest.raises(UsageError, match="mine"):
            resolve_model("nowhere/model")
    finally:
        register_provider("mine", None)
    with pytest.raises(UsageError, match="unknown model provider 'mine'"):
        resolve_model("mine/smollm2")


@pytest.mark.parametrize("prefix", ["", "a/b"])
def test_a_prefix_is_a_plain_name(prefix: str) -> None:
    with pytest.raises(UsageError, match="without '/'"):
        register_provider(prefix, Served)
