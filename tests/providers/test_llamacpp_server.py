"""``llamacpp/...`` agents against llama-cpp-python's own server, over real HTTP.

The server runs the shipped SmolLM2 GGUF with its defaults (see tests/_llamacpp.py): typed
results of every kind, a server that rejects ``json_schema`` reached through a plain base URL,
and tool round trips, with the prompted protocol (its default chat format ignores native tools)
and natively with a function-calling chat format. The model is tiny, so the tests check what
went over the wire and what the agent returned, not how clever the answers are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, TypeAdapter
from typing_extensions import TypedDict  # pydantic needs this one on Python 3.11

from kagura import agent, tool
from kagura.errors import ToolLoopError
from kagura.testing import capture_events
from tests._llamacpp import LlamaCppServer, gguf_or_skip, start_server

pytestmark = [pytest.mark.local_model, pytest.mark.timeout(300)]


class City(BaseModel):
    name: str
    country: str
    population: int


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Person(TypedDict):
    name: str
    age: int


KINDS: list[tuple[str, Any]] = [
    ("pydantic model", City),
    ("int", int),
    ("float", float),
    ("bool", bool),
    ("literal", Literal["positive", "negative"]),
    ("enum", Colour),
    ("list", list[str]),
    ("dict", dict[str, int]),
    ("tuple", tuple[str, int]),
    ("optional", int | None),
    ("dataclass", Point),
    ("typeddict", Person),
]


def _statuses(server: LlamaCppServer) -> list[int]:
    """The HTTP status of every chat request the server answered so far, from its log."""
    log = server.log_path.read_text(errors="replace")
    return [int(s) for s in re.findall(r'"POST /v1/chat/completions HTTP/1.1" (\d{3})', log)]


@pytest.mark.parametrize(("kind", "tp"), KINDS, ids=[k for k, _ in KINDS])
async def test_each_typed_result_kind_parses(
    llamacpp_server: LlamaCppServer, kind: str, tp: Any
) -> None:
    async def extract(text: str) -> Any:
        """Give an example answer about: {{ text }}"""

    extract.__annotations__["return"] = tp  # this module's annotations are strings
    extract = agent(
        model="llamacpp/smollm2",
        base_url=llamacpp_server.base_url,
        temperature=0,
        max_tokens=128,
        retry=False,
        output_retries=0,  # the first answer must parse: the server holds it to the schema
    )(extract)

    before = len(_statuses(llamacpp_server))
    value = await extract(f"a {kind} describing Paris")
    TypeAdapter(tp).validate_python(value)  # a value of the type, not text
    assert _statuses(llamacpp_server)[before:] == [200]  # json_object with a schema: accepted


async def test_a_plain_base_url_steps_down_from_json_schema_once(
    llamacpp_server: LlamaCppServer,
) -> None:
    # No llamacpp/ prefix: the server is unknown, so json_schema is tried first.
    @agent(model="smollm2-unknown", base_url=llamacpp_server.base_url, temperature=0)
    async def city(text: str) -> City:
        """Describe the city: {{ text }}"""

    before = len(_statuses(llamacpp_server))
    assert isinstance(await city("Paris"), City)
    assert isinstance(await city("Rome"), City)
    # One rejection (HTTP 500, not retried), then json_object with the schema for both calls.
    assert _statuses(llamacpp_server)[before:] == [500, 200, 200]


@tool
def weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny and 21 C in {city}"


async def test_a_tool_round_trip_completes_on_the_server_defaults(
    llamacpp_server: LlamaCppServer,
) -> None:
    @agent(
        model="llamacpp/smollm2",
        base_url=llamacpp_server.base_url,
        tools=[weather],
        temperature=0,
        max_tokens=128,
    )
    async def travel(question: str) -> str:
        """{{ question }}"""

    before = len(_statuses(llamacpp_server))
    with capture_events() as events:
        answer = await travel("What is the weather in Paris?")
    assert isinstance(answer, str)
    assert not answer.lstrip().startswith("{")  # the answer, not the protocol's JSON
    [ran] = [s for s in events.spans(kind="tool") if s.status == "completed"]
    assert ran.name == "weather"
    statuses = _statuses(llamacpp_server)[before:]
    assert len(statuses) >= 2 and set(statuses) == {200}


@pytest.fixture(scope="module")
def function_calling_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppServer]:
    """A second server, with a chat format that speaks native tool calls."""
    server = start_server(
        gguf_or_skip(),
        Path(tmp_path_factory.mktemp("llamacpp-fc")),
        "--chat_format",
        "chatml-function-calling",
    )
    try:
        yield server
    finally:
        server.stop()


async def test_native_tools_round_two_is_accepted(function_calling_server: LlamaCppServer) -> None:
    @agent(
        model="llamacpp/smollm2",
        base_url=function_calling_server.base_url,
        tools=[weather],
        tool_mode="native",
        temperature=0,
        max_tokens=64,
        max_tool_rounds=1,
    )
    async def travel(question: str) -> str:
        """{{ question }}"""

    # The tiny model may call its tool again: round two is what is checked here.
    with capture_events() as events, contextlib.suppress(ToolLoopError):
        await travel("What is the weather in Paris? Use the weather tool.")
    [ran, *_] = events.spans(kind="tool")
    assert ran.name == "weather" and ran.status == "completed"
    # Round one (tools with tool_choice="auto") and round two (the assistant's tool call with a
    # "" content, then the tool's result) were both accepted by the server.
    assert _statuses(function_calling_server) == [200, 200]
