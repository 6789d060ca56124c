"""``kagura monitor``: the commands run against a store filled by real agents on fake models."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console

import kagura.observability as observability
from kagura import ProviderError, _context, _instrument, agent, pricing, tool, workflow
from kagura.cli import CliError, main, parse_since
from kagura.observability import EventStore, _monitor
from kagura.providers import ToolCall
from kagura.resilience import CircuitBreaker, Retry, reset_breakers, set_testing
from kagura.resilience._config import is_testing
from kagura.testing import FakeModel, Reply

PRICED_PROVIDER = "kagura-cli-test"
UNIQUE_ID = "zz-cli-test-agent-0001"  # no recorded id is hex-free like this one


class PricedModel(FakeModel):
    """A fake with a registered price, so costs are real numbers."""

    provider = PRICED_PROVIDER


class UnpricedModel(FakeModel):
    """A fake nobody has priced: its cost is unknown."""

    provider = "kagura-cli-mystery"


@dataclass(frozen=True)
class Recorded:
    path: Path
    workflow_id: str
    failed_id: str
    prefix_agent_id: str


@tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


async def _record_runs() -> None:
    @agent(model=FakeModel(name="echo"))
    async def summarise(text: str) -> str:
        """Summarise: {{ text }}"""

    @agent(model=FakeModel([ProviderError("overloaded", status_code=503), "fine"], name="flaky"))
    async def flaky(text: str) -> str:
        """Check: {{ text }}"""

    priced_model = PricedModel(
        [Reply(tool_calls=(ToolCall("call-1", "add", '{"a": 1, "b": 2}'),)), "three"],
        name="turbo",
    )

    @agent(model=priced_model, tools=[add])
    async def calculate(text: str) -> str:
        """Calculate: {{ text }}"""

    @agent(model=UnpricedModel(name="thing"))
    async def mystery(text: str) -> str:
        """Guess: {{ text }}"""

    @agent(
        model=FakeModel([ProviderError("busy", status_code=503)], name="primary"),
        retry=False,
        breaker=CircuitBreaker("cli-test-breaker", failure_threshold=1),
        fallback=[FakeModel(name="backup")],
    )
    async def guarded(text: str) -> str:
        """Answer: {{ text }}"""

    @agent(
        model=FakeModel([ProviderError("down", status_code=503)] * 3, name="dead"),
        retry=Retry(attempts=3),
    )
    async def doomed(text: str) -> str:
        """Try: {{ text }}"""

    @workflow
    async def pipeline(text: str) -> str:
        short = await summarise(text)
        checked = await flaky(short)
        await calculate(checked)
        await mystery(checked)
        return await guarded(checked)

    await summarise("a first text")
    await summarise("a second text")
    await pipeline("the text to work on")
    with pytest.raises(ProviderError):
        await doomed("anything")
    await _with_ids(summarise("an agent with a known id"), [UNIQUE_ID, "zz-cli-test-llm-0001"])


async def _with_ids(call: object, ids: list[str]) -> None:
    """Run ``call`` with its spans given these ids (so one id has a unique prefix)."""
    assert asyncio.iscoroutine(call)
    prefix = "zz-cli-test-"
    assert all(i.startswith(prefix) for i in ids)
    original = _context._ID_FORMAT, _context._counter
    # A span's id is next(_counter), made text as _ID_FORMAT % it by whoever reads it (here, or
    # the writer with the recording process's format, which leaves a text id as it is).
    _context._ID_FORMAT = "%s"
    _context._counter = iter(ids)  # type: ignore[assignment]
    try:
        await call
    finally:
        _context._ID_FORMAT, _context._counter = original


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    """A SQLite store with a workflow run, retries, a breaker, a fallback and a failed call."""
    path = tmp_path_factory.mktemp("monitor") / "events.db"
    was_testing = is_testing()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KAGURA_DB", str(path))
        patch.delenv("KAGURA_RECORD", raising=False)
        patch.setitem(
            pricing._user_prices,
            f"{PRICED_PROVIDER}/turbo",
            pricing.ModelPrice(input_per_mtok=2.0, output_per_mtok=8.0),
        )
        observability.uninstall_default()
        _instrument.reset_recording_check()
        observability.install_default()
        set_testing(True)
        reset_breakers()
        try:
            asyncio.run(_record_runs())
        finally:
            observability.uninstall_default()
            _instrument.reset_recording_check()
            set_testing(was_testing)
            reset_breakers()
    store = EventStore(path)
    (workflow_run,) = store.get_executions(kind="workflow")
    (failed,) = store.get_executions(status="failed")
    yield Recorded(path, workflow_run["id"], failed["id"], UNIQUE_ID)


@pytest.fixture(autouse=True)
def _wide_plain_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- list -------------------------------------------------------------------------------------


def test_list_shows_every_execution_with_status_and_metrics(
    recorded: Recorded, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "monitor", "list", "--db", str(recorded.path))
    assert code == 0
    for name in ("summarise", "flaky", "calculate", "mystery", "guarded", "doomed", "pipeline"):
        assert name in out
    assert "completed" in out
    assert "failed" in out
    assert recorded.workflow_id in out
    assert "ProviderError: HTTP 503: down" in out  # the failed call's error excerpt
    assert "unknown" in out  # the unpriced agent's cost: unknown, never $0
    assert f"{PRICED_PROVIDER}/turbo" in out
    assert "newest first" in out


def test_list_filters(recorded: Recorded, capsys: pytest.CaptureFixture[str]) -> None:
    db = ("--db", str(recorded.path))
    _, out, _ = run(capsys, "monitor", "list", *db, "--agent", "flaky")
    assert "flaky" in out
    assert "summarise" not in out

    _, out, _ = run(capsys, "monitor", "list", *db, "--status", "failed")
    assert "doomed" in out
    assert "summarise" not in out

    _, out, _ = run(capsys, "monitor", "list", *db, "--kind", "llm")
    assert "fake/flaky" in out
    assert "pipeline" not in out

    _, out, _ = run(capsys, "monitor", "list", *db, "--kind", "tool")
    assert "add" in out

    _, out, _ = run(capsys, "monitor", "list", *db, "--limit", "2")
    assert "2 shown" in out

    _, out, _ = run(capsys, "monitor", "list", *db, "--since", "1h")
    assert "pipeline" in out

    tomorrow = (datetime.now() + timedelta(days=1)).date().isoformat()
    code, out, _ = run(capsys, "monitor", "list", *db, "--since", tomorrow)
    assert code == 0
    assert "No executions found" in out


def test_list_reads_the_default_store(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAGURA_DB", str(recorded.path))
    code, out, _ = run(capsys, "monitor", "list")
    assert code == 0
    assert "pipeline" in out


def test_list_on_a_narrow_terminal_keeps_ids_whole(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "90")
    code, out, _ = run(capsys, "monitor", "list", "--db", str(recorded.path))
    assert code == 0
    assert recorded.workflow_id in out
    assert max(len(line) for line in out.splitlines()) <= 90


def _header_and_rows(out: str) -> tuple[str, list[str]]:
    """A printed table's header line and its row lines (up to the first blank line)."""
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.strip().startswith("─"))
    rows = []
    for line in lines[rule + 1 :]:
        if not line.strip():
            break
        rows.append(line)
    return lines[rule - 1], rows


