"""The recorder: every run, agent call, LLM attempt and tool call lands in the store, on SQLite and
on PostgreSQL, without ever changing what the recorded code does.
"""

from __future__ import annotations

import asyncio
import datetime
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import kagura._instrument as instrument
from kagura import agent, step, tool, workflow
from kagura._events import Event
from kagura._storage import normalise_url
from kagura.errors import ProviderError
from kagura.observability import EventStore, Recorder, default_recorder, uninstall_default
from kagura.observability._handoff import lock_directory
from kagura.observability._writer import WIRE_COLUMNS, StoreWriter
from kagura.providers import Model, ModelRequest, ModelResponse, ToolCall
from kagura.resilience import CircuitBreaker, CircuitOpenError, no_waits
from kagura.testing import FakeModel, Reply, override_model

from .conftest import child_env, free_port, is_postgres, rows, run_script, spawn_script

SUBPROCESS_TIMEOUT = 60.0


@agent
async def summarise(text: str) -> str:
    """Summarise: {{ text }}"""


@agent
async def classify(text: str) -> str:
    """Classify: {{ text }}"""


def double(x: int) -> int:
    """Double a number."""
    return 2 * x


@agent(tools=[double])
async def calculator(question: str) -> str:
    """Answer: {{ question }}"""


def by_id(recorder: Recorder, url: str) -> dict[str, dict[str, Any]]:
    return {row["span_id"]: row for row in rows_after_flush(recorder, url)}


