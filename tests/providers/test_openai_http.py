"""The OpenAI-compatible path over real HTTP, against the fault server on 127.0.0.1.

Every test talks to :class:`kagura.testing.fault_server.FaultServer` over real HTTP (aiohttp,
or LiteLLM), so the wire format, the error translation and the cancellation behaviour are
checked end to end, with no network beyond the loopback interface.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import traceback
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import BaseModel

from kagura import Agent, agent, tool
from kagura._usage import NO_USAGE
from kagura.errors import ProviderConnectionError, ProviderError, ProviderTimeout, UsageError
from kagura.providers import ModelRequest, _http
from kagura.providers.openai import OpenAIChatModel
from kagura.testing import capture_events
from kagura.testing.fault_server import REDACTED, Fault, FaultServer, example_for_schema

pytestmark = pytest.mark.timeout(60)

SECRET = "sk-test-secret"
LIMIT = 15  # seconds: the bound put on each network interaction below


@pytest.fixture
async def server() -> AsyncIterator[FaultServer]:
    async with FaultServer() as srv:
        yield srv


def _secret_free(exc: BaseException) -> None:
    """The API key appears nowhere in the exception, its causes or its formatted traceback."""
    text = "".join(traceback.format_exception(exc))
    chain: BaseException | None = exc
    while chain is not None:
        text += str(chain) + repr(chain)
        chain = chain.__cause__ or chain.__context__
    assert SECRET not in text


def _asker(base_url: str, model: str = "openai/test-model", **settings: Any) -> Agent[[str], str]:
    """An agent that sends its text as the prompt, in a single attempt (no retries), so that each
    call is exactly one request and its error surfaces as it was translated."""

    @agent(model=model, base_url=base_url, api_key=SECRET, retry=False, **settings)
    async def ask(text: str) -> str:
        """{{ text }}"""

    return ask


def _post(url: str, payload: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        url + "/chat/completions",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=LIMIT) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.load(exc)


# -- answers ---------------------------------------------------------------------------------------


async def test_agent_returns_the_text_over_http(server: FaultServer) -> None:
    @agent(model="openai/test-model", base_url=server.base_url, api_key=SECRET)
    async def greet(name: str) -> str:
        """Say hello to {{ name }}."""

    async with asyncio.timeout(LIMIT):
        assert await greet("Ada") == "Say hello to Ada."  # the server echoes the prompt
        server.set_answer("Hello, Ada!")
        assert await greet("Ada") == "Hello, Ada!"

    first, second = server.requests
    assert first.method == "POST"
    assert first.path == "/v1/chat/completions"
    assert first.body["model"] == "test-model"
    assert first.body["messages"] == [{"role": "user", "content": "Say hello to Ada."}]
    assert second.fault == "ok"
    assert first.authorized_with(SECRET)
    assert first.headers["authorization"] == REDACTED


class Person(BaseModel):
    name: str
    age: int


async def test_typed_result_uses_response_format_json_schema(server: FaultServer) -> None:
    @agent(model="openai/test-model", base_url=server.base_url, api_key=SECRET)
    async def extract(text: str) -> Person:
        """Who is described here? {{ text }}"""

    server.set_json_answer({"name": "Ada Lovelace", "age": 36})
    async with asyncio.timeout(LIMIT):
        person = await extract("Ada Lovelace, 36, mathematician")
    assert person == Person(name="Ada Lovelace", age=36)

    (request,) = server.requests
    response_format = request.body["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["name"] == "Person"
    schema = response_format["json_schema"]["schema"]
    assert schema["properties"].keys() == {"name", "age"}
    assert schema == Person.model_json_schema()


async def test_typed_result_from_the_schema_example(server: FaultServer) -> None:
    """Without a configured answer, the server answers the simplest value valid for the schema."""

    @agent(model="openai/test-model", base_url=server.base_url, api_key=SECRET)
    async def count(text: str) -> int:
        """How many words are in: {{ text }}"""

    async with asyncio.timeout(LIMIT):
        assert await count("one two three") == 0
    schema = server.requests[0].body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["result"]["type"] == "integer"


async def test_sampling_settings_and_provider_kwargs_reach_the_body(server: FaultServer) -> None:
    @agent(
        model="openai/test-model",
        base_url=server.base_url,
        api_key=SECRET,
        temperature=0.25,
        max_tokens=64,
        system="You are terse.",
        top_p=0.5,
        seed=7,
        user="tester",
    )
    async def answer(question: str) -> str:
        """{{ question }}"""

    async with asyncio.timeout(LIMIT):
        await answer("Why?")
    body = server.requests[0].body
    assert body["temperature"] == 0.25
    assert body["max_tokens"] == 64
    assert body["top_p"] == 0.5
    assert body["seed"] == 7
    assert body["user"] == "tester"
    assert body["messages"][0] == {"role": "system", "content": "You are terse."}
    assert "tools" not in body
    assert "response_format" not in body


async def test_sdk_request_options_and_server_specific_fields(server: FaultServer) -> None:
    """``create``'s request options (extra_headers, extra_query, extra_body) are applied as the SDK
    applies them; a field it does not know (a server's own sampling option) goes into the body."""

    @agent(
        model="vllm/test-model",
        base_url=server.base_url,
        provider_kwargs={
            "extra_headers": {"X-Request-Tag": "tag-7"},
            "extra_query": {"trace": "on", "verbose": True, "n": 2},
            "extra_body": {"top_k": 5},
            "min_p": 0.1,
        },
    )
    async def answer(question: str) -> str:
        """{{ question }}"""

    async with asyncio.timeout(LIMIT):
        assert await answer("Why?") == "Why?"
    (request,) = server.requests
    assert request.headers["x-request-tag"] == "tag-7"
    assert (request.path, request.query) == ("/v1/chat/completions", "trace=on&verbose=true&n=2")
    assert request.body["top_k"] == 5
    assert request.body["min_p"] == 0.1
    assert not {"extra_headers", "extra_query", "extra_body"} & request.body.keys()


async def test_usage_tokens_are_parsed(server: FaultServer) -> None:
    server.script(Fault.ok("four words right here", usage=(123, 45)))
    model = OpenAIChatModel("test-model", base_url=server.base_url, api_key=SECRET)
    async with asyncio.timeout(LIMIT):
        response = await model.request(ModelRequest([{"role": "user", "content": "count me"}]))
        assert response.usage.prompt_tokens == 123
        assert response.usage.completion_tokens == 45
        assert response.model == "test-model"
        assert response.finish_reason == "stop"

        # And through an agent, into its spans: the server counts words by default.
        @agent(model="openai/test-model", base_url=server.base_url, api_key=SECRET)
        async def echo(text: str) -> str:
            """{{ text }}"""

        with capture_events() as events:
            await echo("three little words")
    (llm,) = events.spans(kind="llm")
    assert llm.usage is not None
    assert (llm.usage.prompt_tokens, llm.usage.completion_tokens) == (3, 3)
    (agent_span,) = events.spans(kind="agent")
    assert agent_span.usage == llm.usage


async def test_native_tool_call_loop_over_http(server: FaultServer) -> None:
    calls: list[tuple[int, int]] = []

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append((a, b))
        return a + b

    @agent(model="openai/test-model", base_url=server.base_url, api_key=SECRET, tools=[add])
    async def calculate(question: str) -> str:
        """{{ question }}"""

    server.script(Fault.tool_call("add", {"a": 2, "b": 3}, id="call_add"), Fault.ok("2 + 3 = 5"))
    async with asyncio.timeout(LIMIT):
        assert await calculate("What is 2 + 3?") == "2 + 3 = 5"
    assert calls == [(2, 3)]

    first, second = server.requests
    (offered,) = first.body["tools"]
    assert offered["type"] == "function"
    assert offered["function"]["name"] == "add"
    assert offered["function"]["parameters"]["properties"].keys() == {"a", "b"}
    assistant, tool_message = second.messages[-2:]
    assert assistant["role"] == "assistant"
    assert assistant["tool_calls"][0]["id"] == "call_add"
    assert assistant["tool_calls"][0]["function"]["name"] == "add"
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"a": 2, "b": 3}
    assert tool_message == {"role": "tool", "tool_call_id": "call_add", "content": "5"}


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status"), [("429", 429), ("500", 500), ("503", 503), ("401", 401), ("400", 400)]
)
async def test_http_errors_become_provider_errors(
    server: FaultServer, fault: str, status: int
) -> None:
    ask = _asker(server.base_url)

    server.script(fault)
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ProviderError) as caught:
            await ask("hello")
    error = caught.value
    assert type(error) is ProviderError
    assert error.status_code == status
    assert error.model == "openai/test-model"
    # The message is the one in the server's JSON body, which is kept.
    assert error.body is not None
    message = json.loads(error.body)["error"]["message"]
    assert "fault injected" in message
    assert str(error) == f"openai/test-model: HTTP {status}: {message}"
    assert error.retry_after == (1.0 if status == 429 else None)
    _secret_free(error)
    # Kagura's policies own retries (off here): exactly one request reached the server.
    assert server.request_count == 1


