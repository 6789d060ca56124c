"""The LiteLLM path over real HTTP, against the fault server on 127.0.0.1: the same faults as the
OpenAI-compatible path's tests (test_openai_http.py, test_streaming_http.py), mapped to the same
Kagura errors, the key a server quotes back cut out of them, and no key at all refused before
anything is sent.

LiteLLM reaches the fault server as an OpenAI-compatible endpoint (``litellm/openai/<model>`` with
a base URL). No test waits for anything but the server's answers.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import textwrap
import traceback
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from kagura import Agent, agent
from kagura.errors import (
    MissingCredentialsError,
    ProviderConnectionError,
    ProviderError,
    StreamBrokenError,
)
from kagura.providers import litellm as litellm_provider
from kagura.resilience import no_waits, reset_breakers
from kagura.testing import capture_events
from kagura.testing.fault_server import Fault, FaultServer

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        importlib.util.find_spec("litellm") is None, reason="the [litellm] extra is not installed"
    ),
]

MODEL = "litellm/openai/test-model"
SECRET = "sk-test-secret"
#: A key of no known shape: only the key the request was sent with tells it is one.
PLAIN_KEY = "plainsecret-ZXQW-98765-opaque"
LIMIT = 60  # seconds: the bound on each interaction (the first one imports LiteLLM)


@pytest.fixture(autouse=True)
def _no_waits() -> Iterator[None]:
    """Retry waits are not slept; breakers start closed."""
    reset_breakers()
    with no_waits():
        yield
    reset_breakers()


@pytest.fixture
async def server() -> AsyncIterator[FaultServer]:
    # LiteLLM imported (by Kagura's own set-up) before the test's requests.
    await litellm_provider._litellm()
    async with FaultServer() as srv:
        yield srv


def _asker(base_url: str, *, api_key: str | None = SECRET, **settings: Any) -> Agent[[str], str]:
    @agent(model=MODEL, base_url=base_url, api_key=api_key, **settings)
    async def ask(text: str) -> str:
        """{{ text }}"""

    return ask


def _free_of(secret: str, exc: BaseException) -> None:
    """``secret`` appears nowhere in the exception, its causes and contexts, or its traceback."""
    text = "".join(traceback.format_exception(exc))
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        text += str(current) + repr(current) + repr(getattr(current, "body", ""))
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]
    assert secret not in text


async def _collect(items: AsyncIterator[Any]) -> list[Any]:
    async with asyncio.timeout(LIMIT):
        return [item async for item in items]


# -- the key a server quotes back ------------------------------------------------------------------


@pytest.mark.parametrize("key", [PLAIN_KEY, SECRET])
async def test_a_key_the_server_quotes_back_is_left_out_of_the_error(
    server: FaultServer, key: str
) -> None:
    quoted = f"Incorrect API key provided: {key}. Check it."
    server.script(Fault("401", text=quoted), Fault("401", text=quoted))
    ask = _asker(server.base_url, api_key=key, retry=False)
    with capture_events() as events:
        async with asyncio.timeout(LIMIT):
            with pytest.raises(ProviderError) as caught:
                await ask("hello")
            with pytest.raises(ProviderError) as streamed:
                await _collect(ask.stream("hello"))
    for error in (caught.value, streamed.value):
        assert str(error) == f"{MODEL}: HTTP 401: Incorrect API key provided: [REDACTED]. Check it."
        assert error.status_code == 401
        _free_of(key, error)
    assert all(key not in (span.error or "") for span in events.spans())
    assert server.request_count == 2


@pytest.mark.parametrize("option", ["extra_headers", "headers"])
async def test_a_key_sent_in_headers_the_server_quotes_back_is_left_out(
    server: FaultServer, option: str
) -> None:
    # Azure's api-key header, sent through provider_kwargs: cut out as api_key= is.
    quoted = f"Access denied due to invalid subscription key {PLAIN_KEY}."
    server.script(Fault("401", text=quoted), Fault("401", text=quoted))
    ask = _asker(server.base_url, retry=False, provider_kwargs={option: {"api-key": PLAIN_KEY}})
    with capture_events() as events:
        async with asyncio.timeout(LIMIT):
            with pytest.raises(ProviderError) as caught:
                await ask("hello")
            with pytest.raises(ProviderError) as streamed:
                await _collect(ask.stream("hello"))
    for error in (caught.value, streamed.value):
        assert "invalid subscription key [REDACTED]" in str(error)
        _free_of(PLAIN_KEY, error)
    assert all(PLAIN_KEY not in (span.error or "") for span in events.spans())
    assert server.request_count == 2


async def test_a_key_litellm_read_from_the_environment_is_left_out_too(
    server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", PLAIN_KEY)
    server.script(Fault("401", text=f"Incorrect API key provided: {PLAIN_KEY}."))
    ask = _asker(server.base_url, api_key=None, retry=False)
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ProviderError) as caught:
            await ask("hello")
    assert server.requests[0].authorized_with(PLAIN_KEY)
    _free_of(PLAIN_KEY, caught.value)


# -- no key ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "variable"),
    [
        ("litellm/gpt-4o-mini", "OPENAI_API_KEY"),
        ("litellm/anthropic/claude-3-5-haiku-latest", "ANTHROPIC_API_KEY"),
    ],
)
async def test_no_key_is_missing_credentials_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, model: str, variable: str
) -> None:
    await litellm_provider._litellm()
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)

    @agent(model=model)
    async def ask(text: str) -> str:
        """{{ text }}"""

    with capture_events() as events:
        async with asyncio.timeout(LIMIT):
            with pytest.raises(MissingCredentialsError) as caught:
                await ask("hello")
    assert caught.value.env_var == variable
    assert f"set the {variable} environment variable" in str(caught.value)
    assert len(events.spans(kind="llm")) == 1  # never retried


async def test_azure_with_entra_id_credentials_is_not_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LiteLLM reaches Azure with an Entra ID token (or a client secret, a managed identity) in
    place of AZURE_API_KEY, which LiteLLM's own check lists as missing all the same."""
    monkeypatch.delenv("AZURE_API_KEY", raising=False)
    monkeypatch.setenv("AZURE_AD_TOKEN", "an-entra-id-token")
    model = litellm_provider.LiteLLMModel("azure/gpt-4o")
    await model.prepare()  # not MissingCredentialsError
    assert model.prepared