def assert_one_tree_per_run(spans: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Every parent is recorded in the same run, and each run has exactly one root: its id."""
    roots: dict[str, str] = {}
    for span in spans.values():
        if span["parent_id"] is None:
            assert span["run_id"] not in roots, "two roots in one run"
            assert span["span_id"] == span["run_id"]
            roots[span["run_id"]] = span["span_id"]
        else:
            parent = spans[span["parent_id"]]
            assert parent["run_id"] == span["run_id"]
    assert {s["run_id"] for s in spans.values()} == set(roots)
    return roots


def ancestors(spans: dict[str, dict[str, Any]], span_id: str) -> list[str]:
    names = []
    parent = spans[span_id]["parent_id"]
    while parent is not None:
        names.append(spans[parent]["name"])
        parent = spans[parent]["parent_id"]
    return names


# -- the tree -----------------------------------------------------------------------------------


async def test_every_span_joins_one_tree_under_gather_and_create_task(
    recorder: Recorder, store_url: str
) -> None:
    def answer(request: ModelRequest) -> str | Reply:
        if str(request.messages[-1].get("content")).startswith("Answer:"):
            return Reply(tool_calls=(ToolCall("c1", "double", '{"x": 4}'),))
        return "8"  # tool results and every other agent

    fake = FakeModel([answer] * 100)

    @workflow
    async def branch(text: str) -> str:
        return await summarise(text)

    @workflow
    async def fan_out(text: str) -> list[str]:
        first = await calculator(text)
        task = asyncio.create_task(classify("in a task"))
        gathered = await asyncio.gather(
            summarise("a"), classify("b"), branch("c"), *(summarise(str(i)) for i in range(5))
        )
        return [first, *gathered, await task]

    with override_model(fake):
        # Two top-level runs at once, plus an agent call outside any workflow.
        await asyncio.gather(fan_out("x"), fan_out("y"), summarise("alone"))

    spans = by_id(recorder, store_url)
    roots = assert_one_tree_per_run(spans)
    root_names = sorted(spans[r]["name"] for r in roots.values())
    assert root_names == ["fan_out", "fan_out", "summarise"]
    kinds = Counter(s["kind"] for s in spans.values())
    # per fan_out: itself and branch; a calculator, a task and 8 gathered agents (one in branch);
    # one LLM attempt per agent, two for the calculator, which makes one tool call.
    assert kinds == {"workflow": 4, "agent": 2 * 10 + 1, "llm": 2 * 11 + 1, "tool": 2}
    assert all(s["status"] == "completed" for s in spans.values())
    for span in spans.values():
        if span["kind"] == "llm":
            assert spans[span["parent_id"]]["kind"] == "agent"
        if span["kind"] == "tool":
            assert ancestors(spans, span["span_id"])[:2] == ["calculator", "fan_out"]
        if span["kind"] == "agent" and span["parent_id"] is not None:
            assert ancestors(spans, span["span_id"])[-1] == "fan_out"
    tasked = [s for s in spans.values() if json.loads(s["inputs"]) == {"text": "in a task"}]
    assert len(tasked) == 2
    assert all(spans[s["parent_id"]]["name"] == "fan_out" for s in tasked)


# -- statuses -----------------------------------------------------------------------------------


async def test_every_span_is_stored_with_its_step_key(recorder: Recorder, store_url: str) -> None:
    @workflow
    async def pipeline(text: str) -> list[str]:
        return list(await asyncio.gather(summarise(text), summarise(text), classify(text)))

    with override_model(FakeModel()):
        await pipeline("a text")
    keys = {(s["kind"], s["step_key"]) for s in rows_after_flush(recorder, store_url)}
    assert keys == {
        ("workflow", "pipeline"),
        ("agent", "pipeline/summarise#0"),
        ("agent", "pipeline/summarise#1"),
        ("agent", "pipeline/classify#0"),
        ("llm", "pipeline/summarise#0/fake/echo#0"),
        ("llm", "pipeline/summarise#1/fake/echo#0"),
        ("llm", "pipeline/classify#0/fake/echo#0"),
    }


async def test_an_attempt_is_stored_with_the_messages_it_sent(
    recorder: Recorder, store_url: str
) -> None:
    @agent(system="Be brief.")
    async def briefly(text: str) -> str:
        """Summarise: {{ text }}"""

    @agent
    async def count(text: str) -> int:
        """Count: {{ text }}"""

    with override_model(FakeModel()):
        await summarise("one message")
        await briefly("two messages")
    with override_model(FakeModel(["many", "3"])):  # one answer the output retry corrects
        assert await count("three words here") == 3
    store = EventStore(store_url)
    first, second = sorted(
        (a for a in store.get_executions(kind="llm") if "Count" in a["inputs"][0]["content"]),
        key=lambda a: a["started_at"],
    )
    # Each attempt as it was sent: the agent added to the conversation after the first.
    assert [m["role"] for m in first["inputs"]] == ["user"]
    assert [m["role"] for m in second["inputs"]] == ["user", "assistant", "user"]
    sent = {
        a["inputs"][-1]["content"]: a["inputs"]
        for a in store.get_executions(kind="llm")
        if "Count" not in a["inputs"][0]["content"]
    }
    assert sent == {
        "Summarise: one message": [{"role": "user", "content": "Summarise: one message"}],
        "Summarise: two messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Summarise: two messages"},
        ],
    }


async def test_failed_calls_keep_their_error_text_and_type(
    recorder: Recorder, store_url: str
) -> None:
    error = ValueError("the model rejected the input")

    @workflow
    async def pipeline() -> None:
        await summarise("fine")
        await classify("boom")

    with override_model(FakeModel(["ok", error])), pytest.raises(ValueError) as raised:
        await pipeline()
    assert raised.value is error
    store = EventStore(store_url)
    (run,) = store.get_executions("pipeline")
    assert run["status"] == "failed"
    assert run["error"] == "the model rejected the input"
    assert run["error_type"] == "ValueError"
    (failed,) = store.get_executions("classify")
    assert (failed["status"], failed["error_type"]) == ("failed", "ValueError")
    (llm,) = store.get_executions(kind="llm", status="failed")
    assert llm["parent_id"] == failed["id"]
    assert llm["error"] == "the model rejected the input"
    assert store.get_executions("summarise")[0]["status"] == "completed"


async def test_cancelled_calls_are_recorded_as_cancelled(
    recorder: Recorder, store_url: str
) -> None:
    in_flight = asyncio.Event()

    def hang(request: ModelRequest) -> Reply:
        in_flight.set()
        return Reply("never", delay=120)

    @workflow
    async def pipeline() -> str:
        return await summarise("slow")

    with override_model(FakeModel([hang])):
        task = asyncio.create_task(pipeline())
        await in_flight.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    statuses = {(s["kind"], s["status"]) for s in rows_after_flush(recorder, store_url)}
    assert statuses == {("workflow", "cancelled"), ("agent", "cancelled"), ("llm", "cancelled")}


async def test_timeouts_are_recorded_as_timed_out(recorder: Recorder, store_url: str) -> None:
    @agent(total_timeout=0.05, retry=False)
    async def impatient(text: str) -> str:
        """Answer: {{ text }}"""

    @agent(timeout=0.05, retry=False)
    async def per_attempt(text: str) -> str:
        """Answer: {{ text }}"""

    never = FakeModel(delay=120)
    with override_model(never):
        with pytest.raises(TimeoutError):
            await impatient("x")
        with pytest.raises(TimeoutError):
            await per_attempt("y")
    store = EventStore(store_url)
    (whole,) = store.get_executions("impatient")
    assert whole["status"] == "timed_out"
    assert whole["error_type"] is not None
    (attempt,) = store.get_execution(whole["id"])["children"]  # type: ignore[index]
    # Cut short by the call's total timeout: the attempt says so too.
    assert (attempt["status"], attempt["error"]) == (
        "timed_out",
        "cut short by the agent call's total_timeout",
    )
    (single,) = store.get_executions("per_attempt")
    assert single["status"] == "timed_out"
    (attempt,) = store.get_execution(single["id"])["children"]  # type: ignore[index]
    assert attempt["status"] == "timed_out"
    assert attempt["error_type"] == "ProviderTimeout"


def rows_after_flush(recorder: Recorder, url: str) -> list[dict[str, Any]]:
    assert recorder.flush()
    return rows(url)


# -- resilience events --------------------------------------------------------------------------


async def test_retry_waits_are_events_and_counted(recorder: Recorder, store_url: str) -> None:
    fake = FakeModel(
        [
            ProviderError("overloaded", status_code=503),
            ProviderError("rate limited", status_code=429, headers={"retry-after": "0"}),
            "fine",
        ]
    )

    @workflow
    async def pipeline() -> str:
        return await summarise("x")

    with override_model(fake), no_waits():
        assert await pipeline() == "fine"
    store = EventStore(store_url)
    (run,) = store.get_executions("pipeline")
    tree = store.get_execution(run["id"])
    assert tree is not None
    assert run["metrics"]["retries"] == 2
    assert run["metrics"]["llm_calls"] == 3
    (call,) = tree["children"]
    assert call["metrics"]["retries"] == 2
    waits = [e for e in call["events"] if e["name"] == "retry_wait"]
    assert [w["attributes"]["attempt"] for w in waits] == [1, 2]
    assert "503" in waits[0]["attributes"]["error"]
    assert "429" in waits[1]["attributes"]["error"]
    assert [c["status"] for c in call["children"]] == ["failed", "failed", "completed"]


async def test_breaker_state_changes_and_fallbacks_are_events(
    recorder: Recorder, store_url: str
) -> None:
    breaker = CircuitBreaker("obs-test", failure_threshold=1, recovery_time=3600)
    down = ProviderError("down", status_code=503)

    @agent(model=FakeModel([down], name="flaky"), breaker=breaker, retry=False)
    async def guarded(text: str) -> str:
        """Answer: {{ text }}"""

    @agent(
        model=FakeModel([down], name="primary"), fallback=[FakeModel(name="backup")], retry=False
    )
    async def resilient(text: str) -> str:
        """Answer: {{ text }}"""

    with pytest.raises(ProviderError):
        await guarded("first")  # opens the circuit
    with pytest.raises(CircuitOpenError):
        await guarded("second")  # refused without calling the model
    with no_waits():
        assert await resilient("x") == "Answer: x"

    store = EventStore(store_url)
    second, first = store.get_executions("guarded")
    opened = store.get_execution(first["id"])
    assert opened is not None
    (change,) = opened["events"]
    assert change["name"] == "breaker_state"
    assert change["attributes"] == {"breaker": "obs-test", "old": "closed", "new": "open"}
    assert second["error_type"] == "CircuitOpenError"
    assert second["metrics"]["llm_calls"] == 0

    (call,) = store.get_executions("resilient")
    tree = store.get_execution(call["id"])
    assert tree is not None
    fallbacks = [e for e in tree["events"] if e["name"] == "fallback"]
    assert len(fallbacks) == 1
    assert fallbacks[0]["attributes"]["failed"] == "fake/primary"
    assert fallbacks[0]["attributes"]["next"] == "fake/backup"
    assert tree["attributes"]["answered_by"] == "fake/backup"
    assert call["model"] == tree["model"] == "fake/backup"  # the call's model: who answered
    assert [(c["model"], c["status"]) for c in tree["children"]][-1] == ("fake/backup", "completed")


# -- recording never changes the outcome --------------------------------------------------------


class BrokenSink:
    def handle(self, event: Event) -> None:
        raise RuntimeError("sink exploded")


class Unserialisable:
    def __str__(self) -> str:
        return "a thing"


class BrokenRepr(Unserialisable):
    def __repr__(self) -> str:
        raise RuntimeError("repr exploded")


@agent
async def describe(text: str, thing: object = None) -> str:
    """Describe: {{ text }}"""


async def test_a_failing_sink_changes_nothing(recorder: Recorder, store_url: str) -> None:
    sink = BrokenSink()
    instrument.add_sink(sink)
    error = ValueError("own error")
    try:
        with override_model(FakeModel(["result", error])):
            assert await describe("x") == "result"
            with pytest.raises(ValueError) as raised:
                await describe("y")
    finally:
        instrument.remove_sink(sink)
    assert raised.value is error
    assert len(rows_after_flush(recorder, store_url)) == 4  # the recorder still got everything


async def test_unserialisable_arguments_are_stored_as_repr(
    recorder: Recorder, store_url: str
) -> None:
    with override_model(FakeModel()):
        assert await describe("one", Unserialisable()) == "Describe: one"
        assert await describe("two", BrokenRepr()) == "Describe: two"
        assert await describe("three", {1, 2}) == "Describe: three"  # recording goes on after
    store = EventStore(store_url)
    inputs = {e["inputs"]["text"]: e["inputs"]["thing"] for e in store.get_executions("describe")}
    assert inputs["one"].startswith("<") and "Unserialisable object" in inputs["one"]
    assert "BrokenRepr" in inputs["two"]
    assert inputs["three"] == [1, 2]
    assert all(e["status"] == "completed" for e in store.get_executions(kind=None))


class Ticket(BaseModel):
    title: str
    priority: int


@dataclass
class Customer:
    name: str
    since: datetime.date


@agent
async def triage(customer: Customer, text: str) -> Ticket:
    """Triage for {{ customer.name }}: {{ text }}"""


async def test_models_and_dataclasses_are_stored_as_their_json(
    recorder: Recorder, store_url: str
) -> None:
    customer = Customer("Ada", datetime.date(2024, 5, 1))
    with override_model(FakeModel(['{"title": "printer", "priority": 2}'])):
        assert await triage(customer, "it jams") == Ticket(title="printer", priority=2)
    (call,) = EventStore(store_url).get_executions("triage")
    assert call["inputs"] == {
        "customer": {"name": "Ada", "since": "2024-05-01"},
        "text": "it jams",
    }
    assert call["output"] == {"title": "printer", "priority": 2}


class ChangingModel(Model):
    """Answers after changing, while the call is on, the values its caller passed."""

    provider = "fake"
    model_name = "changing"

    def __init__(self, items: list[str], options: dict[str, str]) -> None:
        self.items, self.options = items, options

    async def request(self, request: ModelRequest) -> ModelResponse:
        self.items.append("added during the call")
        self.options["mode"] = "changed during the call"
        return ModelResponse("done")


async def test_inputs_are_recorded_as_they_were_when_the_call_started(
    recorder: Recorder, store_url: str
) -> None:
    items, options = ["first"], {"mode": "as called"}

    @agent(model=ChangingModel(items, options))
    async def tally(items: list[str], options: dict[str, str], note: str) -> str:
        """Tally {{ items }} ({{ options }}): {{ note }}"""

    @workflow
    async def count(items: list[str], note: str) -> str:
        answer = await tally(items, options, note)
        items.append("added by the workflow")
        return answer

    assert await count(items, "plain text") == "done"
    store = EventStore(store_url)
    (call,) = store.get_executions("tally")
    assert call["inputs"] == {
        "items": ["first"],
        "options": {"mode": "as called"},
        "note": "plain text",
    }
    (run,) = store.get_executions("count")
    assert run["inputs"] == {"items": ["first"], "note": "plain text"}
    (attempt,) = store.get_executions(kind="llm")
    assert "as called" in attempt["inputs"][0]["content"]
    assert "changed" not in attempt["inputs"][0]["content"]


@pytest.fixture
def unopenable_url(store_url: str, tmp_path: Path) -> str:
    if is_postgres(store_url):
        return f"postgresql://postgres@127.0.0.1:{free_port()}/nothing_listens_here"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    return str(blocker / "events.db")


async def test_a_store_that_cannot_be_opened_changes_nothing(
    record_to: Callable[..., Recorder], unopenable_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = record_to(unopenable_url)
    error = ValueError("own error")
    with override_model(FakeModel(["result", error])):
        assert await describe("x") == "result"
        with pytest.raises(ValueError) as raised:
            await describe("y")
    assert raised.value is error
    if is_postgres(unopenable_url):  # a server not up yet: tried again, as a failed write is
        assert recorder.flush() is True
        assert not recorder.broken and recorder.failed_batches >= 1  # said by its writer
    else:
        assert recorder.flush() is False  # it says nothing was recorded
        assert recorder.broken
        assert "recording is off: event store " in caplog.text
    with override_model(FakeModel()):
        assert await describe("later") == "Describe: later"


# -- secrets and privacy ------------------------------------------------------------------------

KEY_SHAPED = "sk-proj-AbCdEfGhIjKlMnOp1234567890"
NOT_KEY_SHAPED = "hunter2-correct-horse"


def every_text(url: str) -> str:
    return "\n".join(
        str(value)
        for table in ("kagura_spans", "kagura_events")
        for row in rows(url, table)
        for value in row.values()
    )


@agent
async def ask(question: str, api_key: str = "") -> str:
    """Question: {{ question }}"""


async def test_api_keys_are_never_stored(recorder: Recorder, store_url: str) -> None:
    @workflow
    async def pipeline(question: str, *, api_key: str) -> str:
        return await ask(question, api_key=api_key)

    leaked = ProviderError(f"Incorrect API key provided: {KEY_SHAPED}", status_code=401)
    with override_model(FakeModel()):
        answer = await pipeline(f"is {KEY_SHAPED} valid?", api_key=NOT_KEY_SHAPED)
    assert KEY_SHAPED in answer  # the agent's own result is untouched
    with override_model(FakeModel([leaked])), pytest.raises(ProviderError):
        await ask("again", api_key=KEY_SHAPED)
    assert recorder.flush()
    text = every_text(store_url)
    assert KEY_SHAPED not in text
    assert NOT_KEY_SHAPED not in text
    store = EventStore(store_url)
    failed, call = store.get_executions("ask")
    assert call["inputs"] == {"question": "is [REDACTED] valid?", "api_key": "[REDACTED]"}
    assert call["output"] == "Question: is [REDACTED] valid?"
    assert failed["error"] == "HTTP 401: Incorrect API key provided: [REDACTED]"
    (run,) = store.get_executions("pipeline")
    assert run["inputs"] == {"question": "is [REDACTED] valid?", "api_key": "[REDACTED]"}


async def test_an_attempt_that_asked_for_tools_records_them_redacted(
    recorder: Recorder, store_url: str
) -> None:
    """Its output is empty: without the calls, nothing said what it answered."""

    @tool
    def sign_in(user: str, password: str) -> str:
        """Sign in."""
        return "signed in"

    calls = (ToolCall("c1", "sign_in", json.dumps({"user": "ann", "password": NOT_KEY_SHAPED})),)
    with override_model(FakeModel([Reply(tool_calls=calls), Reply("done")])):

        @agent(tools=[sign_in])
        async def log_in(user: str) -> str:
            """Log {{ user }} in."""

        assert await log_in("ann") == "done"
    assert recorder.flush()
    asked, _ = sorted(
        EventStore(store_url).get_executions(kind="llm"), key=lambda e: e["started_at"]
    )
    assert asked["attributes"]["tool_calls"] == [
        {"id": "c1", "name": "sign_in", "arguments": '{"user": "ann", "password": "[REDACTED]"}'}
    ]
    assert NOT_KEY_SHAPED not in every_text(store_url)


@pytest.mark.parametrize("content", ["hash", "none"])
async def test_tool_calls_asked_for_are_content_hashed_or_left_out_as_outputs_are(
    store_url: str, record_to: Callable[..., Recorder], content: str
) -> None:
    """With ``KAGURA_RECORD_CONTENT=hash`` or ``none``, the arguments a model gave its tools
    were stored in plain text beside an output that was hashed or left out."""
    recorder = record_to(store_url, KAGURA_RECORD_CONTENT=content)
    private = "Jane Doe, born 1970-01-01"

    @tool
    def file_record(patient: str) -> str:
        """File a patient's record."""
        return "filed"

    calls = (ToolCall("c1", "file_record", json.dumps({"patient": private})),)
    with override_model(FakeModel([Reply(tool_calls=calls), Reply("done")])):

        @agent(tools=[file_record])
        async def clerk(note: str) -> str:
            """File this: {{ note }}"""

        assert await clerk("a note") == "done"
    assert recorder.flush()
    asked, _ = sorted(
        EventStore(store_url).get_executions(kind="llm"), key=lambda e: e["started_at"]
    )
    (call,) = asked["attributes"]["tool_calls"]
    assert (call["id"], call["name"]) == ("c1", "file_record")
    if content == "hash":
        assert set(call["arguments"]) == {"sha256"}
    else:
        assert "arguments" not in call
    assert private not in every_text(store_url)


async def test_long_tool_call_arguments_are_cut_not_the_attempt_s_other_attributes(
    recorder: Recorder, store_url: str
) -> None:
    @tool
    def save(text: str) -> str:
        """Save a text."""
        return "saved"

    long = json.dumps({"text": "x" * 100_000})
    with override_model(FakeModel([Reply(tool_calls=(ToolCall("c1", "save", long),)), "ok"])):

        @agent(tools=[save])
        async def keeper(note: str) -> str:
            """Keep {{ note }}"""

        assert await keeper("it") == "ok"
    assert recorder.flush()
    asked, _ = sorted(
        EventStore(store_url).get_executions(kind="llm"), key=lambda e: e["started_at"]
    )
    attributes = asked["attributes"]
    assert attributes["finish_reason"] == "stop"
    (call,) = attributes["tool_calls"]
    assert call["name"] == "save" and call["arguments"].endswith("…")
    assert call["arguments"].startswith('{"text": "xxx') and len(call["arguments"]) < 64_000


async def test_a_secret_passed_by_position_is_redacted_by_its_parameters_name(
    recorder: Recorder, store_url: str
) -> None:
    # A run's and a step's arguments are recorded by name, as an agent's are: a secret's name
    # redacts a value of no key shape however it was passed.
    @workflow
    async def fetch(url: str, api_key: str, password: str) -> str:
        return await step("call", lambda u, token: u, url, api_key)

    assert await fetch("https://example.com", NOT_KEY_SHAPED, "hunter2-by-position") == (
        "https://example.com"
    )
    assert recorder.flush()
    text = every_text(store_url)
    assert NOT_KEY_SHAPED not in text and "hunter2-by-position" not in text
    store = EventStore(store_url)
    (run,) = store.get_executions("fetch")
    assert run["inputs"] == {
        "url": "https://example.com",
        "api_key": "[REDACTED]",
        "password": "[REDACTED]",
    }
    (call,) = store.get_executions("call", kind="step")
    assert call["inputs"] == {"u": "https://example.com", "token": "[REDACTED]"}


def test_a_secrets_name_redacts_its_value_but_counts_that_share_its_words_stay() -> None:
    from kagura._redact import scrub

    named = {name: "shown" for name in ("max_tokens", "token_count", "tokens", "tokenizer")}
    named |= {"secretary": "shown", "token_budget": "shown"}
    secret = {name: "hidden" for name in ("token", "access_token", "AuthToken", "api_key")}
    secret |= {"client_secret": "hidden", "password": "hidden", "credentials": "hidden"}
    assert scrub({**named, **secret}) == {**named, **dict.fromkeys(secret, "[REDACTED]")}


async def test_a_key_quoted_by_an_error_alone_is_redacted(
    recorder: Recorder, store_url: str
) -> None:
    @agent
    async def echo(text: str) -> str:
        """Echo: {{ text }}"""

    # Nothing else in the batch looks like a secret: the error must be redacted all the same.
    leaked = ProviderError(f"rejected {KEY_SHAPED}", status_code=401)
    with override_model(FakeModel([leaked])), pytest.raises(ProviderError):
        await echo("plain words")
    assert recorder.flush()
    assert KEY_SHAPED not in every_text(store_url)
    (failed,) = EventStore(store_url).get_executions("echo")
    assert failed["error"] == "HTTP 401: rejected [REDACTED]"
    assert failed["inputs"] == {"text": "plain words"}


def test_records_from_other_producers_with_odd_values_are_stored_as_text(
    recorder: Recorder, store_url: str
) -> None:
    """A producer may hand over a record whose fields are not the plain values Kagura's own
    instrumentation makes: stored as their repr, and the rest of the batch with them."""
    from kagura._events import SpanFinished, SpanStarted

    class Odd:
        def __repr__(self) -> str:
            return "<odd error>"

    recorder.handle(SpanStarted("odd-1", None, "odd-1", "step", "odd", "odd", 1_000, {}))
    # An LLM attempt whose inputs are text, not messages: stored as that text.
    attempt = ("odd-2", "odd-1", "odd-1", "llm", "other/model", "odd/other#0", 1_000)
    recorder.handle(SpanStarted(*attempt, {"model": "other/model", "inputs": "plain text"}))
    recorder.handle(SpanFinished(*attempt, 2_000, "completed", None, None, None, 0.0, {}))
    recorder.handle(
        SpanFinished(
            "odd-1",
            None,
            "odd-1",
            "step",
            "odd",
            "odd",
            1_000,
            2_000,
            "failed",
            Odd(),  # type: ignore[arg-type]  # what a careless producer might send
            "Odd",
            None,
            0.0,
            {"output": Odd()},
        )
    )
    with override_model(FakeModel()):
        asyncio.run(agent_in_a_fresh_loop())
    assert recorder.flush()
    stored = {r["span_id"]: r for r in rows(store_url)}
    assert stored["odd-1"]["error"] == "<odd error>"
    assert json.loads(stored["odd-1"]["output"]) == "<odd error>"
    assert json.loads(stored["odd-2"]["inputs"]) == "plain text"
    assert any(r["kind"] == "agent" for r in stored.values())  # the batch's other rows too


async def agent_in_a_fresh_loop() -> None:
    @agent
    async def echo(text: str) -> str:
        """Echo: {{ text }}"""

    await echo("hello")


MARKER = "zanzibar"


async def _run_content_workload() -> None:
    fake = FakeModel(
        [Reply(tool_calls=(ToolCall("c1", "double", f'{{"x": 3, "n": "{MARKER}"}}'),))]
    )

    @workflow
    async def pipeline(text: str) -> list[str]:
        return [await calculator(text), await summarise(text), await summarise(text)]

    with override_model(fake):
        await pipeline(f"secret plans for {MARKER}")


async def test_content_hash_stores_hashes_only(
    record_to: Callable[..., Recorder], store_url: str
) -> None:
    recorder = record_to(store_url, KAGURA_RECORD_CONTENT="hash")
    await _run_content_workload()
    assert recorder.flush()
    assert MARKER not in every_text(store_url)
    spans = rows(store_url)
    stored = [s[column] for s in spans for column in ("inputs", "output") if s[column] is not None]
    assert len(stored) == 2 * len(spans)  # every span has hashed inputs and output
    assert all(re.fullmatch(r'\{"sha256":"[0-9a-f]{64}"\}', value) for value in stored)
    # Equal content gives equal hashes: repeated prompts can still be found.
    agent_inputs = [s["inputs"] for s in spans if s["name"] == "summarise"]
    assert len(agent_inputs) == 2
    assert agent_inputs[0] == agent_inputs[1]


async def test_content_none_stores_no_prompts_or_outputs(
    record_to: Callable[..., Recorder], store_url: str
) -> None:
    recorder = record_to(store_url, KAGURA_RECORD_CONTENT="none")
    await _run_content_workload()
    assert recorder.flush()
    assert MARKER not in every_text(store_url)
    spans = rows(store_url)
    assert Counter(s["kind"] for s in spans) == {"workflow": 1, "agent": 3, "llm": 4, "tool": 1}
    assert all(s["inputs"] is None and s["output"] is None for s in spans)
    assert all(s["total_tokens"] > 0 for s in spans if s["kind"] == "llm")  # metrics still kept


@pytest.mark.parametrize("setting", ["off", "0", "hashed"])
async def test_a_content_setting_misspelt_records_no_content_and_says_so(
    record_to: Callable[..., Recorder], store_url: str, setting: str
) -> None:
    # A privacy setting is meant to keep something out: not everything, in full, in silence.
    with pytest.warns(UserWarning, match=f"KAGURA_RECORD_CONTENT='{setting}' is none of"):
        recorder = record_to(store_url, KAGURA_RECORD_CONTENT=setting)
    await _run_content_workload()
    assert recorder.flush()
    assert MARKER not in every_text(store_url)
    assert all(s["inputs"] is None and s["output"] is None for s in rows(store_url))


async def test_kagura_record_0_records_nothing(
    record_to: Callable[..., Recorder], store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    uninstall_default()
    instrument.reset_recording_check()
    monkeypatch.setenv("KAGURA_DB", store_url)
    monkeypatch.setenv("KAGURA_RECORD", "0")

    @workflow
    async def pipeline() -> str:
        return await summarise("x")

    with override_model(FakeModel()):
        assert await pipeline() == "Summarise: x"
    assert default_recorder() is None
    assert not any(isinstance(s, Recorder) for s in instrument.sinks())
    if not is_postgres(store_url):
        assert not await asyncio.to_thread(Path(store_url).exists)  # not even created
    assert EventStore(store_url).get_executions(kind=None) == []


# -- nothing lost -------------------------------------------------------------------------------

WORKLOAD = """
import asyncio, os, signal, sys
from kagura import agent, workflow
from kagura.testing import FakeModel, Reply, override_model

@agent
async def summarise(text: str) -> str:
    '''Summarise: {{ text }}'''

@workflow
async def pipeline(n: int) -> list[str]:
    return list(await asyncio.gather(*(summarise(f"doc {i}") for i in range(n))))

@workflow
async def failing() -> None:
    await summarise("before the error")
    raise RuntimeError("boom at the end")

# Ctrl-C as in a terminal: a suite started in the background (`make test &`) hands its
# processes SIGINT ignored, and this one would wait out the reply below.
signal.signal(signal.SIGINT, signal.default_int_handler)

def interrupt(request):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while this LLM request is in flight
    return Reply("never", delay=120)

@workflow
async def interrupted() -> None:
    await summarise("before the interrupt")
    with override_model(FakeModel([interrupt])):
        await summarise("during the interrupt")

async def main(mode: str) -> None:
    for i in range(20):
        await summarise(f"solo {i}")
    await pipeline(30)
    if mode == "error":
        await failing()
    if mode == "interrupt":
        await interrupted()

asyncio.run(main(sys.argv[1]))  # and exit: nothing calls flush()
"""


RECORDER_AND_JOURNAL = """
import asyncio
from kagura import agent, step, workflow

@agent(model="fake")
async def ask(question: str) -> str:
    \"\"\"{{ question }}\"\"\"

@workflow(durable=True)
async def flow() -> int:
    return await step("one", int, 1)

async def main():
    await ask("first")  # the recorder's thread opens the store, importing SQLAlchemy...
    assert await flow.run(run_id="together") == 1  # ...while the journal's thread does

asyncio.run(main())
"""


def test_the_recorders_and_the_journals_threads_import_sqlalchemy_together(
    store_url: str,
) -> None:
    # One of them got SQLAlchemy half imported, and recording was turned off for good.
    result = run_script(
        RECORDER_AND_JOURNAL,
        {"KAGURA_DB": store_url, "KAGURA_RECORD_PROCESS": "0"},
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert "recording is off" not in result.stderr
    kinds = Counter(s["kind"] for s in rows(store_url))
    assert (kinds["agent"], kinds["workflow"], kinds["step"]) == (1, 1, 1)


@pytest.mark.parametrize("mode", ["normal", "error", "interrupt"])
def test_nothing_is_lost_when_the_process_ends(store_url: str, mode: str) -> None:
    result = run_script(
        WORKLOAD, {"KAGURA_DB": store_url, "KAGURA_MODEL": "fake"}, mode, timeout=SUBPROCESS_TIMEOUT
    )
    if mode == "normal":
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0
        expected = "boom at the end" if mode == "error" else "KeyboardInterrupt"
        assert expected in result.stderr
    spans = rows(store_url)
    assert_one_tree_per_run({s["span_id"]: s for s in spans})
    statuses = Counter((s["kind"], s["name"], s["status"]) for s in spans)
    assert statuses[("agent", "summarise", "completed")] == 20 + 30 + (mode != "normal")
    assert statuses[("workflow", "pipeline", "completed")] == 1
    assert not any(s["status"] == "running" for s in spans)
    if mode == "error":
        (run,) = [s for s in spans if s["name"] == "failing"]
        assert (run["status"], run["error"]) == ("failed", "boom at the end")
        assert len(spans) == 2 * 50 + 1 + 3
    if mode == "interrupt":
        assert statuses[("workflow", "interrupted", "cancelled")] == 1
        assert statuses[("agent", "summarise", "cancelled")] == 1
        assert statuses[("llm", "fake/echo", "cancelled")] == 1
        assert len(spans) == 2 * 50 + 1 + 5


HANDED_OFF = """
import asyncio, os, signal
from kagura import agent
from kagura.observability._recorder import default_recorder

@agent
async def summarise(text: str) -> str:
    '''Summarise: {{ text }}'''

asyncio.run(summarise("the last words"))
recorder = default_recorder()
assert recorder._writer_made.wait(30)
pid = recorder._writer.process.pid
os.kill(pid, signal.SIGSTOP)  # the writer process cannot commit anything now
print(pid, flush=True)
"""


def test_a_process_leaves_without_waiting_for_its_writer_and_readers_wait_for_it(
    store_url: str, tmp_path: Path
) -> None:
    """At exit the recording process hands its rows to its writer process and leaves (here the
    writer is stopped, so the script could not end if it waited); every reader then waits for
    the writer to commit them, under the lock the writer holds until it has."""
    # A stderr that is a file, which the writer shares (a pipe it would not hold: it gets one of
    # its own, see observability/_writer_log.py).
    with (tmp_path / "stderr").open("w+") as stderr:
        result = subprocess.run(
            [sys.executable, "-c", HANDED_OFF],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=SUBPROCESS_TIMEOUT,
            env=child_env({"KAGURA_DB": store_url, "KAGURA_MODEL": "fake"}),
            check=False,
        )
        stderr.seek(0)
        assert result.returncode == 0, stderr.read()
    writer = int(result.stdout)
    try:
        (lock,) = lock_directory(normalise_url(store_url)).iterdir()
        with lock.open() as file, pytest.raises(BlockingIOError):
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)  # held: the writer is not done
        found: list[list[dict[str, Any]]] = []
        reader = threading.Thread(
            target=lambda: found.append(EventStore(store_url).get_executions())
        )
        reader.start()  # reads while the writer is stopped, or after: either way it waits
    finally:
        os.kill(writer, signal.SIGCONT)
    reader.join(SUBPROCESS_TIMEOUT)
    assert [e["name"] for e in found[0]] == ["summarise"]
    assert [(s["kind"], s["status"]) for s in rows(store_url)].count(("agent", "completed")) == 1
    assert not lock.exists()  # the writer removes it once everything is committed


WRITER = """
import asyncio, pathlib, sys, time
from kagura import agent

@agent
async def summarise(text: str) -> str:
    '''Summarise: {{ text }}'''

async def main(worker: str, calls: int) -> None:
    for i in range(calls):
        await summarise(f"worker {worker} doc {i}")

barrier, worker, workers, calls = pathlib.Path(sys.argv[1]), sys.argv[2], *map(int, sys.argv[3:])
(barrier / f"ready-{worker}").touch()
deadline = time.monotonic() + 30
while len(list(barrier.glob("ready-*"))) < workers:  # start together: maximal contention
    if time.monotonic() > deadline:
        sys.exit("the other writers never started")
    time.sleep(0.01)
asyncio.run(main(worker, calls))
"""


def test_several_processes_write_to_one_store(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workers, calls = 4, 200
    # A home of this test's: what the writer processes say once their recording processes
    # have gone (their last batch is written after) goes to its recorder.log.
    home = tmp_path / "home"
    monkeypatch.setenv("KAGURA_HOME", str(home))
    env = {"KAGURA_DB": store_url, "KAGURA_MODEL": "fake"}
    processes = [
        spawn_script(WRITER, env, str(tmp_path), str(n), str(workers), str(calls))
        for n in range(workers)
    ]
    results = []
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT)
            results.append((process.returncode, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    for returncode, stderr in results:
        assert returncode == 0, stderr
        assert "locked" not in stderr.lower(), stderr
        assert "Traceback" not in stderr, stderr
        assert "kagura:" not in stderr, stderr  # the recorder logs nothing when all goes well
    spans = rows(store_url)
    log = home / "recorder.log"
    assert not log.exists(), log.read_text()
    assert len(spans) == workers * calls * 2
    assert all(s["status"] == "completed" for s in spans)
    assert len({s["pid"] for s in spans}) == workers
    assert Counter(s["kind"] for s in spans) == {"agent": workers * calls, "llm": workers * calls}


# -- the loop is never blocked ------------------------------------------------------------------


async def test_disk_io_never_blocks_the_event_loop(
    recorder: Recorder, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    writing, release = threading.Event(), threading.Event()
    write = recorder._write

    def stuck_write(*args: Any) -> None:
        writing.set()
        if not release.wait(SUBPROCESS_TIMEOUT):
            raise AssertionError("the test never released the writer")
        write(*args)

    monkeypatch.setattr(recorder, "_write", stuck_write)
    try:
        with override_model(FakeModel()):
            await summarise("first")
            # The writer thread is now stuck inside a write, as on a slow or locked disk...
            assert await asyncio.to_thread(writing.wait, SUBPROCESS_TIMEOUT)

            @workflow
            async def busy() -> list[str]:
                return list(await asyncio.gather(*(summarise(str(i)) for i in range(50))))

            # ...and the loop still runs every call to the end.
            results = await busy()
        assert results == [f"Summarise: {i}" for i in range(50)]
        assert recorder.written_spans == 0
    finally:
        release.set()
    assert recorder.flush()
    assert len(rows(store_url)) == 2 + 1 + 50 * 2


def test_importing_kagura_does_not_import_the_database_layer() -> None:
    code = (
        "import sys, kagura, kagura.observability\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'psycopg')]\n"
        "assert not loaded, loaded\n"
    )
    result = run_script(code, {}, timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr


# -- the writer process -------------------------------------------------------------------------


async def test_the_writer_process_is_given_no_secret_on_its_command_line(
    recorder: Recorder, store_url: str
) -> None:
    assert recorder.flush()
    sidecar = recorder._writer
    assert sidecar is not None and hasattr(sidecar, "process")
    command = " ".join(sidecar.process.args)
    assert store_url not in command  # a database URL may hold a password: `ps` shows argv
    assert "kagura.observability._writer" in command


async def test_a_burst_is_handed_over_by_the_loop_and_every_row_lands_once(
    recorder: Recorder, store_url: str
) -> None:
    # 3,000 rows: the loop hands over batches of 1,000 itself, as the thread does the rest.
    with override_model(FakeModel()):
        await asyncio.gather(*(summarise(f"text {i}") for i in range(1500)))
    assert recorder.flush()
    assert recorder.written_spans == 3000
    spans = rows(store_url)
    assert Counter(s["kind"] for s in spans) == {"agent": 1500, "llm": 1500}
    texts = {json.loads(s["inputs"])["text"] for s in spans if s["kind"] == "agent"}
    assert texts == {f"text {i}" for i in range(1500)}


def test_event_loops_in_several_threads_record_every_row_once(
    recorder: Recorder, store_url: str
) -> None:
    def calls(thread: int) -> None:
        async def main() -> None:
            await asyncio.gather(*(summarise(f"thread {thread} text {i}") for i in range(1500)))

        with override_model(FakeModel()):  # a context variable: each thread sets its own
            asyncio.run(main())

    threads = [threading.Thread(target=calls, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SUBPROCESS_TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    assert recorder.flush()
    spans = rows(store_url)
    texts = Counter(json.loads(s["inputs"])["text"] for s in spans if s["kind"] == "agent")
    assert len(texts) == 4500 and set(texts.values()) == {1}
    assert len(spans) == 9000


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
async def test_a_writer_process_that_stops_reading_never_blocks_the_loop(
    recorder: Recorder, store_url: str
) -> None:
    with override_model(FakeModel()):
        await summarise("the writer process is up")
    assert recorder.flush()
    sidecar = recorder._writer
    assert sidecar is not None and hasattr(sidecar, "process")
    finished, blocked = threading.Event(), threading.Event()

    def watchdog() -> None:  # were the loop stuck in a write, nothing else would let it go
        if not finished.wait(SUBPROCESS_TIMEOUT):
            blocked.set()
            sidecar.process.send_signal(signal.SIGCONT)

    sidecar.process.send_signal(signal.SIGSTOP)
    guard = threading.Thread(target=watchdog, daemon=True)
    guard.start()
    try:
        # About 3 MB of rows: more than the pipe holds, while nothing reads it.
        with override_model(FakeModel()):
            for start in range(0, 20_000, 2_000):
                await asyncio.gather(*(summarise(f"text {i}") for i in range(start, start + 2000)))
    finally:
        finished.set()
        sidecar.process.send_signal(signal.SIGCONT)
        guard.join()
    assert not blocked.is_set(), "the event loop waited for the stopped writer process"
    assert recorder.flush(timeout=SUBPROCESS_TIMEOUT)
    assert recorder.written_spans == 1 * 2 + 20_000 * 2
    assert len(rows(store_url)) == 2 + 40_000


async def test_recording_goes_on_when_the_writer_process_dies(
    recorder: Recorder, store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with override_model(FakeModel()):
        await summarise("before")
        assert recorder.flush()
        sidecar = recorder._writer
        assert sidecar is not None and hasattr(sidecar, "process")
        sidecar.process.kill()
        sidecar.process.wait(SUBPROCESS_TIMEOUT)
        await summarise("after")
    assert recorder.flush()
    assert "writer process stopped" in caplog.text
    inputs = Counter(
        (row["kind"], row["status"], json.loads(row["inputs"])["text"])
        for row in rows(store_url)
        if row["kind"] == "agent"
    )
    assert inputs == {("agent", "completed", "before"): 1, ("agent", "completed", "after"): 1}


@pytest.mark.parametrize("setting", ["0", "1"])
async def test_the_writer_runs_in_a_thread_or_a_process_with_the_same_rows(
    record_to: Callable[..., Recorder], store_url: str, setting: str
) -> None:
    recorder = record_to(store_url, KAGURA_RECORD_PROCESS=setting)

    @workflow
    async def pipeline(text: str) -> str:
        return await calculator(await summarise(text))

    calls = [ToolCall("c1", "double", '{"x": 21}')]
    with override_model(FakeModel(["short", Reply("", tool_calls=calls), "42"])):
        assert await pipeline("a long text") == "42"
    spans = by_id(recorder, store_url)
    assert hasattr(recorder._writer, "process") is (setting == "1")
    assert Counter((s["kind"], s["name"], s["status"]) for s in spans.values()) == {
        ("workflow", "pipeline", "completed"): 1,
        ("agent", "summarise", "completed"): 1,
        ("agent", "calculator", "completed"): 1,
        ("llm", "fake/echo", "completed"): 3,
        ("tool", "double", "completed"): 1,
    }
    (run,) = [s for s in spans.values() if s["kind"] == "workflow"]
    assert run["llm_calls"] == 3
    assert json.loads(run["output"]) == "42"


@pytest.mark.local_model  # its last call, outside the override, reaches the embedded model
async def test_a_flush_writes_every_queued_row_however_many_batches_they_make(
    store_url: str,
) -> None:
    # A timer that never fires and batches of four rows: the flush alone writes the 30 rows of
    # 15 calls, in several batches, and each of them once.
    recorder = Recorder(store_url, flush_interval=3600, batch_size=4)
    instrument.add_sink(recorder)
    try:
        with override_model(FakeModel()):
            await asyncio.gather(*(summarise(f"text {i}") for i in range(15)))
        assert recorder.flush()
        assert recorder.written_spans == 30
        written = rows(store_url)
        assert Counter(r["kind"] for r in written) == {"agent": 15, "llm": 15}
        assert sorted(json.loads(r["inputs"])["text"] for r in written if r["kind"] == "agent") == (
            sorted(f"text {i}" for i in range(15))
        )
        await summarise("after the flush")
        assert recorder.flush()
        assert recorder.written_spans == 32
    finally:
        instrument.remove_sink(recorder)
        recorder.close()


def test_a_batch_keeps_each_column_whether_or_not_other_rows_leave_it_empty(
    store_url: str,
) -> None:
    writer = StoreWriter(normalise_url(store_url), "full")

    def row(span_id: str, **values: Any) -> tuple[Any, ...]:
        fields: dict[str, Any] = dict.fromkeys(WIRE_COLUMNS)
        fields.update(span_id=span_id, run_id="r", kind="agent", name="n", key="n")
        fields.update(status="completed", start_ns=10**9, prompt_tokens=0, completion_tokens=0)
        fields.update(llm_calls=0, retries=0, **values)
        return tuple(fields[column] for column in WIRE_COLUMNS)

    try:
        writer.write(
            [row("a", status="running", model="m", output="early")], [], [], ("p", 7, "h", None)
        )
        # Nobody's model or attributes in this batch; one row's error, the other's output.
        finished = [row("a", output="late"), row("b", error="boom", error_type="E")]
        writer.write([], finished, [], ("p", 7, "h", None))
    finally:
        writer.dispose()
    stored = {r["span_id"]: r for r in rows(store_url)}
    assert (stored["a"]["status"], stored["a"]["model"], stored["a"]["output"]) == (
        "completed",
        None,  # the finished row replaces the running one, column by column
        '"late"',
    )
    assert (stored["a"]["error"], stored["b"]["error"], stored["b"]["error_type"]) == (
        None,
        "boom",
        "E",
    )
    assert stored["b"]["output"] is None and stored["b"]["attributes"] is None
    assert {r["pid"] for r in stored.values()} == {7}


FORKED = """
import asyncio, multiprocessing, sys
from kagura import agent

@agent
async def summarise(text: str) -> str:
    '''Summarise: {{ text }}'''

def child() -> None:
    asyncio.run(summarise("in the child"))

if __name__ == "__main__":
    asyncio.run(summarise("in the parent"))  # the parent's recorder and writer are running
    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    # The child's spans took the numbers the parent takes next: never the same ids.
    asyncio.run(summarise("in the parent, after the child"))
    sys.exit(process.exitcode)
"""


def test_a_forked_child_records_through_a_recorder_of_its_own(store_url: str) -> None:
    result = run_script(
        FORKED, {"KAGURA_DB": store_url, "KAGURA_MODEL": "fake"}, timeout=SUBPROCESS_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    spans = [s for s in rows(store_url) if s["kind"] == "agent"]
    assert sorted(json.loads(s["inputs"])["text"] for s in spans) == [
        "in the child",
        "in the parent",
        "in the parent, after the child",
    ]
    assert len({s["pid"] for s in spans}) == 2


def test_the_open_spans_are_listed_from_a_snapshot(store_url: str) -> None:
    """The recorder's thread lists the open spans (for their "running" rows) while the event
    loop's thread opens and closes spans. A garbage collection in the middle of that listing
    can run Python code (here a gc callback; finalizers in the wild) and so let the other thread
    change the dict: the listing must not fail. It did, and the batch's finished rows were
    dropped with it."""
    import gc

    from kagura._context import Span

    recorder = Recorder(store_url, flush_interval=3600)
    opened = [Span("agent", f"open-{i}", None) for i in range(2000)]
    for span in opened:
        recorder.span_started(span, {"inputs": {"i": span.name}})
    meanwhile = [Span("agent", f"meanwhile-{i}", None) for i in range(2000)]
    listing = threading.get_ident()  # the recorder's own thread collects garbage too

    def open_one(phase: str, _info: dict[str, Any]) -> None:
        if phase == "start" and meanwhile and threading.get_ident() == listing:
            recorder.span_started(meanwhile.pop(), None)

    thresholds = gc.get_threshold()
    gc.set_threshold(1, 1, 1)  # a collection at every allocation: inside the listing too
    gc.callbacks.append(open_one)
    try:
        running = recorder._running_rows(everything=True)
    finally:
        gc.set_threshold(*thresholds)
        gc.callbacks.remove(open_one)
        recorder.close()
    assert len(running) >= len(opened)


def test_first_calls_of_other_threads_wait_for_the_recorder_one_of_them_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Told "checked" while the recorder was still starting, other threads' first calls ran
    # unrecorded, or recorded without their model and inputs.
    from kagura import _recording, _settings
    from kagura.observability import _recorder

    monkeypatch.setattr(instrument, "_recording_checked", False)
    monkeypatch.setattr(_settings, "recording_enabled", lambda: True)
    inside = threading.Event()
    release = threading.Event()
    seen_while_installing: list[bool] = []
    installed: list[str] = []

    def install_default() -> None:
        seen_while_installing.append(instrument._recording_checked)
        inside.set()
        assert release.wait(timeout=60)
        installed.append("recorder")

    monkeypatch.setattr(_recorder, "install_default", install_default)
    first = threading.Thread(target=_recording.ensure_recording)
    first.start()
    assert inside.wait(timeout=60)
    found_installed: list[list[str]] = []

    def second_call() -> None:
        _recording.ensure_recording()
        found_installed.append(list(installed))

    second = threading.Thread(target=second_call)
    second.start()
    release.set()
    first.join(timeout=60)
    second.join(timeout=60)
    assert seen_while_installing == [False]  # nobody was told it was checked meanwhile
    assert found_installed == [["recorder"]]  # the other thread's call came after it
    assert installed == ["recorder"]  # started once