async def test_retry_after_is_read_from_the_header(server: FaultServer) -> None:
    server.script(Fault("429", retry_after=7), Fault("503", retry_after="2.5"))
    model = OpenAIChatModel("test-model", base_url=server.base_url, api_key=SECRET)
    request = ModelRequest([{"role": "user", "content": "hi"}])
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ProviderError) as rate_limited:
            await model.request(request)
        with pytest.raises(ProviderError) as unavailable:
            await model.request(request)
    assert rate_limited.value.headers["retry-after"] == "7"
    assert rate_limited.value.retry_after == 7.0
    assert unavailable.value.status_code == 503
    assert unavailable.value.retry_after == 2.5


async def test_malformed_json_becomes_a_provider_error(server: FaultServer) -> None:
    ask = _asker(server.base_url)

    server.script("malformed")
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ProviderError) as caught:
            await ask("hello")
    assert "malformed" in str(caught.value)
    assert caught.value.__cause__ is not None
    _secret_free(caught.value)


async def test_a_page_answered_instead_of_json_is_quoted_in_the_error(server: FaultServer) -> None:
    # A proxy or a captive portal answers 200 with a page of its own: the error says what came.
    ask = _asker(server.base_url)
    server.script("html")
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ProviderError) as caught:
            await ask("hello")
    assert re.search(
        r"malformed response: .* \(HTTP 200, text/html: '<html>.*502 Bad Gateway", str(caught.value)
    )


