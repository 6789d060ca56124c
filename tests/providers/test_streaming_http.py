"""Streaming over real HTTP: server-sent events from the fault server (faults mid-stream) and from
llama-cpp-python's own server on the embedded GGUF (``python -m llama_cpp.server``).

Every wait here is for something to happen (a request, a disconnect, a line in a log), bounded;
no test sleeps to let something happen or asserts on how long anything took.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from kagura import Agent, agent, tool
from kagura.errors import (
    ProviderConnectionError,
    ProviderError,
    ProviderTimeout,
    StreamBrokenError,
)
from kagura.providers.openai import OpenAIChatModel
from kagura.resilience import no_waits, reset_breakers
from kagura.testing import capture_events
from kagura.testing.fault_server import Fault, FaultServer
from tests import _llamacpp

pytestmark = pytest.mark.timeout(120)

SECRET = "sk-test-secret"
LIMIT = 15  # seconds: the bound put on each network interaction with the fault server


@pytest.fixture(autouse=True)
def _no_waits() -> Iterator[None]:
    """Retry waits are not slept; breakers start closed."""
    reset_breakers()
    with no_waits():
        yield
    reset_breakers()


@pytest.fixture
async def server() -> AsyncIterator[FaultServer]:
    async with FaultServer() as srv:
        # The SDK imported and this loop's client built before any test starts a clock: set-up
        # counts against a total_timeout, and takes seconds on a loaded machine.
        await OpenAIChatModel("test-model", base_url=srv.base_url, api_key=SECRET).prepare()
        yield srv


class City(BaseModel):
    name: str
    country: str


def teller(base_url: str, model: str = "openai/test-model", **settings: Any) -> Agent[[str], str]:
    @agent(model=model, base_url=base_url, api_key=SECRET, **settings)
    async def tell(text: str) -> str:
        """{{ text }}"""

    return tell


async def collect(items: AsyncIterator[Any]) -> list[Any]:
    async with asyncio.timeout(LIMIT):
        return [item async for item in items]


# -- the fault server ------------------------------------------------------------------------------


async def test_text_streams_over_server_sent_events(server: FaultServer) -> None:
    tell = teller(server.base_url)
    server.script(Fault.ok("Tides rise and fall twice a day.", usage=(11, 7)))
    with capture_events() as events:
        deltas = await collect(tell.stream("Tell me about tides."))
    assert deltas == ["Tides", " rise", " and", " fall", " twice", " a", " day."]

    (request,) = server.requests
    assert request.body["stream"] is True
    assert request.body["stream_options"] == {"include_usage": True}
    (attempt,) = events.spans(kind="llm")
    assert attempt.status == "completed"
    assert attempt.usage is not None
    assert (attempt.usage.prompt_tokens, attempt.usage.completion_tokens) == (11, 7)
    assert attempt.attributes["finish_reason"] == "stop"
    assert attempt.attributes["ttft_ms"] >= 0
    assert attempt.attributes["output"] == "Tides rise and fall twice a day."


async def test_a_typed_answer_streams_as_partial_values(server: FaultServer) -> None:
    @agent(model="openai/test-model", base_url=server.base_url, api_key=SECRET)
    async def locate(text: str) -> City:
        """Which city? {{ text }}"""

    server.set_json_answer({"name": "Porto", "country": "Portugal"})
    items = await collect(locate.stream("the city of port wine"))
    assert items == [City(name="Porto", country="Portugal")]
    response_format = server.requests[0].body["response_format"]
    assert response_format["json_schema"]["schema"] == City.model_json_schema()


async def test_a_reset_after_the_first_chunk_raises_and_is_not_retried(server: FaultServer) -> None:
    tell = teller(server.base_url)
    server.script(Fault("stream_reset", text="One two three four."), "ok")
    deltas: list[str] = []
    with pytest.raises(StreamBrokenError) as caught:
        async with asyncio.timeout(LIMIT):
            async for delta in tell.stream("count"):
                deltas.append(delta)
    assert deltas == ["One"]
    assert isinstance(caught.value.__cause__, ProviderConnectionError)
    assert "after 3 characters (1 items yielded)" in str(caught.value)
    assert server.request_count == 1  # never restarted: "One" would have been shown twice


async def test_a_stream_that_stops_without_done_is_an_error(server: FaultServer) -> None:
    tell = teller(server.base_url)
    server.script(Fault("stream_cut", text="One two three four.", after_chunks=2))
    deltas: list[str] = []
    with pytest.raises(StreamBrokenError, match="without a finish reason") as caught:
        async with asyncio.timeout(LIMIT):
            async for delta in tell.stream("count"):
                deltas.append(delta)
    assert deltas == ["One", " two"]
    assert isinstance(caught.value.__cause__, ProviderConnectionError)
    assert server.request_count == 1


async def test_an_error_event_part_way_is_a_provider_error_with_its_message(
    server: FaultServer,
) -> None:
    """A server that fails after it started answering says so in an event of the stream
    (``data: {"error": {...}}``, as OpenAI does): an error carrying its message, not a chunk."""
    tell = teller(server.base_url)
    server.script(Fault("stream_error", text="One two three four.", after_chunks=2))
    deltas: list[str] = []
    with pytest.raises(StreamBrokenError) as caught:
        async with asyncio.timeout(LIMIT):
            async for delta in tell.stream("count"):
                deltas.append(delta)
    assert deltas == ["One", " two"]
    cause = caught.value.__cause__
    assert type(cause) is ProviderError
    assert "error event in the stream: the model failed mid-answer (fault injected)" in str(cause)
    assert cause.body is not None and json.loads(cause.body)["error"]["type"] == "server_error"
    assert server.request_count == 1


@pytest.mark.parametrize(
    "fault",
    [
        Fault("stream_reset", after_chunks=0),
        Fault("stream_cut", after_chunks=0),
        "malformed",
        "503",
    ],
    ids=["reset", "cut", "malformed", "503"],
)
async def test_a_failure_before_any_text_is_retried(server: FaultServer, fault: Any) -> None:
    tell = teller(server.base_url)
    server.script(fault, Fault.ok("Second time."))
    with capture_events() as events:
        assert await collect(tell.stream("again")) == ["Second", " time."]
    assert server.request_count == 2
    assert [s.status for s in events.spans(kind="llm")] == ["failed", "completed"]


async def test_a_stalled_stream_fails_after_the_per_chunk_timeout(server: FaultServer) -> None:
    # timeout bounds each wait for a chunk: the stream stalls after its first word. (Ample for
    # the first chunk, which a server on this loop sends at once, however loaded the machine.)
    tell = teller(server.base_url, timeout=2)
    server.script(Fault("stream_hang", text="One two three."))
    deltas: list[str] = []
    with pytest.raises(StreamBrokenError) as caught:
        async with asyncio.timeout(LIMIT):
            async for delta in tell.stream("count"):
                deltas.append(delta)
    assert deltas == ["One"]
    assert isinstance(caught.value.__cause__, ProviderTimeout)
    assert "no next chunk within 2s" in str(caught.value)
    await server.wait_disconnects(1, timeout=LIMIT)  # the connection was closed
    assert server.request_count == 1


async def test_no_first_chunk_within_the_timeout_is_retried(server: FaultServer) -> None:
    tell = teller(server.base_url, timeout=2)
    server.script("hang", Fault.ok("Awake."))
    with capture_events() as events:
        assert await collect(tell.stream("wake up")) == ["Awake."]
    first, _ = server.requests
    await server.wait_disconnects(1, timeout=LIMIT)
    assert first.client_gone
    timed_out, completed = events.spans(kind="llm")
    assert (timed_out.status, completed.status) == ("timed_out", "completed")
    assert timed_out.error == "openai/test-model: no first chunk within 2s"


async def test_the_total_timeout_bounds_the_whole_stream(server: FaultServer) -> None:
    tell = teller(server.base_url, total_timeout=3)
    server.script(Fault("stream_hang", text="One two three."))
    deltas: list[str] = []
    # Run out after the first item, it is a broken stream: what was shown stays shown.
    with pytest.raises(StreamBrokenError, match="the total timeout of 3s ran out") as caught:
        async with asyncio.timeout(LIMIT):
            async for delta in tell.stream("count"):
                deltas.append(delta)
    assert deltas == ["One"]
    assert caught.value.text == "One"
    assert isinstance(caught.value.__cause__, ProviderTimeout)
    await server.wait_disconnects(1, timeout=LIMIT)


async def test_the_total_timeout_before_the_first_item_is_a_timeout(server: FaultServer) -> None:
    tell = teller(server.base_url, total_timeout=3)
    server.script("hang")
    with pytest.raises(TimeoutError, match="no answer within the total timeout of 3s"):
        await collect(tell.stream("count"))
    await server.wait_disconnects(1, timeout=LIMIT)


async def test_a_page_answered_instead_of_a_stream_is_quoted_in_the_error(
    server: FaultServer,
) -> None:
    # Not a stream cut short (a connection error, retried as one): something else answered.
    tell = teller(server.base_url, retry=False)
    server.script("html")
    with pytest.raises(ProviderError) as caught:
        await collect(tell.stream("count"))
    assert not isinstance(caught.value, ProviderConnectionError)
    assert re.search(
        r"not a stream of server-sent events \(HTTP 200, text/html: '<html>.*502 Bad Gateway",
        str(caught.value),
    )


async def test_leaving_a_stream_early_closes_the_connection(server: FaultServer) -> None:
    tell = teller(server.base_url)
    server.script(Fault("stream_hang", text="One two three four.", after_chunks=2))
    with capture_events() as events:
        async with asyncio.timeout(LIMIT), tell.stream("count") as stream:
            async for delta in stream:
                assert delta == "One"
                break
        await server.wait_disconnects(1, timeout=LIMIT)
    (request,) = server.requests
    assert request.client_gone
    assert [s.status for s in events.spans(kind="agent")] == ["cancelled"]
    assert [s.status for s in events.spans(kind="llm")] == ["cancelled"]


async def test_cancelling_the_reading_task_closes_the_connection(server: FaultServer) -> None:
    tell = teller(server.base_url)
    server.script(Fault("stream_hang", text="One two three four."))
    first = asyncio.Event()

    async def read() -> None:
        async for _ in tell.stream("count"):
            first.set()

    task = asyncio.create_task(read())
    async with asyncio.timeout(LIMIT):
        await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await server.wait_disconnects(1, timeout=LIMIT)
    assert server.requests[0].client_gone


async def test_tool_calls_stream_in_pieces_and_run_between_rounds(server: FaultServer) -> None:
    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    tell = teller(server.base_url, tools=[add])
    server.script(Fault.tool_call("add", {"a": 2, "b": 3}, id="call_add"), Fault.ok("It is 5."))
    assert await collect(tell.stream("What is 2 + 3?")) == ["It", " is", " 5."]
    assert server.requests[1].messages[-1] == {
        "role": "tool",
        "tool_call_id": "call_add",
        "content": "5",
    }


async def test_litellm_streams_over_http(
    server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = pytest.importorskip("litellm", reason="the [litellm] extra is not installed")
    monkeypatch.setattr(litellm, "suppress_debug_info", True)
    tell = teller(server.base_url, "litellm/openai/test-model")

    server.script(Fault.ok("Through LiteLLM, word by word.", usage=(5, 5)))
    with capture_events() as events:
        async with asyncio.timeout(60):  # the first use imports LiteLLM
            deltas = [delta async for delta in tell.stream("go")]
    assert "".join(deltas) == "Through LiteLLM, word by word."
    assert len(deltas) > 1
    (attempt,) = events.spans(kind="llm")
    assert attempt.usage is not None and attempt.usage.completion_tokens == 5
    assert server.requests[0].body["stream"] is True

    server.script(Fault("stream_reset", text="Broken after this."))
    with pytest.raises(StreamBrokenError):
        await collect(tell.stream("go"))


def test_the_fault_server_streams_as_openai_does() -> None:
    payload = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with FaultServer.run_in_thread(answer="Hello there") as srv:
        request = urllib.request.Request(
            srv.base_url + "/chat/completions",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=LIMIT) as response:
            assert response.headers["content-type"] == "text/event-stream"
            body = response.read().decode()
    events = [line.removeprefix("data: ") for line in body.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * len(chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == "Hello there"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


# -- llama-cpp-python's server ---------------------------------------------------------------------

# SmolLM2's end-of-generation tokens (<|endoftext|>, <|im_end|>): biased away, it writes on until
# max_tokens, so that how many tokens a generation made says whether it was stopped.
NEVER_STOP = {"0": -100, "2": -100}
PERF_RUNS = re.compile(r"llama_perf_context_print:\s+eval time =.*?/\s+(\d+) runs")


def log_since(server: _llamacpp.LlamaCppServer, offset: int) -> str:
    return server.log_path.read_bytes()[offset:].decode(errors="replace")


async def log_shows(
    server: _llamacpp.LlamaCppServer, offset: int, pattern: str, count: int = 1
) -> str:
    """The server's log since ``offset`` once ``pattern`` occurs ``count`` times in it. The
    server is another process, whose log can only be polled: bounded, and never a condition of
    the test by itself."""
    deadline = time.monotonic() + 60
    while True:
        text = log_since(server, offset)
        if len(re.findall(pattern, text)) >= count:
            return text
        if time.monotonic() > deadline or server.process.poll() is not None:
            pytest.fail(f"the llama.cpp server log never showed {pattern!r}:\n{text[-3000:]}")
        await asyncio.sleep(0.05)


@pytest.mark.local_model
async def test_streaming_from_a_llamacpp_server(llamacpp_server: _llamacpp.LlamaCppServer) -> None:
    tell = teller(llamacpp_server.base_url, "llamacpp/smollm2", max_tokens=24, temperature=0)
    with capture_events() as events:
        async with asyncio.timeout(60):
            deltas = [delta async for delta in tell.stream("Say hello to the sea.")]
    assert len(deltas) > 3  # token by token, not one chunk
    (attempt,) = events.spans(kind="llm")
    (call,) = events.spans(kind="agent")
    assert attempt.attributes["output"] == "".join(deltas)
    assert call.attributes["output"] == "".join(deltas).strip()
    assert attempt.attributes["finish_reason"] in ("stop", "length")
    assert attempt.attributes["ttft_ms"] > 0
    assert attempt.usage is None  # llama-cpp-python's server ignores include_usage


@pytest.mark.local_model
async def test_a_typed_stream_from_a_llamacpp_server(
    llamacpp_server: _llamacpp.LlamaCppServer,
) -> None:
    schema = City.model_json_schema()

    # llama-cpp-python's server makes a grammar of a schema given with json_object.
    @agent(
        model="llamacpp/smollm2",
        base_url=llamacpp_server.base_url,
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object", "schema": schema},
    )
    async def locate(text: str) -> City:
        """Name the city in this text and its country: {{ text }}"""

    async with asyncio.timeout(60):
        items = [item async for item in locate.stream("I flew to Paris last spring.")]
    assert items and all(isinstance(item, City) for item in items)
    assert len(items) == len({item.model_dump_json() for item in items})  # each one new


@pytest.mark.local_model
async def test_cancelling_a_stream_stops_the_llamacpp_server_generating(
    llamacpp_server: _llamacpp.LlamaCppServer,
) -> None:
    """The server's log shows it. A generation that ends prints llama.cpp's counters, among them
    "eval time = ... / N runs", one run per token after the first; one the client left is
    stopped when the server notices the disconnect ("Disconnected from client"), and never gets
    to print them. So: a stream read to its end prints its runs; a stream asked for 1,500 tokens
    and left after three deltas prints none, the server moves on to the next request (its lock
    let go), and no generation anywhere near 1,500 tokens is ever reported."""
    base_url = llamacpp_server.base_url
    settings: dict[str, Any] = {"temperature": 0, "logit_bias": NEVER_STOP}

    offset = llamacpp_server.log_path.stat().st_size
    whole = teller(base_url, "llamacpp/smollm2", max_tokens=40, **settings)
    async with asyncio.timeout(60):
        assert len([d async for d in whole.stream("Write a long story about the sea.")]) > 10
    ran_to_the_end = await log_shows(llamacpp_server, offset, PERF_RUNS.pattern)
    assert [int(n) for n in PERF_RUNS.findall(ran_to_the_end)] == [39]  # 40 tokens

    offset = llamacpp_server.log_path.stat().st_size
    long = teller(base_url, "llamacpp/smollm2", max_tokens=1500, **settings)
    with capture_events() as events:
        async with asyncio.timeout(60), long.stream("Write a long story about the sea.") as stream:
            deltas = [await anext(stream) for _ in range(3)]
    assert len(deltas) == 3
    assert [s.status for s in events.spans(kind="llm")] == ["cancelled"]
    # The server noticed before anything else was asked of it (a new request would interrupt a
    # stream by itself: llama-cpp-python's interrupt_requests), on the stream's own connection.
    noticed = await log_shows(llamacpp_server, offset, r"Disconnected from client")
    (port,) = re.findall(r'127\.0\.0\.1:(\d+) - "POST /v1/chat/completions', noticed)
    assert re.search(rf"Disconnected from client .*port={port}\)", noticed), noticed

    short = teller(base_url, "llamacpp/smollm2", max_tokens=4, **settings)
    async with asyncio.timeout(60):
        await short("Say hi.")
    log = await log_shows(llamacpp_server, offset, PERF_RUNS.pattern)
    runs = [int(n) for n in PERF_RUNS.findall(log)]
    assert runs == [3], log  # the next request's 4 tokens: the cancelled one never finished
    assert llamacpp_server.alive()


async def test_an_error_answered_with_http_200_to_a_stream_is_raised_not_retried(
    server: FaultServer,
) -> None:
    """A JSON error object in place of the stream (HTTP 200, as some servers report an
    exhausted quota): the error carries the server's message, the key cut out."""
    tell = teller(server.base_url)
    server.script(
        Fault("200", text=f"You exceeded your current quota ({SECRET})"), Fault.ok("Never.")
    )
    with pytest.raises(ProviderError) as caught:
        await collect(tell.stream("hi"))
    error = caught.value
    assert type(error) is ProviderError
    assert str(error) == "openai/test-model: HTTP 200: You exceeded your current quota ([REDACTED])"
    assert error.body is not None and SECRET not in error.body
    assert server.request_count == 1