@pytest.mark.parametrize("width", [64, 70, 79, 120])
@pytest.mark.parametrize("status", ["completed", None], ids=["no-errors", "with-errors"])
def test_list_at_any_width_shows_whole_ids_and_whole_headers(
    recorded: Recorded,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    width: int,
    status: str | None,
) -> None:
    """With no error to show, an empty error column took room every other column was cut to
    (ids to a prefix `monitor trace` refused as ambiguous); and a narrow terminal forced the
    error's shortest excerpt in all the same. Columns are left out instead."""
    monkeypatch.setenv("COLUMNS", str(width))
    filters = ("--status", status) if status else ()
    code, out, _ = run(capsys, "monitor", "list", "--db", str(recorded.path), *filters)
    assert code == 0
    header, rows = _header_and_rows(out)
    assert "…" not in header
    assert header.split()[:1] == ["id"]
    ids = {e["id"] for e in EventStore(recorded.path).get_executions(limit=None)}
    assert rows
    assert all(row.split()[0] in ids for row in rows), out
    assert max(len(line) for line in out.splitlines()) <= width
    if status == "completed":
        assert "error" not in header.split()


# -- trace ------------------------------------------------------------------------------------


def test_trace_shows_attempts_and_retry_waits_under_the_agent(
    recorded: Recorded, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "monitor", "trace", recorded.workflow_id, "--db", str(recorded.path))
    assert code == 0
    lines = out.splitlines()
    root = next(i for i, line in enumerate(lines) if line.startswith("workflow pipeline"))
    assert "completed" in lines[root]
    flaky = next(i for i, line in enumerate(lines) if "agent flaky" in line)
    attempt_1 = next(i for i in range(flaky, len(lines)) if "llm attempt 1 fake/flaky" in lines[i])
    wait = next(i for i in range(flaky, len(lines)) if "retry wait" in lines[i])
    attempt_2 = next(i for i in range(flaky, len(lines)) if "llm attempt 2 fake/flaky" in lines[i])
    assert root < flaky < attempt_1 < wait < attempt_2  # the wait sits between the attempts
    assert "failed" in lines[attempt_1]
    assert "HTTP 503: overloaded" in lines[attempt_1 + 1]
    assert "after attempt 1" in lines[wait]
    assert "completed" in lines[attempt_2]
    # Nested under the agent: deeper indentation than the agent line.
    indent = len(lines[flaky]) - len(lines[flaky].lstrip("│├└─ "))
    assert len(lines[wait]) - len(lines[wait].lstrip("│├└─ ")) > indent
    # Tokens, cost and timings per node; the tool call; breaker and fallback events.
    assert "tok" in out
    assert "$0" in out
    assert "ms" in out
    assert "tool add" in out
    assert "circuit breaker cli-test-breaker: closed → open" in out
    assert "fallback: fake/primary failed, trying fake/backup" in out
    assert "unknown" in out  # the unpriced agent