def test_an_answer_missing_optional_fields_is_read_as_they_are_absent() -> None:
    """The answer is read from the JSON the server sent: servers that call themselves
    OpenAI-compatible leave out usage, model, finish reason or a tool call's id."""
    from kagura.providers._chat import to_response

    answer = to_response(
        {
            "choices": [
                {
                    "message": {
                        "content": None,
                        "tool_calls": [{"function": {"name": "add", "arguments": None}}],
                    }
                }
            ]
        },
        "openai/test-model",
    )
    assert (answer.text, answer.model, answer.finish_reason) == ("", "openai/test-model", None)
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (0, 0)
    assert [(c.id, c.name, c.arguments) for c in answer.tool_calls] == [(None, "add", "{}")]


def test_a_body_nested_deeper_than_json_loads_recurses_is_a_malformed_response() -> None:
    # json.loads raises RecursionError for it, which escaped as it was rather than as the
    # server's malformed answer.
    from types import SimpleNamespace

    from kagura.providers._chat import message_of

    deep = "[" * 3000
    response: Any = SimpleNamespace(status=200, content_type="application/json", headers={})
    client: Any = SimpleNamespace(secrets=())
    with pytest.raises(ProviderError, match="malformed response"):
        _http.Client._answer(client, response, deep.encode(), "openai/test-model", ())
    with pytest.raises(ProviderError, match="malformed stream chunk"):
        _http._chunk("", deep, "openai/test-model", None)
    assert message_of(deep) is None


@pytest.mark.parametrize("body", [{"choices": []}, {"choices": [{}]}, [1, 2], "text", None])
def test_an_answer_without_a_message_is_a_malformed_response(body: Any) -> None:
    from kagura.providers._chat import to_response

    with pytest.raises(ProviderError, match="malformed response") as caught:
        to_response(body, "openai/test-model")
    assert caught.value.model == "openai/test-model"


@pytest.mark.parametrize("fault", ["reset", "truncated"])
async def test_broken_connections_become_provider_errors(server: FaultServer, fault: str) -> None:
    ask = _asker(server.base_url)

    server.script(fault)
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ProviderError) as caught:
            await ask("hello")
    error = caught.value
    assert isinstance(error, ProviderConnectionError)
    assert isinstance(error.__cause__, aiohttp.ClientError)
    assert error.status_code is None
    # Says where it tried to connect and what happened.
    assert str(error).split(f"connection to {server.base_url} failed: ", 1)[1]
    _secret_free(error)
    assert server.request_count == 1

    # The client recovers: the next request gets a fresh connection and succeeds.
    async with asyncio.timeout(LIMIT):
        assert await ask("again") == "again"


async def test_a_server_that_hangs_up_without_answering_is_a_connection_error() -> None:
    async with FaultServer(hang_seconds=0) as server:
        ask = _asker(server.base_url)
        server.script("hang")
        async with asyncio.timeout(LIMIT):
            with pytest.raises(ProviderConnectionError) as caught:
                await ask("hello")
            assert await ask("again") == "again"
    assert f"connection to {server.base_url} failed: ServerDisconnectedError" in str(caught.value)
    _secret_free(caught.value)


async def test_credentials_in_the_base_url_are_sent_as_basic_authentication(
    server: FaultServer,
) -> None:
    url = server.base_url.replace("http://", "http://proxy%20user:p%40ss@")
    ask = _asker(url)
    async with asyncio.timeout(LIMIT):
        assert await ask("hello") == "hello"
    (request,) = server.requests
    assert request.authorization_was("Basic " + base64.b64encode(b"proxy user:p@ss").decode())
    assert request.path == "/v1/chat/completions"


async def test_nothing_listening_is_a_connection_error_naming_the_address() -> None:
    async with FaultServer() as server:
        base_url = server.base_url
    ask = _asker(base_url)  # the server has stopped: its port refuses connections
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ProviderConnectionError) as caught:
            await ask("hello")
    assert f"connection to {base_url} failed: ClientConnectorError" in str(caught.value)
    assert "(the agent's base_url)" in str(caught.value)
    _secret_free(caught.value)


