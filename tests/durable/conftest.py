"""Fixtures of the durable-run tests: a fresh store per test (SQLite file or new PostgreSQL
database, from the event store tests' fixtures), fake models, and subprocess helpers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kagura.durable import Journal, journal_for
from kagura.observability import Recorder
from kagura.providers import ModelRequest, ToolCall
from kagura.testing import FakeModel, Reply, override_model
from kagura.testing.fault_server import FaultServer
from tests.observability import conftest as store_fixtures

# The event store tests' fixtures, shared by import: a store per test on SQLite and PostgreSQL.
postgres_server = store_fixtures.postgres_server
store_url = store_fixtures.store_url
record_to = store_fixtures.record_to
conflicts = store_fixtures.conflicts

REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT_TIMEOUT = 20.0


@pytest.fixture
def db(store_url: str, record_to: Callable[..., Recorder], monkeypatch: pytest.MonkeyPatch) -> str:
    """This test's fresh store, as ``KAGURA_DB`` (journal and recorder both use it)."""
    monkeypatch.delenv("KAGURA_DURABLE", raising=False)
    monkeypatch.delenv("KAGURA_LEASE_SECONDS", raising=False)
    record_to(store_url)
    return store_url


@pytest.fixture
def journal(db: str) -> Journal:
    return journal_for()


def wait_until(
    condition: Callable[[], Any], what: str, timeout: float = WAIT_TIMEOUT, every: float = 0.01
) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


async def await_until(
    condition: Callable[[], Any], what: str, limit: float = WAIT_TIMEOUT, every: float = 0.01
) -> Any:
    """:func:`wait_until` for async tests: the condition runs in a thread (it may query the
    store), the event loop keeps running the workflows under test."""
    deadline = time.monotonic() + limit
    while True:
        value = await asyncio.to_thread(condition)
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {limit}s waiting for {what}")
        await asyncio.sleep(every)


def respond(request: ModelRequest) -> str | Reply:
    """What the test model answers: a tool call when asked for a PRICE, the tool's result after
    it, else an echo of the prompt."""
    last = request.messages[-1]
    if last.get("role") == "tool":
        return f"bought: {last.get('content')}"
    prompt = str(last.get("content") or "")
    if "PRICE" in prompt and request.tools:
        item = prompt.rsplit(" ", 1)[-1].rstrip(".")
        return Reply(tool_calls=(ToolCall("call_1", "price", json.dumps({"item": item})),))
    return prompt


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultServer]:
    """The fault server, as every process's OpenAI endpoint (this one's and the children's)."""
    with FaultServer.run_in_thread() as running:
        monkeypatch.setenv("OPENAI_BASE_URL", running.base_url)
        yield running


def sent(server: FaultServer) -> Counter[str]:
    """What reached the provider, from any process: each prompt and how often it was sent."""
    return Counter(str(r.messages[-1]["content"]) for r in server.chat_requests)


@pytest.fixture
def model() -> Iterator[FakeModel]:
    """A FakeModel every agent uses in this test; ``model.requests`` counts provider calls."""
    fake = FakeModel([respond] * 500)
    with override_model(fake):
        yield fake


# -- subprocesses --------------------------------------------------------------------------------


@dataclass
class Child:
    """A runner subprocess (``python -m tests.durable.runner ...``), its output in files."""

    process: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def finish(self, timeout: float = 45.0) -> dict[str, Any]:
        """Wait (bounded) for it to exit; its JSON outcome line."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            pytest.fail(f"subprocess {self.pid} did not finish within {timeout}s: {self.stderr}")
        lines = self.out.read_text().strip().splitlines()
        if not lines:
            pytest.fail(
                f"subprocess {self.pid} printed nothing (exit {self.process.returncode}):"
                f"\n{self.stderr}"
            )
        outcome: dict[str, Any] = json.loads(lines[-1])
        return outcome

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")[-4000:]


@pytest.fixture
def spawn(db: str, tmp_path: Path) -> Iterator[Callable[..., Child]]:
    """Start ``python -m tests.durable.runner *args`` on this test's store; ``env`` adds
    variables. Every child still alive at the end of the test is killed."""
    children: list[Child] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Child:
        n = len(children)
        out, err = tmp_path / f"child{n}.out", tmp_path / f"child{n}.err"
        full = {**os.environ, "KAGURA_DB": db, **(env or {})}
        full["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
        )
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.durable.runner", *args],
                stdout=stdout,
                stderr=stderr,
                env=full,
                cwd=REPO_ROOT,
            )
        child = Child(process, out, err)
        children.append(child)
        return child

    yield start
    for child in children:
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait(10)


def lines(path: str | Path) -> list[str]:
    """The lines of a (ledger) file; none if it does not exist."""
    file = Path(path)
    return file.read_text().splitlines() if file.exists() else []