def test_trace_of_a_failed_call_shows_every_attempt_and_the_error(
    recorded: Recorded, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "monitor", "trace", recorded.failed_id, "--db", str(recorded.path))
    assert code == 0
    assert "agent doomed" in out
    assert out.count("llm attempt") == 3
    assert out.count("retry wait") == 2
    assert "ProviderError: HTTP 503: down" in out


def test_trace_accepts_a_unique_prefix(
    recorded: Recorded, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "monitor", "trace", "zz-cli-test-a", "--db", str(recorded.path))
    assert code == 0
    assert recorded.prefix_agent_id in out
    assert "agent summarise" in out


def test_trace_of_an_unknown_or_ambiguous_id_exits_1(
    recorded: Recorded, capsys: pytest.CaptureFixture[str]
) -> None:
    db = ("--db", str(recorded.path))
    code, out, err = run(capsys, "monitor", "trace", "no-such-id", *db)
    assert code == 1
    assert "no execution with id 'no-such-id'" in err
    assert out == ""

    shared = recorded.workflow_id[:12]  # every id recorded by one process starts the same
    code, _, err = run(capsys, "monitor", "trace", shared, *db)
    assert code == 1
    assert "matches several executions" in err


# -- cost -------------------------------------------------------------------------------------


def test_cost_by_model_has_a_row_and_a_bar_per_model(
    recorded: Recorded, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "monitor", "cost", "--by", "model", "--db", str(recorded.path))
    assert code == 0
    for model in ("fake/echo", "fake/flaky", "fake/dead", f"{PRICED_PROVIDER}/turbo"):
        assert model in out
    assert "kagura-cli-mystery/thing" in out
    assert "unknown" in out  # the unpriced model, and therefore the total
    # The chart: some cost is known and non-zero, and the unpriced model's is not.
    assert "Cost (USD; some calls' cost is unknown) by model" in out
    bar_line = next(line for line in out.splitlines() if "█" in line)
    assert f"{PRICED_PROVIDER}/turbo" in bar_line  # the only priced model has the longest bar


