"""Encryption at rest of what the recorder stores (``KAGURA_ENCRYPTION_KEY``): secrets that the
redaction does not catch are nowhere in the store's files (SQLite's WAL included; PostgreSQL's
table files and WAL after a checkpoint), every reader decrypts with the key, and a missing or
wrong key is a clear error, never garbage. Names, kinds, status, models, timings, tokens and cost
stay plain and queryable.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from kagura import agent, observability, workflow
from kagura._encryption import MARKER, decrypt, generate_key, is_encrypted
from kagura._redact import looks_secret
from kagura._storage import engine_for, normalise_url
from kagura.cli import main
from kagura.errors import EncryptionKeyError, ProviderError
from kagura.observability import EventStore, Recorder
from kagura.observability._writer import StoreWriter
from kagura.resilience import no_waits
from kagura.testing import FakeModel, override_model

from .conftest import is_postgres, rows
from .test_writer import KEY_SHAPED, batch_of, raw_spans, take

ENV = "KAGURA_ENCRYPTION_KEY"
SEALED_SPAN_COLUMNS = ("error", "inputs", "output", "attributes")


@dataclass(frozen=True)
class Secrets:
    """Texts a user's data may hold that look like nothing the redaction catches. A tag of this
    test's own in each: PostgreSQL's WAL is shared by every test of the session."""

    argument: str
    output: str
    error: str
    retry: str

    @classmethod
    def new(cls) -> Secrets:
        tag = uuid.uuid4().hex[:10]
        made = cls(
            argument=f"hunter2-correct-horse-{tag}",
            output=f"swordfish-open-sesame-{tag}",
            error=f"tr0ub4dor-battery-staple-{tag}",
            retry=f"plugh-xyzzy-magic-words-{tag}",
        )
        assert not any(looks_secret(value) for value in made.all())
        return made

    def all(self) -> tuple[str, ...]:
        return (self.argument, self.output, self.error, self.retry)


@agent
async def echo(text: str) -> str:
    """Repeat: {{ text }}"""


async def record_runs(secrets: Secrets) -> None:
    """A workflow whose argument and result hold secrets (its agent's first attempt fails with
    another in the error text, and is retried), and one that fails with a secret in its error."""

    @workflow
    async def handle(note: str) -> str:
        answer = await echo(note)
        return f"{answer} and {secrets.output}"

    @workflow
    async def broken(note: str) -> str:
        await echo(note)
        raise ValueError(f"cannot use {secrets.error}")

    overloaded = ProviderError(f"overloaded {secrets.retry}", status_code=503)
    with override_model(FakeModel([overloaded])), no_waits():
        assert secrets.output in await handle(secrets.argument)
        with pytest.raises(ValueError):
            await broken(secrets.argument)


def store_files(url: str) -> list[Path]:
    """The files that hold the store: SQLite's database, WAL and shared memory; PostgreSQL's
    files of this database and its WAL, once a checkpoint has written everything out."""
    if not is_postgres(url):
        path = Path(url)
        return sorted(path.parent.glob(path.name + "*"))
    engine = engine_for(normalise_url(url))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("CHECKPOINT")
        data = Path(connection.exec_driver_sql("SHOW data_directory").scalar_one())
        oid = connection.exec_driver_sql(
            "SELECT oid FROM pg_database WHERE datname = current_database()"
        ).scalar_one()
    found = [*(data / "base" / str(oid)).iterdir(), *(data / "pg_wal").iterdir()]
    return [path for path in found if path.is_file()]


def found_on_disk(url: str, *needles: str) -> set[str]:
    """Which of ``needles`` are in the raw bytes of the store's files."""
    files = store_files(url)
    assert files
    found = set()
    for path in files:
        data = path.read_bytes()
        found.update(needle for needle in needles if needle.encode() in data)
    return found


def span_ids(url: str, name: str) -> list[str]:
    """Ids of spans named ``name``, oldest first, read with plain SQL: names and times need no
    key."""
    with engine_for(normalise_url(url)).connect() as connection:
        found = connection.execute(
            text("SELECT span_id FROM kagura_spans WHERE name = :name ORDER BY started_at"),
            {"name": name},
        )
        return [str(span_id) for span_id in found.scalars()]


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _wide_plain_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def secrets() -> Secrets:
    return Secrets.new()