async def test_a_server_that_ignores_stream_true_is_read_as_the_whole_answer(
    server: FaultServer,
) -> None:
    # The fault server answers as such a server does when the body's "stream" is not true.
    tell = teller(server.base_url, provider_kwargs={"extra_body": {"stream": 1}})
    server.script(Fault.ok("All at once.", usage=(4, 3)))
    with capture_events() as events:
        assert await collect(tell.stream("hi")) == ["All at once."]
    assert server.request_count == 1 and server.chat_requests[0].body["stream"] == 1
    [span] = events.spans(kind="llm")
    assert span.status == "completed"
    assert span.usage is not None
    assert (span.usage.prompt_tokens, span.usage.completion_tokens) == (4, 3)


def test_a_whole_completion_read_as_a_stream_keeps_its_tool_calls() -> None:
    from kagura.providers._chunks import ChunkReader, completion_chunk

    calls = [
        {"id": f"call_{n}", "type": "function", "function": {"name": n, "arguments": "{}"}}
        for n in ("a", "b")
    ]
    completion = {
        "model": "served-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": calls},
                "finish_reason": "tool_calls",
            }
        ],
    }
    reader = ChunkReader("openai/test-model")
    assert reader.add(completion_chunk(completion)) == ""
    answer = reader.response()
    assert [(c.id, c.name) for c in answer.tool_calls] == [("call_a", "a"), ("call_b", "b")]
    assert (answer.finish_reason, answer.model) == ("tool_calls", "served-model")