def test_cost_by_agent_and_by_day(recorded: Recorded, capsys: pytest.CaptureFixture[str]) -> None:
    db = ("--db", str(recorded.path))
    code, out, _ = run(capsys, "monitor", "cost", *db)
    assert code == 0
    assert "Cost by agent" in out
    assert "calculate" in out

    code, out, _ = run(capsys, "monitor", "cost", "--by", "day", "--since", "2d", *db)
    assert code == 0
    today = datetime.now(UTC).date().isoformat()
    day_lines = [line for line in out.splitlines() if today in line]
    assert any("█" in line for line in day_lines)


def test_cost_chart_falls_back_to_tokens_when_nothing_is_priced() -> None:
    rows = [
        {"model": "local/a", "calls": 2, "total_tokens": 100, "cost_usd": 0.0},
        {"model": "local/b", "calls": 1, "total_tokens": 25, "cost_usd": None},
    ]
    text = _render(_monitor.cost_chart(rows, "model", width=20))
    assert "Tokens" in text
    lines = text.splitlines()
    a = next(line for line in lines if "local/a" in line)
    b = next(line for line in lines if "local/b" in line)
    assert a.count("█") == 20
    assert 4 <= b.count("█") <= 5
    assert "100" in a


def test_cost_chart_title_says_some_costs_are_unknown_not_that_none_is_known() -> None:
    """Three priced calls and one of unknown price make their group's cost unknown (a floor,
    not 0): the title said that no call had a known, non-zero cost."""

    def rows(*costs: float | None) -> list[dict[str, object]]:
        return [
            {"model": f"acme/m{i}", "calls": 4, "total_tokens": 40, "cost_usd": cost}
            for i, cost in enumerate(costs)
        ]

    for costs, title in (
        ((None,), "Tokens (some calls' cost is unknown) by model"),
        ((None, 0.0), "Tokens (some calls' cost is unknown) by model"),
        ((None, 0.5), "Cost (USD; some calls' cost is unknown) by model"),
        ((0.0, 0.5), "Cost (USD) by model"),
        ((0.0, 0.0), "Tokens (no call has a non-zero cost) by model"),
    ):
        text = _render(_monitor.cost_chart(rows(*costs), "model", width=20))
        assert " ".join(text.split()).startswith(title + " acme/m0 "), costs


def test_cost_chart_fills_missing_days() -> None:
    rows = [
        {"day": "2025-01-01", "calls": 1, "total_tokens": 5, "cost_usd": 0.5},
        {"day": "2025-01-03", "calls": 1, "total_tokens": 5, "cost_usd": 1.0},
    ]
    filled = _monitor.fill_days(rows)
    assert [r["day"] for r in filled] == ["2025-01-01", "2025-01-02", "2025-01-03"]
    text = _render(_monitor.cost_chart(filled, "day", width=10))
    assert "2025-01-02" in text
    assert "$1.00" in text


# -- stats ------------------------------------------------------------------------------------


def test_stats_shows_failure_rate_latency_and_top_groups(
    recorded: Recorded, capsys: pytest.CaptureFixture[str]
) -> None:
    stats = EventStore(recorded.path).stats()
    code, out, _ = run(capsys, "monitor", "stats", "--db", str(recorded.path))
    assert code == 0
    assert "failure rate" in out
    assert f"{stats['failure_rate'] * 100:.1f}%" in out
    assert stats["failure_rate"] > 0
    for label in ("p50", "p95", "p99", "Top agents", "Top models", "completed", "failed"):
        assert label in out
    assert f"{stats['tokens']['total']:,}" in out
    # Root runs only (a workflow called from another is a part of its run): the label says so.
    assert re.search(r"workflow runs \(top level\) +1\b", out)


def test_stats_for_one_agent(recorded: Recorded, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "monitor", "stats", "--agent", "doomed", "--db", str(recorded.path))
    assert code == 0
    assert "agent doomed" in out
    assert "100.0%" in out
    # Its models only: the one it called, not the ones other agents called.
    assert "Top models" in out
    assert "fake/dead" in out
    assert "fake/flaky" not in out