# -- the raw bytes ------------------------------------------------------------------------------


async def test_without_a_key_the_secrets_are_in_the_files(
    record_to: Callable[..., Recorder], store_url: str, secrets: Secrets
) -> None:
    # The control: what the tests below search the files for is there when nothing encrypts it.
    recorder = record_to(store_url)
    await record_runs(secrets)
    assert recorder.flush()
    observability.uninstall_default()
    assert found_on_disk(store_url, *secrets.all()) == set(secrets.all())


@pytest.mark.parametrize("process", ["1", "0"], ids=["writer-process", "writer-thread"])
async def test_with_a_key_no_secret_is_in_the_files_and_readers_decrypt(
    record_to: Callable[..., Recorder],
    store_url: str,
    secrets: Secrets,
    process: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key = generate_key()
    recorder = record_to(store_url, KAGURA_ENCRYPTION_KEY=key, KAGURA_RECORD_PROCESS=process)
    await record_runs(secrets)
    assert recorder.flush()
    assert hasattr(recorder._writer, "process") is (process == "1")
    assert found_on_disk(store_url, *secrets.all(), "handle") == {"handle"}  # the WAL too
    observability.uninstall_default()  # the writer ends
    assert found_on_disk(store_url, *secrets.all(), "handle") == {"handle"}

    # In the columns: users' data encrypted, and nothing else.
    spans = rows(store_url)
    for span in spans:
        for column in SEALED_SPAN_COLUMNS:
            assert span[column] is None or is_encrypted(span[column]), (span["name"], column)
        for column in ("span_id", "name", "kind", "status", "step_key", "model", "error_type"):
            assert span[column] is None or not is_encrypted(span[column])
    failed = {s["name"]: s for s in spans if s["status"] == "failed"}
    assert failed["broken"]["error_type"] == "ValueError"
    assert failed["fake/echo"]["error_type"] == "ProviderError"
    assert all(s["total_tokens"] > 0 for s in spans if s["kind"] == "llm" and not s["error"])
    (retry_wait,) = rows(store_url, "kagura_events")
    assert retry_wait["name"] == "retry_wait" and is_encrypted(retry_wait["attributes"])

    # Readers decrypt with the key.
    store = EventStore(store_url)
    (run,) = store.get_executions("handle")
    assert run["inputs"] == {"note": secrets.argument}
    assert secrets.output in run["output"]
    (failed_run,) = store.get_executions("broken")
    assert failed_run["error"] == f"cannot use {secrets.error}"
    tree = store.get_execution(run["id"])
    assert tree is not None
    (call,) = tree["children"]
    assert call["inputs"] == {"text": secrets.argument}
    assert call["attributes"] == {"answered_by": "fake/echo"}
    (wait,) = call["events"]
    assert secrets.retry in wait["attributes"]["error"]
    assert [attempt["status"] for attempt in call["children"]] == ["failed", "completed"]
    assert secrets.retry in call["children"][0]["error"]

    code, out, err = cli(capsys, "monitor", "trace", run["id"], "--db", store_url)
    assert (code, err) == (0, "")
    assert secrets.retry in out  # the failed attempt's error and the retry wait's
    code, out, _ = cli(capsys, "monitor", "trace", failed_run["id"], "--db", store_url)
    assert code == 0 and secrets.error in out
    code, out, _ = cli(capsys, "monitor", "list", "--db", store_url)
    assert code == 0 and "ValueError: cannot use" in out and MARKER not in out

    # A missing or a wrong key: a clear error, from the store and from the command line.
    for setting in (None, generate_key()):
        if setting is None:
            monkeypatch.delenv(ENV)
        else:
            monkeypatch.setenv(ENV, setting)
        for read in (
            lambda: store.get_executions("handle"),
            lambda: store.get_execution(run["id"]),
            lambda: store.get_executions(kind="llm"),
        ):
            with pytest.raises(EncryptionKeyError) as caught:
                read()
            message = str(caught.value)
            assert message.startswith("cannot read recorded content in the event store")
            assert ENV in message
            assert not any(secret in message for secret in secrets.all())
        for argv in (["trace", run["id"]], ["list"], ["live", "--iterations", "1"]):
            code, out, err = cli(capsys, "monitor", *argv, "--db", store_url)
            assert code == 1
            assert err.startswith("kagura: error: cannot read recorded content") and ENV in err
            assert err.count("\n") == 1
            assert not any(secret in out + err for secret in secrets.all())
            assert MARKER not in out + err
        # What needs no key still works.
        stats = store.stats()
        assert stats["executions"] == 2 and stats["by_status"] == {"completed": 2}
        assert stats["workflow_runs"] == 2
        assert {row["agent"] for row in store.cost()} == {"echo"}
        code, out, _ = cli(capsys, "monitor", "stats", "--db", store_url)
        assert code == 0 and "echo" in out


async def test_rotation_new_writes_with_the_new_key_old_ones_readable(
    record_to: Callable[..., Recorder], store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = generate_key(), generate_key()
    first, second = Secrets.new(), Secrets.new()
    record_to(store_url, KAGURA_ENCRYPTION_KEY=old)
    await record_runs(first)
    observability.uninstall_default()
    record_to(store_url, KAGURA_ENCRYPTION_KEY=f"{new},{old}")  # rotated: the new key first
    await record_runs(second)
    observability.uninstall_default()
    assert not found_on_disk(store_url, *first.all(), *second.all())

    before, after = span_ids(store_url, "handle")
    store = EventStore(store_url)

    def argument(run_id: str) -> str:
        execution = store.get_execution(run_id)
        assert execution is not None
        value = execution["inputs"]["note"]
        assert isinstance(value, str)
        return value

    assert (argument(before), argument(after)) == (first.argument, second.argument)
    assert len(store.get_executions()) == 8  # two workflow runs and their agent calls, twice
    # Written after the rotation: with the new key only. Before: with the old one.
    monkeypatch.setenv(ENV, new)
    assert argument(after) == second.argument
    with pytest.raises(EncryptionKeyError):
        argument(before)
    monkeypatch.setenv(ENV, old)
    assert argument(before) == first.argument
    with pytest.raises(EncryptionKeyError):
        argument(after)


# -- staging --------------------------------------------------------------------------------------


@pytest.fixture
def keyed_writer(store_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[StoreWriter]:
    monkeypatch.setenv(ENV, generate_key())
    opened = StoreWriter(normalise_url(store_url), "full")
    yield opened
    opened.dispose()


def test_with_a_key_a_batch_is_written_encrypted(keyed_writer: StoreWriter, store_url: str) -> None:
    take(keyed_writer, *batch_of("a", "b"))
    stored = raw_spans(store_url)
    assert {span["span_id"] for span in stored} == {"a", "b"}
    assert all(is_encrypted(span["inputs"]) and is_encrypted(span["output"]) for span in stored)
    assert decrypt(stored[0]["inputs"]) == '{"text":"doc"}'
    (event,) = rows(store_url, "kagura_events")
    assert decrypt(event["attributes"]) == '{"seconds": 0.5}'


def test_a_key_is_redacted_before_it_is_encrypted(
    keyed_writer: StoreWriter, store_url: str
) -> None:
    take(keyed_writer, *batch_of("a", error=f"HTTP 401: {KEY_SHAPED}"))
    (stored,) = raw_spans(store_url)
    assert decrypt(stored["error"]) == "HTTP 401: [REDACTED]"


async def test_a_burst_through_the_writer_process_leaves_no_plaintext(
    record_to: Callable[..., Recorder], store_url: str, secrets: Secrets
) -> None:
    # 3,000 rows handed over in batches of 1,000, each written at once, encrypted.
    recorder = record_to(store_url, KAGURA_ENCRYPTION_KEY=generate_key())
    with override_model(FakeModel()):
        await asyncio.gather(*(echo(f"{secrets.argument} {i}") for i in range(1500)))
    assert recorder.flush()
    assert recorder.written_spans == 3000
    assert not found_on_disk(store_url, secrets.argument)
    observability.uninstall_default()
    assert not found_on_disk(store_url, secrets.argument)
    calls = EventStore(store_url).get_executions("echo", limit=None)
    assert {c["inputs"]["text"] for c in calls} == {f"{secrets.argument} {i}" for i in range(1500)}


# -- settings -------------------------------------------------------------------------------------


async def test_hashes_are_encrypted_too(
    record_to: Callable[..., Recorder], store_url: str, secrets: Secrets
) -> None:
    recorder = record_to(
        store_url, KAGURA_ENCRYPTION_KEY=generate_key(), KAGURA_RECORD_CONTENT="hash"
    )
    await record_runs(secrets)
    assert recorder.flush()
    spans = rows(store_url)
    assert all(is_encrypted(s["inputs"]) for s in spans)
    assert all(is_encrypted(s["output"]) for s in spans if s["status"] == "completed")
    (run,) = EventStore(store_url).get_executions("handle")
    assert set(run["inputs"]) == set(run["output"]) == {"sha256"}
    (failed,) = EventStore(store_url).get_executions("broken")
    assert failed["error"] == f"cannot use {secrets.error}"  # errors are kept whole, encrypted


@pytest.mark.parametrize("process", ["1", "0"], ids=["writer-process", "writer-thread"])
async def test_a_malformed_key_turns_recording_off_rather_than_write_plaintext(
    record_to: Callable[..., Recorder],
    store_url: str,
    secrets: Secrets,
    process: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = record_to(
        store_url, KAGURA_ENCRYPTION_KEY="not-a-key", KAGURA_RECORD_PROCESS=process
    )
    await record_runs(secrets)  # the workflows run as ever
    assert recorder.flush() is False
    assert recorder.broken
    assert f"{ENV} is malformed" in caplog.text
    assert "not-a-key" not in caplog.text
    if not is_postgres(store_url):
        assert not await asyncio.to_thread(Path(store_url).exists)  # not even opened
    else:
        assert not found_on_disk(store_url, *secrets.all())


def _sealed_values(url: str) -> list[Any]:
    values = [s[c] for s in rows(url) for c in SEALED_SPAN_COLUMNS if s[c] is not None]
    return values + [e["attributes"] for e in rows(url, "kagura_events")]


async def test_other_producers_records_are_encrypted(
    record_to: Callable[..., Recorder], store_url: str, secrets: Secrets
) -> None:
    # Records given to Recorder.handle (another producer's spans) take the same path.
    from kagura._events import SpanEvent, SpanFinished, SpanStarted

    recorder = record_to(store_url, KAGURA_ENCRYPTION_KEY=generate_key())
    start = 1_000_000_000
    arguments = {"arguments": {"query": secrets.argument}}
    recorder.handle(SpanStarted("s1", None, "s1", "tool", "lookup", "lookup", start, arguments))
    recorder.handle(SpanEvent("s1", "s1", "note", start + 1, {"said": secrets.retry}))
    recorder.handle(
        SpanFinished(
            "s1",
            None,
            "s1",
            "tool",
            "lookup",
            "lookup",
            start,
            start + 2,
            "failed",
            error=f"not found: {secrets.error}",
            error_type="LookupError",
            attributes={"output": secrets.output, "extra": f"also {secrets.output}"},
        )
    )
    assert recorder.flush()
    values = _sealed_values(store_url)
    assert values and all(is_encrypted(value) for value in values)
    assert not found_on_disk(store_url, *secrets.all())
    tree = EventStore(store_url).get_execution("s1")
    assert tree is not None
    assert tree["inputs"] == {"query": secrets.argument}
    assert (tree["error"], tree["output"]) == (f"not found: {secrets.error}", secrets.output)
    assert tree["attributes"] == {"extra": f"also {secrets.output}"}
    assert tree["events"][0]["attributes"] == {"said": secrets.retry}
    assert json.dumps(tree, default=str).count(MARKER) == 0
