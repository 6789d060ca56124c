"""Structured-output and tool profiles, over real HTTP against the fault server on 127.0.0.1.

What goes on the wire for each kind of endpoint (the request bodies the server received), how a
rejected response format is stepped down once and remembered, native tools refused, the shape
of a tool round, answers cut off by ``max_tokens``, and connection errors that say where.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel

from kagura import agent, tool
from kagura.errors import (
    OutputParseError,
    ProviderConnectionError,
    ProviderError,
    UnsupportedRequestError,
    UsageError,
)
from kagura.providers import ModelRequest
from kagura.providers.openai import ENDPOINTS, Endpoint, OpenAIChatModel
from kagura.testing import FakeModel, Reply, capture_events
from kagura.testing.fault_server import Fault, FaultServer

pytestmark = pytest.mark.timeout(60)


class City(BaseModel):
    name: str
    country: str


@tool
def weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


@pytest.fixture
async def server() -> AsyncIterator[FaultServer]:
    async with FaultServer() as srv:
        yield srv


def _city_agent(model: str, base_url: str, **settings: Any) -> Any:
    @agent(model=model, base_url=base_url, **settings)
    async def city(text: str) -> City:
        """Which city: {{ text }}"""

    return city


def _format(body: Any) -> Any:
    return body.get("response_format")


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("openai/", "json_schema"),
        ("vllm/", "json_schema"),
        ("ollama/", "json_schema"),
        ("openrouter/", "json_schema"),
        ("", "json_schema"),  # any base URL
        ("llamacpp/", "json_object"),
    ],
)
async def test_each_endpoint_gets_its_response_format(
    server: FaultServer, prefix: str, expected: str
) -> None:
    # A distinct model name per case: what an endpoint accepted is remembered per process.
    city = _city_agent(f"{prefix}profile-{prefix.strip('/') or 'any'}", server.base_url)
    server.script(Fault.ok('{"name": "Oslo", "country": "Norway"}'))
    assert await city("Oslo") == City(name="Oslo", country="Norway")
    fmt = _format(server.chat_requests[0].body)
    assert fmt["type"] == expected
    if expected == "json_schema":
        assert fmt["json_schema"]["schema"]["required"] == ["name", "country"]
    else:  # llama.cpp's servers: json_object with the schema, which they turn into a grammar
        assert fmt["schema"]["required"] == ["name", "country"]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("json_schema", ("json_schema", False)),
        ("json_object_schema", ("json_object", True)),
        ("json_object", ("json_object", False)),
        ("prompt", None),
    ],
)
async def test_an_agent_chooses_its_output_mode(
    server: FaultServer, mode: str, expected: Any
) -> None:
    city = _city_agent("llamacpp/override", server.base_url, output_mode=mode)
    server.script(Fault.ok('{"name": "Oslo", "country": "Norway"}'))
    assert await city("Oslo") == City(name="Oslo", country="Norway")
    body = server.chat_requests[0].body
    fmt = _format(body)
    if expected is None:
        assert fmt is None
    else:
        kind, with_schema = expected
        assert fmt["type"] == kind
        assert ("schema" in fmt) == with_schema
    # Whatever the mode, the prompt carries the schema: the answer is validated against it.
    assert '"required":["name","country"]' in body["messages"][-1]["content"]


def test_bad_modes_are_refused_at_decoration() -> None:
    with pytest.raises(UsageError, match="output_mode must be one of 'json_schema'"):

        @agent(output_mode="xml")  # type: ignore[arg-type]
        async def a(text: str) -> City:
            """{{ text }}"""

    with pytest.raises(UsageError, match="tool_mode must be one of 'native', 'prompted'"):

        @agent(tool_mode="auto")  # type: ignore[arg-type]
        async def b(text: str) -> str:
            """{{ text }}"""


async def test_a_rejected_response_format_is_stepped_down_once_and_remembered(
    server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    # As llama-cpp-python's server answers json_schema: HTTP 500, naming response_format.
    rejection = Fault(
        "500", text="Input should be 'text' or 'json_object' (body.response_format.type)"
    )
    city = _city_agent("stepped-down", server.base_url)
    server.script(rejection, Fault.ok('{"name": "Oslo", "country": "Norway"}'))
    with caplog.at_level(logging.WARNING, logger="kagura.providers"):
        assert await city("Oslo") == City(name="Oslo", country="Norway")
    first, second = server.chat_requests
    assert _format(first.body)["type"] == "json_schema"
    assert _format(second.body)["type"] == "json_object"
    assert _format(second.body)["schema"]["required"] == ["name", "country"]
    [warning] = [r for r in caplog.records if r.name == "kagura.providers"]
    assert "rejected response_format 'json_schema'" in warning.getMessage()
    assert server.base_url in warning.getMessage()

    # Remembered for the endpoint and model: the next call (another agent, too) goes straight
    # to what the server accepts.
    server.script(Fault.ok('{"name": "Rome", "country": "Italy"}'))
    other = _city_agent("stepped-down", server.base_url)
    assert await other("Rome") == City(name="Rome", country="Italy")
    assert _format(server.chat_requests[2].body)["type"] == "json_object"
    assert len(server.chat_requests) == 3


async def test_an_ordinary_server_error_is_retried_not_stepped_down(server: FaultServer) -> None:
    city = _city_agent("plain-500", server.base_url, retry=True)
    server.script("500", Fault.ok('{"name": "Oslo", "country": "Norway"}'))
    assert await city("Oslo") == City(name="Oslo", country="Norway")
    assert [_format(r.body)["type"] for r in server.chat_requests] == ["json_schema"] * 2


async def test_a_chosen_mode_the_server_rejects_is_an_error_never_retried(
    server: FaultServer,
) -> None:
    city = _city_agent("chosen", server.base_url, output_mode="json_schema", retry=True)
    server.script(Fault("400", text="response_format json_schema is not supported"))
    with pytest.raises(UnsupportedRequestError, match="rejected output_mode='json_schema'") as e:
        await city("Oslo")
    assert e.value.feature == "output_mode"
    assert "@agent(output_mode=...)" in str(e.value)
    assert len(server.chat_requests) == 1  # not retried


async def test_native_tools_send_tool_choice_and_a_text_content(server: FaultServer) -> None:
    @agent(model="vllm/tools", base_url=server.base_url, tools=[weather])
    async def travel(text: str) -> str:
        """{{ text }}"""

    server.script(Fault.tool_call("weather", {"city": "Paris"}), Fault.ok("Sunny."))
    assert await travel("Weather in Paris?") == "Sunny."
    first, second = server.chat_requests
    assert first.body["tool_choice"] == "auto"
    assert [t["function"]["name"] for t in first.body["tools"]] == ["weather"]
    assistant, result = second.body["messages"][-2:]
    # llama.cpp's server rejects a null content: the assistant's tool-call turn carries "".
    assert assistant["content"] == ""
    assert assistant["tool_calls"][0]["function"]["name"] == "weather"
    assert result == {
        "role": "tool",
        "tool_call_id": assistant["tool_calls"][0]["id"],
        "content": "sunny in Paris",
    }


async def test_llamacpp_offers_tools_through_the_prompt(server: FaultServer) -> None:
    @agent(model="llamacpp/tools", base_url=server.base_url, tools=[weather])
    async def travel(text: str) -> str:
        """{{ text }}"""

    server.script(
        Fault.ok('{"tool": "weather", "arguments": {"city": "Paris"}}'),
        Fault.ok('{"answer": "Sunny in Paris."}'),
    )
    assert await travel("Weather in Paris?") == "Sunny in Paris."
    first, second = server.chat_requests
    assert "tools" not in first.body and "tool_choice" not in first.body
    # Held to a tool call with the tool's own arguments, or an answer.
    options = first.body["response_format"]["schema"]["anyOf"]
    assert options[0]["properties"]["arguments"]["required"] == ["city"]
    assert second.body["messages"][-1]["content"].startswith("Result of weather: sunny in Paris")


async def test_native_tools_refused_by_the_server_go_through_the_prompt(
    server: FaultServer,
) -> None:
    @agent(model="vllm/no-tools", base_url=server.base_url, tools=[weather])
    async def travel(text: str) -> str:
        """{{ text }}"""

    # vLLM without --enable-auto-tool-choice answers so.
    refusal = Fault("400", text='"auto" tool choice requires --enable-auto-tool-choice')
    server.script(
        refusal,
        Fault.ok('{"tool": "weather", "arguments": {"city": "Paris"}}'),
        Fault.ok('{"answer": "Sunny."}'),
    )
    with capture_events() as events:
        assert await travel("Weather in Paris?") == "Sunny."
    first, second, _ = server.chat_requests
    assert "tools" in first.body
    assert "tools" not in second.body and "weather(city: string)" in str(second.body)
    assert [s.name for s in events.spans(kind="tool")] == ["weather"]
    # Remembered: the next call offers the tools through the prompt at once.
    server.script(Fault.ok('{"answer": "Cloudy."}'))
    assert await travel("Weather in Oslo?") == "Cloudy."
    assert "tools" not in server.chat_requests[3].body


async def test_native_tools_chosen_and_refused_is_an_error(server: FaultServer) -> None:
    @agent(model="vllm/no-tools-2", base_url=server.base_url, tools=[weather], tool_mode="native")
    async def travel(text: str) -> str:
        """{{ text }}"""

    server.script(Fault("400", text='"auto" tool choice requires --enable-auto-tool-choice'))
    with pytest.raises(UnsupportedRequestError, match="does not take native tool calls") as e:
        await travel("Weather in Paris?")
    assert e.value.feature == "tools"
    assert len(server.chat_requests) == 1


async def test_the_embedded_model_refuses_native_tools() -> None:
    from kagura.providers.local import LocalModel

    with pytest.raises(UsageError, match="no native tool calling"):
        await LocalModel().request(
            ModelRequest([{"role": "user", "content": "hi"}], tools=[weather.spec])
        )


async def test_the_embedded_model_refuses_native_tools_when_streamed_too() -> None:
    # Not the tools dropped and an answer streamed without them.
    from kagura.providers.local import LocalModel

    stream = LocalModel().stream(
        ModelRequest([{"role": "user", "content": "hi"}], tools=[weather.spec])
    )
    with pytest.raises(UsageError, match="no native tool calling"):
        await anext(stream)


# -- answers cut off by max_tokens ----------------------------------------------------------------


async def test_a_typed_answer_cut_off_by_max_tokens_is_never_a_result(server: FaultServer) -> None:
    city = _city_agent("cut-off", server.base_url, max_tokens=8)
    server.script(Fault.ok('{"name": "Os', finish_reason="length"))
    with pytest.raises(OutputParseError) as caught:
        await city("Oslo")
    message = str(caught.value)
    assert "cut off by max_tokens=8" in message
    assert "@agent(max_tokens=...)" in message
    assert len(server.chat_requests) == 1  # asking again under the same limit would not help


async def test_an_answer_that_parses_but_was_cut_off_is_not_a_result() -> None:
    # "4" of "42": a prefix that happens to validate.
    fake = FakeModel([Reply("4", finish_reason="length")])

    @agent(model=fake, max_tokens=1)
    async def answer(q: str) -> int:
        """{{ q }}"""

    with pytest.raises(OutputParseError, match="cut off by max_tokens=1"):
        await answer("six times seven?")


async def test_a_prompted_tool_answer_cut_off_is_not_a_result() -> None:
    # The README's travel_agent on the embedded model returned this, truncated, as its answer.
    fake = FakeModel(
        [Reply('{ "answer": ".100 euros is 100 euros, but', finish_reason="length")],
        supports_tools=False,
    )

    @agent(model=fake, tools=[weather])
    async def travel(question: str) -> str:
        """{{ question }}"""

    with pytest.raises(OutputParseError, match="cut off by the server's default output limit"):
        await travel("How much is 100 euros?")


async def test_cut_off_text_stays_a_text_result() -> None:
    # For str results max_tokens caps the text: the shortened text is the answer.
    fake = FakeModel([Reply("Once upon a time", finish_reason="length")])

    @agent(model=fake, max_tokens=4)
    async def story(q: str) -> str:
        """{{ q }}"""

    assert await story("a story") == "Once upon a time"


async def test_a_prompted_answer_that_is_broken_json_is_asked_again() -> None:
    fake = FakeModel(['{"answer": "Sunny', '{"answer": "Sunny."}'], supports_tools=False)

    @agent(model=fake, tools=[weather])
    async def travel(question: str) -> str:
        """{{ question }}"""

    assert await travel("Weather?") == "Sunny."
    assert "is not valid" in fake.requests[1].messages[-1]["content"]


async def test_a_repeated_prompted_call_gets_its_result_and_an_answer_only_schema() -> None:
    call = '{"tool": "weather", "arguments": {"city": "Paris"}}'
    fake = FakeModel([call, call, '{"answer": "Sunny."}'], supports_tools=False)
    runs: list[str] = []

    @tool
    def weather(city: str) -> str:
        """The weather in a city."""
        runs.append(city)
        return f"sunny in {city}"

    @agent(model=fake, tools=[weather])
    async def travel(question: str) -> str:
        """{{ question }}"""

    assert await travel("Weather?") == "Sunny."
    assert runs == ["Paris"]  # the tool ran once
    third = fake.requests[2]
    assert "You already called weather" in third.messages[-1]["content"]
    assert third.output_schema is not None and "anyOf" not in third.output_schema.schema


# -- connection errors name the endpoint ----------------------------------------------------------


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


async def test_a_connection_failure_names_the_base_url_and_where_it_came_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = _closed_port_url()
    endpoint = Endpoint("llamacpp", url, "LLAMACPP_BASE_URL", None, False)
    monkeypatch.delenv("LLAMACPP_BASE_URL", raising=False)
    model = OpenAIChatModel("smollm2", endpoint=endpoint)

    @agent(model=model, retry=False)
    async def ask(text: str) -> str:
        """{{ text }}"""

    with pytest.raises(ProviderConnectionError) as caught:
        await ask("hi")
    assert f"connection to {url} failed" in str(caught.value)
    assert "llamacpp's default: set LLAMACPP_BASE_URL or pass base_url=" in str(caught.value)

    monkeypatch.setenv("LLAMACPP_BASE_URL", url)
    other = OpenAIChatModel("smollm2", endpoint=ENDPOINTS["llamacpp"])
    with pytest.raises(ProviderConnectionError, match=r"\(from LLAMACPP_BASE_URL\)"):
        await agent(model=other, retry=False)(ask.fn)("hi")


async def test_credentials_in_a_base_url_never_reach_the_error() -> None:
    url = _closed_port_url().replace("http://", "http://user:hunter2@")

    @agent(model="vllm/x", base_url=url, retry=False)
    async def ask(text: str) -> str:
        """{{ text }}"""

    with pytest.raises(ProviderConnectionError) as caught:
        await ask("hi")
    assert "hunter2" not in str(caught.value)
    assert "(the agent's base_url)" in str(caught.value)


async def test_a_stream_steps_down_a_rejected_response_format_too(server: FaultServer) -> None:
    city = _city_agent("stream-stepped-down", server.base_url)
    server.script(
        Fault("500", text="Input should be 'text' or 'json_object' (body.response_format.type)"),
        Fault.ok('{"name": "Oslo", "country": "Norway"}'),
    )
    items = [item async for item in city.stream("Oslo")]
    assert items[-1] == City(name="Oslo", country="Norway")
    first, second = server.chat_requests
    assert first.body["stream"] is True and _format(first.body)["type"] == "json_schema"
    assert second.body["stream"] is True and _format(second.body)["type"] == "json_object"


# -- what counts as a refusal ----------------------------------------------------------------------


async def test_a_server_error_that_mentions_tools_is_retried_not_a_refusal(
    server: FaultServer,
) -> None:
    @agent(model="vllm/flaky-tools", base_url=server.base_url, tools=[weather], retry=True)
    async def travel(text: str) -> str:
        """{{ text }}"""

    server.script(
        Fault("500", text="internal error in tool-call parser, please retry"), Fault.ok("Sunny.")
    )
    assert await travel("Weather in Paris?") == "Sunny."
    assert ["tools" in r.body for r in server.chat_requests] == [True, True]  # retried as sent
    # Not remembered as a refusal: the next call offers native tools again.
    server.script(Fault.ok("Cloudy."))
    assert await travel("Weather in Oslo?") == "Cloudy."
    assert "tools" in server.chat_requests[2].body


async def test_a_bad_request_about_a_tool_message_is_not_a_tools_refusal(
    server: FaultServer,
) -> None:
    @agent(model="openai/tool-turns", base_url=server.base_url, tools=[weather], retry=True)
    async def travel(text: str) -> str:
        """{{ text }}"""

    # OpenAI's answer to a tool result with no tool call before it: the request's messages are
    # wrong, the server takes tools.
    bad_turn = (
        "Invalid parameter: messages with role 'tool' must be a response to a preceeding "
        "message with 'tool_calls'."
    )
    server.script(Fault("400", text=bad_turn))
    with pytest.raises(ProviderError) as caught:
        await travel("Weather in Paris?")
    assert type(caught.value) is ProviderError and caught.value.status_code == 400
    assert len(server.chat_requests) == 1
    server.script(Fault.ok("Sunny."))
    assert await travel("Weather in Paris?") == "Sunny."
    assert "tools" in server.chat_requests[1].body


async def test_a_server_error_that_mentions_json_object_is_retried_not_stepped_down(
    server: FaultServer,
) -> None:
    city = _city_agent("flaky-format", server.base_url, retry=True)
    server.script(
        Fault("500", text="internal error: json_object grammar failed to load, please retry"),
        Fault.ok('{"name": "Oslo", "country": "Norway"}'),
    )
    assert await city("Oslo") == City(name="Oslo", country="Norway")
    assert [_format(r.body)["type"] for r in server.chat_requests] == ["json_schema"] * 2
    server.script(Fault.ok('{"name": "Rome", "country": "Italy"}'))
    assert await city("Rome") == City(name="Rome", country="Italy")
    assert _format(server.chat_requests[2].body)["type"] == "json_schema"


@pytest.mark.parametrize(
    ("status", "text", "refused"),
    [
        # Refusals of native tools, as servers word them.
        (400, '"auto" tool choice requires --enable-auto-tool-choice', "tools"),  # vLLM
        (400, "registry.ollama.ai/library/gemma:2b does not support tools", "tools"),  # Ollama
        (400, "tools is not supported in this model.", "tools"),  # OpenAI
        (400, "Unrecognized request argument supplied: tools", "tools"),  # Azure OpenAI
        (500, "tools param requires --jinja flag", "tools"),  # llama-server
        # Refusals of a response format.
        (400, "response_format json_schema is not supported", "output"),
        (
            400,
            "Invalid parameter: 'response_format' of type 'json_schema' is not supported with "
            "this model.",
            "output",
        ),
        (422, "Unknown parameter: 'response_format.json_schema'.", "output"),
        (
            500,
            "Input should be 'text' or 'json_object' (body.response_format.type)",
            "output",
        ),  # llama-cpp-python
        # Errors that name a field without refusing it.
        (500, "internal error in tool-call parser, please retry", None),
        (503, "tools are not supported while the server is loading", None),
        (
            400,
            "Invalid parameter: messages with role 'tool' must be a response to a preceeding "
            "message with 'tool_calls'.",
            None,
        ),
        (400, "Unexpected role 'tool' after role 'user'", None),
        (500, "failed to parse the json_object the model wrote", None),
        (400, "This model's maximum context length is 8192 tokens (json_schema included)", None),
    ],
)
def test_a_refusal_is_told_from_an_error_that_names_the_field(
    status: int, text: str, refused: str | None
) -> None:
    from kagura.providers import _chat

    error = ProviderError(text, model="m", status_code=status, body=None)
    assert _chat._rejects(error, _chat._TOOLS_REFUSAL) == (refused == "tools")
    assert _chat._rejects(error, _chat._OUTPUT_REFUSAL) == (refused == "output")


async def test_a_password_in_the_base_url_stays_out_of_rejections(
    server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = server.base_url.replace("http://", "http://bob:hunter2-secret@")
    rejection = Fault("400", text="response_format json_schema is not supported")
    server.script(rejection, Fault.ok('{"name": "Oslo", "country": "Norway"}'))
    with caplog.at_level(logging.WARNING, logger="kagura.providers"):
        assert await _city_agent("password-url", url)("Oslo") == City(name="Oslo", country="Norway")
    [warning] = [r for r in caplog.records if r.name == "kagura.providers"]
    assert f"at {server.base_url} rejected" in warning.getMessage()
    assert "hunter2" not in warning.getMessage()

    server.script(rejection)
    chosen = _city_agent("password-url-chosen", url, output_mode="json_schema")
    with pytest.raises(UnsupportedRequestError) as caught:
        await chosen("Oslo")
    assert f"at {server.base_url} rejected" in str(caught.value)
    assert "hunter2" not in str(caught.value)