# -- live -------------------------------------------------------------------------------------


def test_live_runs_one_iteration(recorded: Recorded, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "monitor",
        "live",
        "--db",
        str(recorded.path),
        "--iterations",
        "1",
        "--interval",
        "0.01",
        "--limit",
        "5",
    )
    assert code == 0
    assert "Latest executions" in out
    assert "agent calls" in out
    assert "failure rate" in out
    latency = next(line for line in out.splitlines() if line.startswith("latency"))
    assert any(c in latency for c in "▁▂▃▄▅▆▇█")


def test_live_refreshes_then_stops(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import kagura.cli

    sleeps: list[float] = []
    monkeypatch.setattr(kagura.cli, "_sleep", sleeps.append)
    code, out, _ = run(
        capsys,
        "monitor",
        "live",
        "--db",
        str(recorded.path),
        "--iterations",
        "2",
        "--interval",
        "0.01",
    )
    assert code == 0
    assert sleeps == [0.01]
    assert "summarise" in out


def test_live_asks_whether_the_store_is_there_until_it_is(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each question makes a connection of its own (to a PostgreSQL server, every frame)."""
    import kagura._storage
    import kagura.cli

    asked: list[str] = []
    holds_no_store = kagura._storage.holds_no_store

    def counted(url: str) -> bool:
        asked.append(url)
        return holds_no_store(url)

    monkeypatch.setattr(kagura._storage, "holds_no_store", counted)
    monkeypatch.setattr(kagura.cli, "_sleep", lambda _: None)
    monkeypatch.setattr(kagura.cli, "_live_stores", set())
    code, out, _ = run(capsys, "monitor", "live", "--db", str(recorded.path), "--iterations", "3")
    assert code == 0 and "summarise" in out
    assert len(asked) == 1


def test_live_exits_cleanly_on_ctrl_c(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import kagura.cli

    def interrupt(_seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(kagura.cli, "_sleep", interrupt)
    code, out, _ = run(capsys, "monitor", "live", "--db", str(recorded.path))
    assert code == 0
    assert "Latest executions" in out


# -- user errors, argparse errors, help ---------------------------------------------------------


@pytest.mark.parametrize("command", ["list", "stats", "cost", "live"])
def test_bad_since_exits_1(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    code, out, err = run(
        capsys, "monitor", command, "--since", "yesterday-ish", "--db", str(recorded.path)
    )
    assert code == 1
    assert "--since" in err
    assert "yesterday-ish" in err
    assert out == ""


def test_a_missing_store_file_is_an_error_and_is_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere" / "events.db"
    code, _, err = run(capsys, "monitor", "list", "--db", str(missing))
    assert code == 1
    assert "no event store" in err
    assert not missing.parent.exists()


def test_nothing_recorded_yet_in_the_default_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAGURA_DB", str(tmp_path / "events.db"))
    code, _, err = run(capsys, "monitor", "list")
    assert code == 0
    assert "Nothing recorded yet" in err
    code, _, err = run(capsys, "monitor", "trace", "abc")
    assert code == 1


def test_a_database_password_is_never_printed(capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql://kagura:hunter2-secret@127.0.0.1:1/kagura"
    code, out, err = run(capsys, "monitor", "list", "--db", url)
    assert code == 1
    assert "hunter2" not in out + err
    assert (
        "kagura: error: event store postgresql://kagura:***@127.0.0.1:1/kagura: cannot open: "
        in err
    )
    assert "***" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["monitor"],
        ["monitor", "bogus"],
        ["monitor", "list", "--limit", "0"],
        ["monitor", "list", "--status", "exploded"],
        ["monitor", "cost", "--by", "week"],
        ["monitor", "live", "--interval", "0"],
        ["monitor", "trace"],
    ],
)
def test_command_line_mistakes_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("interval", ["inf", "1e20", "nan", "86401", "-1"])
def test_an_interval_no_sleep_can_take_is_refused_with_the_range(
    interval: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--interval inf`` passed, then time.sleep raised OverflowError: a traceback."""
    assert main(["monitor", "live", "--interval", interval, "--iterations", "2"]) == 2
    err = capsys.readouterr().err
    assert (
        f"argument --interval: expected more than 0 seconds and at most 86400 (a day), "
        f"got {interval}"
    ) in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--help"], "monitor"),
        (["monitor", "--help"], "live"),
        (["monitor", "trace", "--help"], "unique prefix"),
        (["monitor", "list", "--help"], "--since"),
        (["monitor", "cost", "--help"], "bar chart"),
    ],
)
def test_help(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    assert expected in capsys.readouterr().out


# -- the console script -------------------------------------------------------------------------


def test_the_kagura_console_script(recorded: Recorded) -> None:
    script = Path(sys.executable).with_name("kagura")
    found = str(script) if script.exists() else shutil.which("kagura")
    if found is None:
        pytest.skip("the kagura script is not installed (pip install -e .)")
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run(
        [found, "monitor", "list", "--db", str(recorded.path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "pipeline" in result.stdout
    assert "failed" in result.stdout

    result = subprocess.run(
        [found, "monitor", "trace", "nope", "--db", str(recorded.path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "no execution" in result.stderr


def test_importing_the_cli_is_light() -> None:
    code = (
        "import sys, kagura.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'rich', 'sqlalchemy'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


# -- the pieces ---------------------------------------------------------------------------------


def test_parse_since() -> None:
    now = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    assert parse_since("30m", now=now) == now - timedelta(minutes=30)
    assert parse_since("1h", now=now) == now - timedelta(hours=1)
    assert parse_since("2d", now=now) == now - timedelta(days=2)
    assert parse_since("1w", now=now) == now - timedelta(weeks=1)
    assert parse_since("90s", now=now) == now - timedelta(seconds=90)
    assert parse_since("2025-05-01T08:00:00+00:00") == datetime(2025, 5, 1, 8, tzinfo=UTC)
    assert parse_since("2025-05-01").tzinfo is not None  # naive means local time
    for bad in ("yesterday", "5 parsecs", "-1h", ""):
        with pytest.raises(CliError):
            parse_since(bad)
    # Further back than a date can go: said, not an OverflowError's traceback.
    with pytest.raises(CliError, match="--older-than: '99999999d' goes back before the first"):
        parse_since("99999999d", now=now, option="--older-than")


def test_formatting() -> None:
    assert _monitor.format_cost(None) == "unknown"
    assert _monitor.format_cost(0.0) == "$0"
    assert _monitor.format_cost(0.000026) == "$0.000026"
    assert _monitor.format_cost(12.5) == "$12.50"
    assert _monitor.format_duration(None) == "—"
    assert _monitor.format_duration(0.5) == "0.50 ms"
    assert _monitor.format_duration(250) == "250 ms"
    assert _monitor.format_duration(1500) == "1.50 s"
    assert _monitor.format_duration(125_000) == "2m 05s"
    assert _monitor.excerpt("a\nlong   error message", 10) == "a long er…"


def test_sparkline_and_bar() -> None:
    assert _monitor.sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert _monitor.sparkline([5, 5, 5]) == "▄▄▄"
    assert _monitor.sparkline([None, 1, 9, 3], width=2) == "█▁"
    assert _monitor.sparkline([]) == ""
    assert _monitor.bar(10, 10, 8) == "█" * 8
    assert _monitor.bar(5, 10, 8) == "█" * 4
    assert _monitor.bar(1, 1000, 8) == "▏"  # small but not zero: still visible
    assert _monitor.bar(0, 10, 8) == ""


def _render(renderable: object) -> str:
    console = Console(width=120, file=io.StringIO())
    console.print(renderable)
    file = console.file
    assert isinstance(file, io.StringIO)
    return file.getvalue()


def test_a_date_before_the_first_year_in_local_time_is_said_not_raised() -> None:
    with pytest.raises(CliError, match="--since: '0001-01-01' is too close to the first year"):
        parse_since("0001-01-01")
    assert parse_since("0001-01-01T00:00+00:00").year == 1


def test_a_limit_past_what_a_database_counts_is_refused(
    recorded: Recorded, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "monitor", "list", "--db", str(recorded.path), "--limit", str(2**63))
    assert code == 2
    assert "--limit: expected a number of at most 9,223,372,036,854,775,807" in err


@pytest.mark.parametrize(
    "command", [("monitor", "list"), ("monitor", "stats"), ("runs", "list"), ("runs", "show", "x")]
)
def test_another_program_s_database_is_refused_and_left_as_it_was(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: tuple[str, ...],
) -> None:
    app = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(app)) as db, db:
        db.execute("CREATE TABLE users (id INTEGER)")
    monkeypatch.setenv("KAGURA_DB", str(app))  # `kagura runs` points the process at --db
    code, _, err = run(capsys, *command, "--db", str(app))
    assert code == 1
    assert f"{app} is not a Kagura event store: it holds other tables (users)" in err
    with contextlib.closing(sqlite3.connect(app)) as db:
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["users"]


@pytest.mark.parametrize(
    "command",
    [("monitor", "list"), ("monitor", "stats"), ("runs", "list"), ("runs", "recover")],
)
def test_a_database_nothing_recorded_to_is_said_and_left_as_it_was(
    store_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: tuple[str, ...],
) -> None:
    """An empty file, or a PostgreSQL database (an application's, given by mistake): a command
    that only reads made Kagura's tables in it, and said that nothing was found."""
    from sqlalchemy import create_engine, inspect

    from kagura import _storage

    if not store_url.startswith("postgresql"):
        Path(store_url).touch()
    monkeypatch.setenv("KAGURA_DB", store_url)  # `kagura runs` points the process at --db
    code, _, err = run(capsys, *command, "--db", store_url)
    assert code == 1
    name = _storage.store_name(_storage.normalise_url(store_url))
    assert f"no Kagura event store in {name} (none of Kagura's tables are there)" in err
    if store_url.startswith("postgresql"):
        engine = create_engine(_storage.normalise_url(store_url))
        try:
            assert inspect(engine).get_table_names() == []
        finally:
            engine.dispose()
    else:
        assert Path(store_url).stat().st_size == 0


def test_cost_by_agent_totals_what_was_spent_not_its_rows() -> None:
    # An agent's row holds the agents it called: boss's 143 tokens include helper's 110.
    from rich.console import Console

    from kagura.observability import _monitor

    def row(key: str, name: str, calls: int, tokens: int, cost: float) -> dict[str, object]:
        return {
            key: name,
            "calls": calls,
            "failures": 0,
            "prompt_tokens": tokens - 10,
            "completion_tokens": 10,
            "total_tokens": tokens,
            "cost_usd": cost,
        }

    by_agent = [row("agent", "boss", 1, 143, 0.156), row("agent", "helper", 1, 110, 0.120)]
    by_model = [row("model", "acme/m", 3, 143, 0.156)]
    console = Console(record=True, width=200)
    console.print(_monitor.cost_table(by_agent, "agent", by_model))
    footer = [line for line in console.export_text().splitlines() if "total" in line][-1]
    assert footer.split()[1:] == ["2", "0", "133", "10", "143", _monitor.format_cost(0.156)]


# -- recorded text is shown, never obeyed -----------------------------------------------------

#: Write "echo pwned" to the clipboard (OSC 52), then clear the screen (CSI 2J).
OSC52 = "\x1b]52;c;ZWNobyBwd25lZA==\x1b\\"
CLEAR = "\x1b[2J"


def test_visible_writes_control_and_format_characters_as_escapes() -> None:
    from kagura._table import visible

    assert visible("plain name, ünïcode and spaces") == "plain name, ünïcode and spaces"
    assert visible(OSC52 + CLEAR) == r"\x1b]52;c;ZWNobyBwd25lZA==\x1b\\x1b[2J"
    assert visible("a\nb\tc\r\x00\x9b\u202eZ\u2028") == r"a\nb\tc\r\x00\x9b\u202eZ\u2028"
    # Invisible characters that are parts of the text shown: an emoji sequence, a Persian word.
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467 \u0645\u06cc\u200c\u062e\u0648"
    assert visible(family) == family
    assert visible("one\ntwo\tx\x1b", keep="\n\t") == "one\ntwo\tx\\x1b"
    assert _monitor.excerpt("bad" + CLEAR + "\nline 2", 40) == r"bad\x1b[2J line 2"


def test_escape_sequences_in_what_was_recorded_are_shown_not_obeyed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An error's text and a model's name hold escape sequences, and an agent's name (stored by
    a version that took any name) one and a newline: every command shows them as escapes, so a
    terminal neither obeys them nor splits a row."""
    path = tmp_path / "events.db"
    model = FakeModel([RuntimeError("bad" + OSC52 + CLEAR + "\nline 2")], name="m" + CLEAR)

    @agent(model=model, retry=False)
    async def answer(text: str) -> str:
        """Answer: {{ text }}"""

    async def call() -> None:
        with pytest.raises(RuntimeError):
            await answer("hi")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KAGURA_DB", str(path))
        patch.delenv("KAGURA_RECORD", raising=False)
        observability.uninstall_default()
        _instrument.reset_recording_check()
        observability.install_default()
        try:
            asyncio.run(call())
        finally:
            observability.uninstall_default()
            _instrument.reset_recording_check()
    evil = "answer" + OSC52 + "\nsplit"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE kagura_spans SET name = ? WHERE name = 'answer'", (evil,))
        db.execute("UPDATE kagura_rollups SET name = ? WHERE name = 'answer'", (evil,))
    (failed,) = EventStore(path).get_executions(status="failed")

    db_option = ("--db", str(path))
    for argv in (
        ("monitor", "list"),
        ("monitor", "list", "--kind", "llm"),
        ("monitor", "trace", failed["id"]),
        ("monitor", "stats"),
        ("monitor", "cost", "--by", "agent"),
        ("monitor", "cost", "--by", "model"),
    ):
        code, out, err = run(capsys, *argv, *db_option)
        assert code == 0, err
        assert "\x1b" not in out + err, argv
        assert r"\x1b" in out, argv

    _, out, _ = run(capsys, "monitor", "list", *db_option)
    (row,) = [line for line in out.splitlines() if "answer" in line]
    assert r"answer\x1b]52;c;" in row and "failed" in row  # one row, on one line
    _, out, _ = run(capsys, "monitor", "trace", failed["id"], *db_option)
    assert r"RuntimeError: bad\x1b]52;c;ZWNobyBwd25lZA==\x1b\\x1b[2J line 2" in out
    assert r"m\x1b[2J" in out


def test_an_interrupted_execution_says_when_it_was_found_and_no_duration() -> None:
    """Its end is not known: the time it was closed is when its process's death was noticed."""
    when = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    execution = {
        "kind": "agent",
        "id": "a1",
        "name": "quick",
        "status": "interrupted",
        "started_at": when,
        "ended_at": when + timedelta(days=2),
        "duration_ms": None,
    }
    header = _monitor.trace_header(execution).plain
    assert ", found interrupted " in header and "ended" not in header
    assert "  ↯ interrupted  — · 0 tok" in _monitor.node_label(execution).plain
    assert ", ended " in _monitor.trace_header({**execution, "status": "failed"}).plain


@pytest.mark.parametrize("folders", [("[prod]",), ("a[", "x]")])
def test_a_store_path_that_looks_like_markup_is_shown_as_it_is(
    recorded: Recorded, tmp_path: Path, capsys: pytest.CaptureFixture[str], folders: tuple[str, ...]
) -> None:
    # rich took "[prod]" in a store's path for a style (dropped from the caption), and the
    # "[/x]" of ".../a[/x]/events.db" for a closing tag: the command failed with MarkupError.
    path = tmp_path.joinpath(*folders, "events.db")
    path.parent.mkdir(parents=True)
    with sqlite3.connect(recorded.path) as source, sqlite3.connect(path) as copy:
        source.backup(copy)
    for argv in (["monitor", "list"], ["monitor", "cost"], ["monitor", "list", "--agent", "none"]):
        code, out, err = run(capsys, *argv, "--db", str(path))
        assert code == 0, err
        assert str(path) in out.replace("\n", ""), argv