async def test_a_burst_keeps_its_connections_for_the_next_one(server: FaultServer) -> None:
    """The connection pool is sized for fan-out: a burst of calls all in flight at once keeps
    every connection it opened, and the next burst of as many opens none (httpx's default pool
    keeps 100)."""
    ask = _asker(server.base_url)
    calls = 250
    for burst in (1, 2):
        server.hold_answers()
        asked = [asyncio.create_task(ask(f"question {i}")) for i in range(calls)]
        await server.wait_requests(calls * burst, timeout=LIMIT)
        server.release_answers()
        async with asyncio.timeout(LIMIT):
            answers = await asyncio.gather(*asked)
        assert answers == [f"question {i}" for i in range(calls)]
        assert server.connections_accepted == calls


_TWO_LOOPS = '''
import asyncio, gc
from kagura import agent
from kagura.testing.fault_server import FaultServer

async def main():
    async with FaultServer() as server:
        @agent(model="m", base_url=server.base_url, api_key="k", retry=False)
        async def ask(text: str) -> str:
            """{{ text }}"""
        print(await ask("one"), await ask("two"))

asyncio.run(main())
asyncio.run(main())
gc.collect()
'''


def test_connections_are_closed_when_the_event_loop_ends(tmp_path: Path) -> None:
    """An aiohttp session left open says so on stderr when collected: the client of each event
    loop is closed as the loop shuts down, here for two asyncio.run in a row."""
    script = tmp_path / "two_loops.py"
    script.write_text(_TWO_LOOPS)
    done = subprocess.run(
        [sys.executable, "-X", "dev", str(script)],
        capture_output=True,
        text=True,
        timeout=LIMIT * 4,
        env={**os.environ, "KAGURA_RECORD": "0"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["one", "two", "one", "two"]
    assert "Unclosed" not in done.stderr, done.stderr


async def test_agents_with_a_key_each_share_one_client_and_each_request_carries_its_own(
    server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service calling with a key per user keeps one client (one session, one pool) per
    endpoint, not one per key, each a socket or more never released while the loop lived; and
    no key is kept in the cache of clients. Credentials in the base URL are the requests' too."""
    monkeypatch.setattr(_http, "_clients", {})
    keys = [f"sk-tenant-{n:03d}-0123456789abcdef" for n in range(40)]
    users = [("tenant-a", "pw-a"), ("tenant-b", "pw-b")]

    def asker(base_url: str, api_key: str | None = None) -> Agent[[str], str]:
        @agent(model="openai/test-model", base_url=base_url, api_key=api_key, retry=False)
        async def ask(text: str) -> str:
            """{{ text }}"""

        return ask

    async with asyncio.timeout(LIMIT):
        for key in keys:
            assert await asker(server.base_url, key)("hello") == "hello"
        for user, password in users:
            url = server.base_url.replace("http://", f"http://{user}:{password}@")
            assert await asker(url)("hello") == "hello"
            _ = [delta async for delta in asker(url).stream("hello")]

    (cached,) = _http._clients  # one endpoint, one loop: one client
    assert not any(key in str(cached) for key in keys)
    assert not any(password in str(cached) for _, password in users)
    requests = server.chat_requests
    assert [r.authorized_with(key) for r, key in zip(requests, keys, strict=False)] == [True] * 40
    called_and_streamed = [user for user in users for _ in range(2)]
    for request, (user, password) in zip(requests[40:], called_and_streamed, strict=True):
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        assert request.authorization_was(f"Basic {basic}")


def test_the_clients_of_every_event_loop_share_one_tls_context_that_verifies() -> None:
    """The system's certificates are loaded once per process, not once per client (25 ms each,
    on every event loop), and certificates and host names are still checked."""

    async def transport_context() -> ssl.SSLContext:
        client = await _http.client("https://example.invalid/v1")
        # aiohttp's connector keeps the context it was given in a private attribute.
        context: ssl.SSLContext = client.session.connector._ssl  # type: ignore[union-attr]
        return context

    first, second = asyncio.run(transport_context()), asyncio.run(transport_context())
    assert first is second is _http.tls()
    assert first.verify_mode is ssl.CERT_REQUIRED and first.check_hostname


def test_event_loops_in_other_threads_make_their_clients_while_one_prunes_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each event loop's thread reads and prunes the cache of clients: another thread's loop
    making its client while this one prunes waits for it, rather than changing the cache under
    its iteration (RuntimeError) or deleting the same stale entry twice (KeyError), either of
    which left the client just made unclosed."""
    moved_on = threading.Event()  # the other thread made its client, or waits for the cache
    others: list[threading.Thread] = []
    made: list[_http.Client] = []
    errors: list[BaseException] = []

    class Lock:
        """The cache's lock, noting another thread that waits for it."""

        def __init__(self) -> None:
            self.lock = threading.Lock()

        def __enter__(self) -> None:
            if not self.lock.acquire(blocking=False):
                moved_on.set()
                self.lock.acquire()

        def __exit__(self, *exc: object) -> None:
            self.lock.release()

    def other_loop() -> None:
        try:
            made.append(asyncio.run(_http.client("http://127.0.0.1:9/other/v1")))
        except BaseException as exc:
            errors.append(exc)
        finally:
            moved_on.set()

    class ClosedLoop:
        """A stale entry's loop: asked whether it is closed, by the prune, it has another
        thread's loop make its client meanwhile."""

        def is_closed(self) -> bool:
            if not others:
                others.append(threading.Thread(target=other_loop))
                others[0].start()
                moved_on.wait()
            return True

    stale: Any = (ClosedLoop(), None, None)
    monkeypatch.setattr(_http, "_clients", {("http://stale/v1", 0): stale})
    monkeypatch.setattr(_http, "_clients_lock", Lock(), raising=False)

    try:
        made.append(asyncio.run(_http.client("http://127.0.0.1:9/this/v1")))
    finally:
        for other in others:
            other.join()
    assert others and errors == []
    # Each closed with its loop (which one is pruned as stale by the other depends on which
    # loop closed first).
    assert len(made) == 2 and all(client.session.closed for client in made)
    assert ("http://stale/v1", 0) not in _http._clients


async def test_hang_is_cancelled_cleanly_and_the_server_sees_the_client_go(
    server: FaultServer,
) -> None:
    ask = _asker(server.base_url)

    server.script("hang")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1):
            await ask("are you there?")
    await server.wait_disconnects(1, timeout=LIMIT)
    (request,) = server.requests
    assert request.fault == "hang"
    assert request.client_gone

    # Nothing is left broken: the same agent works on the next call.
    async with asyncio.timeout(LIMIT):
        assert await ask("still there?") == "still there?"


async def test_a_hang_does_not_block_other_requests(server: FaultServer) -> None:
    ask = _asker(server.base_url)

    server.script("hang")
    hung = asyncio.create_task(ask("stuck"))
    try:
        await server.wait_requests(1, timeout=LIMIT)
        async with asyncio.timeout(LIMIT):
            answers = await asyncio.gather(*(ask(f"question {n}") for n in range(20)))
        assert answers == [f"question {n}" for n in range(20)]
        assert not hung.done()
    finally:
        hung.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hung
    await server.wait_disconnects(1, timeout=LIMIT)
    assert server.request_count == 21


async def test_the_api_key_stays_secret(server: FaultServer) -> None:
    ask = _asker(server.base_url)

    faults = ["429", "500", "503", "401", "400", "malformed", "reset", "truncated"]
    server.script(*faults)
    for _ in faults:
        async with asyncio.timeout(LIMIT):
            with pytest.raises(ProviderError) as caught:
                await ask("hello")
        _secret_free(caught.value)
    requests = server.requests
    assert [r.fault for r in requests] == faults
    for request in requests:
        assert request.headers["authorization"] == REDACTED
        assert request.authorized_with(SECRET)
        assert SECRET not in repr(request)


# -- configuration from the environment ------------------------------------------------------------


async def test_openai_settings_from_the_environment(
    server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-secret")

    @agent(model="gpt-4o-mini")
    async def ask(text: str) -> str:
        """{{ text }}"""

    async with asyncio.timeout(LIMIT):
        assert await ask("from the environment") == "from the environment"
    (request,) = server.requests
    assert request.body["model"] == "gpt-4o-mini"
    assert request.authorized_with("sk-env-secret")


async def test_ollama_needs_no_key(server: FaultServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_BASE_URL", server.base_url)

    @agent(model="ollama/llama3")
    async def ask(text: str) -> str:
        """{{ text }}"""

    async with asyncio.timeout(LIMIT):
        assert await ask("no key needed") == "no key needed"
    (request,) = server.requests
    assert request.body["model"] == "llama3"
    assert not request.authorized_with(SECRET)


# -- the fault server itself -----------------------------------------------------------------------


def test_fault_server_in_a_thread_serves_synchronous_clients() -> None:
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi there"}]}
    with FaultServer.run_in_thread(["503", "401"], answer="fine") as srv:
        assert srv.base_url.startswith("http://127.0.0.1:")
        assert srv.base_url.endswith("/v1")
        assert _post(srv.base_url, payload)[0] == 503
        status, body = _post(srv.base_url, payload)
        assert status == 401
        assert body["error"]["code"] == "invalid_api_key"
        status, body = _post(srv.base_url, payload)
        assert status == 200
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == "fine"
        assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
        with urllib.request.urlopen(srv.base_url + "/models", timeout=LIMIT) as response:
            assert json.load(response)["data"][0]["id"] == "fault-model"
        requests = srv.wait_for_requests(4, timeout=LIMIT)
    assert [r.fault for r in requests] == ["503", "401", "ok", None]
    assert requests[0].headers["authorization"] == REDACTED


async def test_fault_server_in_a_thread_serves_async_clients() -> None:
    with FaultServer.run_in_thread(["500"]) as srv:
        ask = _asker(srv.base_url)
        async with asyncio.timeout(LIMIT):
            with pytest.raises(ProviderError):
                await ask("first")
            assert await ask("second") == "second"
            await srv.wait_requests(2, timeout=LIMIT)


async def test_random_faults_are_reproducible_with_a_seed() -> None:
    async def faults_served(seed: int) -> list[str | None]:
        async with FaultServer(random_faults=0.5, seed=seed, fault_kinds=["500", "503"]) as srv:
            model = OpenAIChatModel("test-model", base_url=srv.base_url, api_key=SECRET)
            for _ in range(12):
                async with asyncio.timeout(LIMIT):
                    try:
                        await model.request(ModelRequest([{"role": "user", "content": "x"}]))
                    except ProviderError as exc:
                        assert exc.status_code in (500, 503)
            return [r.fault for r in srv.requests]

    first = await faults_served(1)
    assert first == await faults_served(1)
    assert {"ok", "500", "503"} <= set(first)


def test_schema_examples_are_valid_for_simple_schemas() -> None:
    class Item(BaseModel):
        label: str
        tags: list[str]
        score: float | None = None

    class Order(BaseModel):
        items: list[Item]
        count: int
        paid: bool

    value = example_for_schema(Order.model_json_schema(), "some text")
    order = Order.model_validate(value)
    assert order.items[0].label == "some text"
    assert example_for_schema({"enum": ["a", "b"]}) == "a"
    assert example_for_schema({"type": "integer", "minimum": 3}) == 3


def test_unknown_faults_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        FaultServer(["teapot"])
    assert Fault("502").kind == "502"


def test_fault_server_cli() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        env.pop(name, None)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kagura.testing.fault_server",
            "--port",
            "0",
            "--script",
            "429,ok",
            "--answer",
            "from the CLI",
            "--exit-after",
            "60",  # an orphaned server still goes away on its own
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()  # bounded by the test's timeout
        assert base_url.startswith("http://127.0.0.1:"), base_url
        assert base_url.endswith("/v1")
        payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        status, body = _post(base_url, payload)
        assert status == 429
        assert body["error"]["type"] == "rate_limit_error"
        status, body = _post(base_url, payload)
        assert status == 200
        assert body["choices"][0]["message"]["content"] == "from the CLI"
    finally:
        process.terminate()
        try:
            _, stderr = process.communicate(timeout=LIMIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate(timeout=LIMIT)
            raise
    assert process.returncode == 0, stderr
    assert "429" in stderr  # requests are logged


# -- LiteLLM ---------------------------------------------------------------------------------------


async def test_litellm_over_http(server: FaultServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # Use the cost map bundled with LiteLLM instead of fetching it from the network at import.
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = pytest.importorskip("litellm", reason="the [litellm] extra is not installed")
    monkeypatch.setattr(litellm, "suppress_debug_info", True)

    ask = _asker(server.base_url, "litellm/openai/test-model", temperature=0.5)

    server.script("429", "ok")
    async with asyncio.timeout(30):
        with pytest.raises(ProviderError) as caught:
            await ask("through LiteLLM")
        assert caught.value.status_code == 429
        assert caught.value.retry_after == 1.0
        _secret_free(caught.value)
        assert await ask("through LiteLLM") == "through LiteLLM"
    _, second = server.requests
    assert second.path == "/v1/chat/completions"
    assert second.body["model"] == "test-model"
    assert second.body["temperature"] == 0.5
    assert second.authorized_with(SECRET)


# -- the wire: proxies, headers, request options, server-sent events -------------------------------


async def test_requests_go_through_the_proxy_the_environment_names(
    server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY (read when the client is made, as httpx reads it) carries the request to a
    host this machine cannot reach itself: the proxy sees the request's whole URL."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", server.base_url.removesuffix("/v1"))
    ask = _asker("http://models.invalid/v1")
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ProviderError) as caught:
            await ask("hello")
    # The fault server is no proxy: it records the request and has no route for a full URL.
    assert caught.value.status_code == 404
    (request,) = server.requests
    assert request.path == "http://models.invalid/v1/chat/completions"
    assert request.authorized_with(SECRET)


async def test_no_proxy_sends_the_request_directly(
    server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with FaultServer() as stopped:
        nothing_there = stopped.base_url.removesuffix("/v1")
    for name in ("no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", nothing_there)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with asyncio.timeout(LIMIT):
        assert await _asker(server.base_url)("direct") == "direct"
    assert server.requests[0].path == "/v1/chat/completions"


async def test_the_organization_and_project_from_the_environment_are_sent(
    server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_ORG_ID", "org-kagura")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-tests")
    async with asyncio.timeout(LIMIT):
        assert await _asker(server.base_url)("hi") == "hi"
    headers = server.requests[0].headers
    assert (headers["openai-organization"], headers["openai-project"]) == (
        "org-kagura",
        "proj-tests",
    )
    assert headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("provider_kwargs", "says"),
    [
        ({"timeout": "soon"}, "timeout='soon'"),
        ({"timeout": -1}, "timeout=-1"),
        ({"logit_bias": {1: object()}}, "cannot be sent (Object of type object"),
        ({"extra_body": ["top_k", 5]}, "extra_body and extra_headers as dicts"),
        ({"extra_query": "trace=on"}, "give extra_query as a dict"),
    ],
)
async def test_a_request_that_cannot_be_sent_is_a_usage_error_before_anything_is_sent(
    server: FaultServer, provider_kwargs: dict[str, Any], says: str
) -> None:
    ask = _asker(server.base_url, provider_kwargs=provider_kwargs)
    async with asyncio.timeout(LIMIT):
        with pytest.raises(UsageError, match=re.escape(says)):
            await ask("hello")
    assert server.request_count == 0


async def test_a_request_timeout_option_bounds_each_read() -> None:
    async with FaultServer(hang_seconds=LIMIT) as server:
        ask = _asker(server.base_url, provider_kwargs={"timeout": 0.2})
        server.script("hang")
        async with asyncio.timeout(LIMIT):
            with pytest.raises(ProviderTimeout, match=f"request to {server.base_url} timed out"):
                await ask("hello")


async def _events_of(*pieces: bytes) -> list[tuple[str, str]]:
    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    return [event async for event in _http._events(body(), bytearray())]


async def test_server_sent_events_are_read_as_the_format_says() -> None:
    """Lines split across reads, CRLF line ends, comments, multi-line data, named events, a
    field without a space after its colon, and an event the body ends in the middle of."""
    events = await _events_of(
        b': keep-alive\r\n\r\ndata: {"a"',
        b": 1}\r\n\r\nevent: error\ndata:first\ndata: second\n",
        b"\nid: 7\ndata: [DONE]\n\ndata: cut off",
    )
    assert events == [("", '{"a": 1}'), ("error", "first\nsecond"), ("", "[DONE]")]


async def test_a_line_may_end_in_a_bare_cr_and_a_crlf_may_be_split_between_reads() -> None:
    events = await _events_of(
        b"data: one\r\rdata: two\r", b"\ndata: more\r", b"\n", b"\r\ndata: three\r\r"
    )
    assert events == [("", "one"), ("", "two\nmore"), ("", "three")]


@pytest.mark.parametrize("key", [SECRET, "gsk_live-0123456789abcdef", "0123456789abcdef0123"])
async def test_a_key_the_server_quotes_back_is_left_out_of_the_error(
    server: FaultServer, key: str
) -> None:
    # Some servers and proxies say which key they refused, in the error's message; whatever
    # the key's shape, the error raised (and recorded) does not carry it.
    server.script(Fault("401", text=f"Incorrect API key provided: {key}. Check it."))

    @agent(model="openai/test-model", base_url=server.base_url, api_key=key, retry=False)
    async def ask(text: str) -> str:
        """{{ text }}"""

    async with asyncio.timeout(LIMIT):
        with capture_events() as events, pytest.raises(ProviderError) as caught:
            await ask("hello")
    error = caught.value
    assert (
        str(error)
        == "openai/test-model: HTTP 401: Incorrect API key provided: [REDACTED]. Check it."
    )
    assert key not in (error.body or "")
    assert all(key not in (span.error or "") for span in events.spans())


async def test_credentials_of_the_base_url_the_server_quotes_back_are_left_out(
    server: FaultServer,
) -> None:
    # As a key is: whatever part of them the server says (the basic authorization it got, the
    # user and password, the password), the error raised and recorded does not carry it.
    basic = base64.b64encode(b"proxy:hunter2/url-pass").decode()
    quoted = f"Refused: Basic {basic} (proxy:hunter2%2Furl-pass, hunter2/url-pass)."
    server.script(Fault("401", text=quoted), Fault("401", text=quoted))
    url = server.base_url.replace("http://", "http://proxy:hunter2%2Furl-pass@")
    ask = _asker(url)
    async with asyncio.timeout(LIMIT):
        with capture_events() as events, pytest.raises(ProviderError) as caught:
            await ask("hello")
        with pytest.raises(ProviderError) as streamed:
            _ = [delta async for delta in ask.stream("hello")]
    for error in (caught.value, streamed.value):
        assert str(error) == (
            "openai/test-model: HTTP 401: Refused: Basic [REDACTED] ([REDACTED], [REDACTED])."
        )
        assert "hunter2" not in (error.body or "") and basic not in (error.body or "")
    assert all("hunter2" not in (span.error or "") for span in events.spans())


#: An Azure OpenAI key (32 hex digits): no shape the redaction of recorded text knows.
HEADER_KEY = "3f9a1c0e5b7d4e2a8c6f0b1d2e3a4c5f"
USER_PASSWORD = "tenant:" + HEADER_KEY


@pytest.mark.parametrize(
    ("headers", "quoted"),
    [
        ({"api-key": HEADER_KEY}, HEADER_KEY),  # Azure's
        ({"x-api-key": HEADER_KEY}, HEADER_KEY),
        ({"Ocp-Apim-Subscription-Key": HEADER_KEY}, HEADER_KEY),  # Azure API Management's
        ({"Authorization": f"Bearer {HEADER_KEY}"}, HEADER_KEY),
        ({"Authorization": f"Bearer {HEADER_KEY}"}, f"Bearer {HEADER_KEY}"),
        (
            {"Authorization": "Basic " + base64.b64encode(USER_PASSWORD.encode()).decode()},
            USER_PASSWORD,
        ),
    ],
)
async def test_a_key_sent_in_extra_headers_the_server_quotes_back_is_left_out(
    server: FaultServer, headers: dict[str, str], quoted: str
) -> None:
    # A key sent as a header of the agent's provider_kwargs is cut out of the error as the
    # api_key= one is, however it is quoted, whole or after its scheme, called or streamed.
    text = f"Access denied due to invalid subscription key {quoted}."
    server.script(Fault("401", text=text), Fault("401", text=text))

    @agent(
        model="openai/test-model",
        base_url=server.base_url,
        retry=False,
        provider_kwargs={"extra_headers": {**headers, "X-Request-Tag": "tag-12345678"}},
    )
    async def ask(text: str) -> str:
        """{{ text }}"""

    async with asyncio.timeout(LIMIT):
        with capture_events() as events, pytest.raises(ProviderError) as caught:
            await ask("hello")
        with pytest.raises(ProviderError) as streamed:
            _ = [delta async for delta in ask.stream("hello")]
    for error in (caught.value, streamed.value):
        assert HEADER_KEY not in str(error) and HEADER_KEY not in (error.body or "")
        assert "invalid subscription key [REDACTED]" in str(error)
    assert all(HEADER_KEY not in (span.error or "") for span in events.spans())
    assert server.request_count == 2


def test_only_extra_headers_named_as_secrets_are_cut_out() -> None:
    from kagura.providers._chat import header_secrets

    assert header_secrets({"api-version": "2024-02-01", "OpenAI-Beta": "assistants=v2"}) == ()
    assert header_secrets({"X-Functions-Key": "k" * 12, "Authorization": "Bearer t0k"}) == (
        "k" * 12,
        "Bearer t0k",
        "t0k",
    )
    assert header_secrets(None) == header_secrets(["not", "a", "dict"]) == ()


def test_an_answer_without_usage_has_unknown_usage_not_zero() -> None:
    """Unknown, as a stream without usage is: a priced model's call is then of unknown cost,
    never free."""
    from kagura.providers._chat import to_response

    message = {"message": {"content": "hi"}, "finish_reason": "stop"}
    for answer in ({"choices": [message]}, {"choices": [message], "usage": None}):
        assert to_response(answer, "openai/test-model").usage is NO_USAGE
    reported = to_response(
        {"choices": [message], "usage": {"prompt_tokens": 3, "completion_tokens": 0}}, "m"
    )
    assert reported.usage is not NO_USAGE and reported.usage.prompt_tokens == 3


async def test_an_error_answered_with_http_200_is_raised_as_such_and_not_retried(
    server: FaultServer,
) -> None:
    # Some servers and proxies answer a refused key or an exhausted quota with HTTP 200 and an
    # error object: its message is the error, the key it quotes cut out.
    key = "vllm-team-token-7f3a9c2e41d8"
    server.script(Fault("200", text=f"Incorrect API key provided: {key}"), Fault.ok("never"))

    @agent(model="openai/test-model", base_url=server.base_url, api_key=key)
    async def ask(text: str) -> str:
        """{{ text }}"""

    async with asyncio.timeout(LIMIT):
        with capture_events() as events, pytest.raises(ProviderError) as caught:
            await ask("hello")
    error = caught.value
    assert str(error) == "openai/test-model: HTTP 200: Incorrect API key provided: [REDACTED]"
    assert error.body is not None and key not in error.body
    assert all(key not in (span.error or "") for span in events.spans())
    assert server.request_count == 1  # the server answered so on purpose


def test_an_error_object_names_its_status_when_it_has_one() -> None:
    # OpenRouter sends an error's HTTP status as its code, in an answer of HTTP 200.
    assert _http._error_status({"error": {"code": 502, "message": "upstream failed"}}) == 502
    for body in ({"error": {"code": "invalid_api_key"}}, {"error": {"code": True}}, {}):
        assert _http._error_status(body) is None
    assert _http._is_error({"object": "error", "message": "bad"})
    assert not _http._is_error({"choices": [{}], "error": None})


def test_a_key_quoted_in_an_error_event_is_left_out() -> None:
    key = "vllm-team-token-7f3a9c2e41d8"
    data = json.dumps({"error": {"message": f"Incorrect API key provided: {key}"}})
    with pytest.raises(ProviderError) as caught:
        _http._chunk("", data, "openai/test-model", key)
    error = caught.value
    assert str(error) == (
        "openai/test-model: error event in the stream: Incorrect API key provided: [REDACTED]"
    )
    assert error.body is not None and key not in error.body
    with pytest.raises(ProviderError) as malformed:
        _http._chunk("", f"not json {key}", "openai/test-model", key)
    assert key not in (malformed.value.body or "")