async def test_a_base_url_of_the_agents_needs_no_key(server: FaultServer) -> None:
    # As on the OpenAI-compatible path: a self-hosted server usually takes requests without one.
    ask = _asker(server.base_url, api_key=None)
    async with asyncio.timeout(LIMIT):
        assert await ask("no key needed") == "no key needed"
    (request,) = server.requests
    assert request.authorized_with("not-needed")


# -- broken answers --------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["reset", "truncated"])
async def test_broken_connections_are_connection_errors(server: FaultServer, fault: str) -> None:
    ask = _asker(server.base_url, retry=False)
    server.script(fault)
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ProviderConnectionError) as caught:
            await ask("hello")
        assert await ask("again") == "again"  # the client recovers
    error = caught.value
    assert error.status_code is None  # not the HTTP 500 LiteLLM makes up
    assert isinstance(error.__cause__, aiohttp.ClientError)
    assert f"connection to {server.base_url} failed: " in str(error)
    _free_of(SECRET, error)


@pytest.mark.parametrize("fault", ["html", "malformed"])
async def test_an_answer_that_is_not_json_is_a_malformed_response_and_retried(
    server: FaultServer, fault: str
) -> None:
    server.script(fault, fault, Fault.ok("Second time."))
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ProviderError) as caught:
            await _asker(server.base_url, retry=False)("hello")
        assert await _asker(server.base_url)("hello") == "Second time."
    error = caught.value
    assert type(error) is ProviderError
    assert error.status_code is None
    assert "malformed response" in str(error)
    _free_of(SECRET, error)
    assert server.request_count == 3


async def test_http_errors_keep_the_status_and_message_the_server_sent(
    server: FaultServer,
) -> None:
    server.script(Fault("429", retry_after=7))
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ProviderError) as caught:
            await _asker(server.base_url, retry=False)("hello")
    error = caught.value
    assert (error.status_code, error.retry_after) == (429, 7.0)
    assert str(error) == f"{MODEL}: HTTP 429: rate limit reached (fault injected)"


@pytest.mark.parametrize(
    "model", ["litellm/anthropic/claude-3-5-haiku-latest", "litellm/gemini/gemini-1.5-flash"]
)
async def test_a_status_answered_to_litellm_s_own_http_client_is_kept(
    server: FaultServer, model: str
) -> None:
    """LiteLLM's own providers (Anthropic's, Gemini's) read answers with their own HTTP client:
    the fault server has no route for them and answers 404, which was taken for a broken
    connection, without its status, and sent four times."""

    @agent(model=model, base_url=server.base_url, api_key=SECRET)
    async def ask(text: str) -> str:
        """{{ text }}"""

    async with asyncio.timeout(LIMIT):
        with pytest.raises(ProviderError) as caught:
            await ask("hello")
    assert not isinstance(caught.value, ProviderConnectionError)
    assert caught.value.status_code == 404
    assert f"{model}: HTTP 404: no route for POST /" in str(caught.value)
    assert server.request_count == 1  # a 404 is not tried again


