"""Provider set-up (``Model.prepare``) happens before an attempt's timeout starts, once.

Slow set-up is simulated without waiting: the loop's clock is moved forward, and the timers due by
then run in order of deadline, so a timeout begun before the set-up would fire. The real cold
start (importing aiohttp, the HTTP client) is checked in a fresh process.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from kagura import _llm, agent
from kagura._context import Span
from kagura.errors import ProviderTimeout, UsageError
from kagura.providers import ModelRequest, _http
from kagura.providers import litellm as litellm_provider
from kagura.providers import openai as openai_provider
from kagura.providers._setup import SharedSetUp
from kagura.providers.litellm import LiteLLMModel
from kagura.providers.openai import OpenAIChatModel
from kagura.testing import FakeModel, capture_events
from kagura.testing.fault_server import FaultServer

from ..conftest import JumpingClock

pytestmark = pytest.mark.timeout(60)

LIMIT = 15.0  # seconds: the bound on every wait below that is not meant to expire


# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[FaultServer]:
    async with FaultServer() as srv:
        yield srv


class SlowSetUp(FakeModel):
    """A fake whose set-up takes a minute on the loop's clock, or fails with ``failures``."""

    def __init__(self, clock: JumpingClock, failures: list[BaseException] | None = None) -> None:
        super().__init__()
        self.clock = clock
        self.failures = failures or []
        self.preparations = 0
        self.prepared = False

    async def prepare(self) -> None:
        self.preparations += 1
        await self.clock.pass_time(60)
        if self.failures:
            raise self.failures.pop(0)
        self.prepared = True


class SlowRequest(FakeModel):
    """The control: the same minute, spent by the request itself."""

    def __init__(self, clock: JumpingClock) -> None:
        super().__init__()
        self.clock = clock

    async def request(self, request: ModelRequest) -> Any:
        await self.clock.pass_time(60)
        return await super().request(request)


# -- the seam --------------------------------------------------------------------------------------


async def test_set_up_does_not_count_against_the_attempts_timeout(
    jumping_clock: JumpingClock,
) -> None:
    model = SlowSetUp(jumping_clock)

    @agent(model=model, timeout=1, retry=False)
    async def ask(text: str) -> str:
        """{{ text }}"""

    with capture_events() as events:
        assert await ask("hello") == "hello"
    assert model.preparations == 1
    assert len(model.requests) == 1
    assert [s.status for s in events.spans("llm")] == ["completed"]


async def test_the_same_minute_in_the_request_does_time_out(jumping_clock: JumpingClock) -> None:
    # Shows that the clock above really trips a timeout that is running.
    @agent(model=SlowRequest(jumping_clock), timeout=1, retry=False)
    async def ask(text: str) -> str:
        """{{ text }}"""

    with pytest.raises(ProviderTimeout, match="no answer within 1s"):
        await ask("hello")


async def test_a_prepared_model_is_not_prepared_again(jumping_clock: JumpingClock) -> None:
    model = SlowSetUp(jumping_clock)

    @agent(model=model, timeout=1, retry=False)
    async def ask(text: str) -> str:
        """{{ text }}"""

    await ask("one")
    await ask("two")
    assert model.preparations == 1
    assert len(model.requests) == 2


async def test_a_model_with_no_set_up_is_never_asked_to_prepare() -> None:
    class Counting(FakeModel):
        preparations = 0

        async def prepare(self) -> None:
            self.preparations += 1

    model = Counting()
    assert model.prepared
    await _llm.attempt(
        model, ModelRequest([{"role": "user", "content": "hi"}]), Span("agent", "test", None)
    )
    assert model.preparations == 0


async def test_a_failed_set_up_fails_the_attempt_and_the_next_one_tries_again(
    jumping_clock: JumpingClock,
) -> None:
    model = SlowSetUp(jumping_clock, failures=[UsageError("the SDK is missing")])

    @agent(model=model, timeout=1)  # retries on: a usage error is not retried
    async def ask(text: str) -> str:
        """{{ text }}"""

    with capture_events() as events, pytest.raises(UsageError, match="the SDK is missing"):
        await ask("hello")
    (span,) = events.spans("llm")
    assert span.status == "failed"
    assert model.requests == [] and not model.prepared

    assert await ask("hello") == "hello"
    assert model.preparations == 2


async def test_set_up_counts_against_the_total_timeout(jumping_clock: JumpingClock) -> None:
    model = SlowSetUp(jumping_clock)

    @agent(model=model, total_timeout=1)
    async def ask(text: str) -> str:
        """{{ text }}"""

    with pytest.raises(TimeoutError, match="total timeout of 1s"):
        await ask("hello")
    assert model.requests == []


# -- one shared set-up -----------------------------------------------------------------------------


class Gate:
    """Blocking work that signals when it has started and waits to be released."""

    def __init__(self, outcome: Callable[[int], None] = lambda run: None) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.threads: list[int] = []
        self._outcome = outcome

    def __call__(self) -> None:
        self.threads.append(threading.get_ident())
        self.started.set()
        assert self.release.wait(LIMIT)
        self._outcome(len(self.threads))

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.wait, LIMIT)


async def test_concurrent_callers_share_one_run_off_the_event_loop() -> None:
    gate = Gate()
    setup = SharedSetUp(gate, "test-setup")
    callers = [asyncio.create_task(setup()) for _ in range(20)]
    await gate.wait_started()
    assert not any(c.done() for c in callers)
    gate.release.set()
    await asyncio.gather(*callers)

    assert setup.done
    assert len(gate.threads) == 1
    assert gate.threads[0] != threading.get_ident()  # the loop ran on meanwhile
    await setup()  # done: returns at once, runs nothing
    assert len(gate.threads) == 1