# -- streams ---------------------------------------------------------------------------------------


async def test_a_page_answered_instead_of_a_stream_is_an_error_and_retried(
    server: FaultServer,
) -> None:
    server.script("html", "html", Fault.ok("Second time."))
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ProviderError) as caught:
            await _collect(_asker(server.base_url, retry=False).stream("count"))
        with capture_events() as events:
            deltas = await _collect(_asker(server.base_url).stream("count"))
    assert not isinstance(caught.value, ProviderConnectionError)
    assert "the answer is not a stream of chunks (text/html)" in str(caught.value)
    assert deltas == ["Second", " time."]
    assert [s.status for s in events.spans(kind="llm")] == ["failed", "completed"]
    assert server.request_count == 3


async def test_a_stream_cut_part_way_is_a_connection_error(server: FaultServer) -> None:
    server.script(Fault("stream_cut", text="One two three four.", after_chunks=2))
    deltas: list[str] = []
    with pytest.raises(StreamBrokenError) as caught:
        async with asyncio.timeout(LIMIT):
            async for delta in _asker(server.base_url).stream("count"):
                deltas.append(delta)
    assert deltas == ["One", " two"]
    cause = caught.value.__cause__
    assert isinstance(cause, ProviderConnectionError) and cause.status_code is None
    assert "without a finish reason" in str(cause)
    assert server.request_count == 1


async def test_an_error_event_part_way_is_a_provider_error_with_its_message(
    server: FaultServer,
) -> None:
    server.script(Fault("stream_error", text="One two three four.", after_chunks=2))
    with pytest.raises(StreamBrokenError) as caught:
        await _collect(_asker(server.base_url).stream("count"))
    cause = caught.value.__cause__
    assert type(cause) is ProviderError and cause.status_code is None
    assert "error event in the stream: the model failed mid-answer (fault injected)" in str(cause)


# -- set-up ----------------------------------------------------------------------------------------


class WatchedEnviron(dict[str, str]):
    """os.environ, noting every change."""

    def __init__(self, environ: dict[str, str], changes: list[str]) -> None:
        super().__init__(environ)
        self.changes = changes

    def __setitem__(self, name: str, value: str) -> None:
        self.changes.append(f"set {name}")
        super().__setitem__(name, value)

    def pop(self, name: str, *default: Any) -> Any:  # type: ignore[override]
        self.changes.append(f"pop {name}")
        return super().pop(name, *default)


def test_the_environment_is_changed_for_the_first_import_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every request asks for the module: setting and unsetting a variable each time is not
    # safe beside threads that read the environment (resolvers), nor needed.
    litellm_provider._import_litellm()
    changes: list[str] = []
    monkeypatch.setattr(os, "environ", WatchedEnviron(dict(os.environ), changes))
    for _ in range(3):
        assert litellm_provider._import_litellm() is sys.modules["litellm"]
    assert changes == []


def test_set_up_stays_offline_and_handled_errors_print_nothing() -> None:
    """LiteLLM fetches its model cost map from GitHub at import unless told not to, and prints
    "Give Feedback / Get Help" to stdout for every error it raises: neither, in a fresh process
    that has not set LITELLM_LOCAL_MODEL_COST_MAP itself (nor is it left set afterwards)."""
    code = textwrap.dedent(
        """
        import asyncio
        from kagura import agent
        from kagura.errors import ProviderError
        from kagura.testing.fault_server import FaultServer

        async def main():
            async with FaultServer(script=["400", "400"]) as server:
                @agent(model="litellm/openai/m1", base_url=server.base_url, api_key="k-local")
                async def ask(text: str) -> str:
                    '''{{ text }}'''
                for _ in range(2):
                    try:
                        await ask("x")
                    except ProviderError:
                        pass  # handled by the application

        asyncio.run(main())
        import os
        # Set for LiteLLM's import only: not left for the application's child processes.
        assert "LITELLM_LOCAL_MODEL_COST_MAP" not in os.environ
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "LITELLM_LOCAL_MODEL_COST_MAP"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    assert "cost map" not in out.stderr.lower(), out.stderr
    assert "Give Feedback" not in out.stderr