async def test_a_failure_reaches_every_caller_and_the_next_call_runs_again() -> None:
    def first_run_fails(run: int) -> None:
        if run == 1:
            raise UsageError("no SDK")

    gate = Gate(first_run_fails)
    setup = SharedSetUp(gate, "test-setup")
    callers = [asyncio.create_task(setup()) for _ in range(3)]
    await gate.wait_started()
    gate.release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, UsageError) for r in results)
    assert not setup.done

    await setup()
    assert setup.done and len(gate.threads) == 2


async def test_a_caller_that_gives_up_leaves_the_set_up_to_the_others() -> None:
    gate = Gate()
    setup = SharedSetUp(gate, "test-setup")
    quitter = asyncio.create_task(setup())
    stayer = asyncio.create_task(setup())
    await gate.wait_started()
    quitter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await quitter
    gate.release.set()
    await stayer
    assert setup.done and len(gate.threads) == 1


# -- adapters --------------------------------------------------------------------------------------


async def test_many_first_openai_calls_set_up_once(
    server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[int] = []

    def load_wire() -> None:
        runs.append(threading.get_ident())
        _http.load()

    monkeypatch.setattr(openai_provider, "_wire", SharedSetUp(load_wire, "test-http-import"))
    monkeypatch.setattr(_http, "_clients", {})
    model = OpenAIChatModel("test-model", base_url=server.base_url, api_key="sk-test")

    @agent(model=model, timeout=LIMIT)
    async def ask(text: str) -> str:
        """{{ text }}"""

    answers = await asyncio.gather(*(ask(f"hello {i}") for i in range(10)))
    assert answers == [f"hello {i}" for i in range(10)]
    assert len(runs) == 1 and runs[0] != threading.get_ident()
    assert len(_http._clients) == 1  # one client for this loop, shared by all
    assert model.prepared
    assert len(server.chat_requests) == 10


COLD_START = textwrap.dedent(
    '''
    import asyncio, json, sys, threading

    importers = []
    prices_on_the_loop = []

    class Spy:
        """Notes the thread that first looks aiohttp, and what prices an answer, up, and the
        modules of genai-prices imported on the event loop's thread (its table of prices is
        one, imported by its first price); the usual finders then import them."""

        @staticmethod
        def find_spec(name, path=None, target=None):
            if name in ("aiohttp", "genai_prices"):
                importers.append([name, threading.current_thread().name])
            on_the_loop = threading.current_thread() is threading.main_thread()
            if name.startswith("genai_prices") and on_the_loop:
                prices_on_the_loop.append(name)
            return None

    sys.meta_path.insert(0, Spy)

    from kagura import agent
    from kagura.testing import capture_events

    @agent(
        model="openai/test-model", base_url=sys.argv[1], api_key="sk-test",
        timeout=0.5, retry=False,
    )
    async def ask(text: str) -> str:
        """{{ text }}"""

    async def main():
        assert "aiohttp" not in sys.modules and "genai_prices" not in sys.modules
        with capture_events() as events:
            answer = await ask("hello")
        (span,) = events.spans("llm")
        assert "openai" not in sys.modules  # the SDK is not what sends it
        print(json.dumps({
            "answer": answer, "importers": importers, "status": span.status,
            "prices_on_the_loop": prices_on_the_loop,
        }))

    asyncio.run(main())
    '''
)


def test_the_first_call_of_a_process_imports_the_http_client_outside_its_timeout() -> None:
    with FaultServer.run_in_thread() as server:  # the child inherits the loopback-only settings
        out = subprocess.run(
            [sys.executable, "-c", COLD_START, server.base_url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert len(server.chat_requests) == 1
    result = json.loads(out.stdout)
    assert result == {
        "answer": "hello",
        # Not the event loop's thread: a seventh of a second it would stall every task.
        "importers": [["aiohttp", "kagura-http-import"], ["genai_prices", "kagura-http-import"]],
        "status": "completed",
        "prices_on_the_loop": [],
    }


async def test_a_missing_litellm_is_a_usage_error_not_a_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "litellm", None)  # what a missing package looks like
    # As in a process that has not imported it yet (another test may have, in this one).
    monkeypatch.setattr(litellm_provider, "_litellm_module", None)
    monkeypatch.setattr(
        litellm_provider,
        "_litellm",
        SharedSetUp(litellm_provider._import_litellm, "test-litellm-import"),
    )
    model = LiteLLMModel("openai/gpt-4o-mini")
    with pytest.raises(UsageError, match=r"pip install 'kagura\[litellm\]'"):
        model.check_ready()
    request = ModelRequest([{"role": "user", "content": "hi"}])
    with pytest.raises(UsageError, match=r"pip install 'kagura\[litellm\]'"):
        await _llm.attempt(model, request, Span("agent", "test", None), timeout=0.001)
    assert not model.prepared


def test_litellm_is_found_at_check_ready_and_imported_by_set_up() -> None:
    if importlib.util.find_spec("litellm") is None:
        pytest.skip("the [litellm] extra is not installed")
    code = textwrap.dedent(
        """
        import sys
        from kagura.providers.litellm import LiteLLMModel
        LiteLLMModel("openai/gpt-4o-mini").check_ready()
        print("litellm" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"
