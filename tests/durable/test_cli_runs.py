"""``kagura runs``: the commands run against durable runs made by real workflows
on the fake model, in a temporary SQLite store.

The workflows live in a module written into ``tmp_path`` (unique name per test), so that a
``kagura runs resume`` subprocess can import them from the target the run recorded. Their agents
call the fault server, whichever process runs them: the tests count there what reached the
provider. One test kills a process in the middle of a run (SIGKILL) and finishes the run from the
command line.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import update

from kagura import _storage as engine_registry
from kagura._storage import runs
from kagura.cli import main
from kagura.durable import Journal, RunRecord, _views, journal_for
from kagura.testing.fault_server import FaultServer

WAIT_TIMEOUT = 30.0

WORKFLOWS = '''
import asyncio
import os
import time

import kagura
from kagura import agent, workflow


@agent(model="openai/test-model", api_key="sk-test", retry=False)
async def outline(topic: str) -> str:
    """Outline a report on {{ topic }}."""


@agent(model="openai/test-model", api_key="sk-test", retry=False)
async def section(topic: str, title: str) -> str:
    """Write the {{ title }} section of a report on {{ topic }}."""


async def hold(path: str) -> str:
    """Wait (bounded) while ``path`` exists: keeps a run in flight until the test lets go."""
    deadline = time.monotonic() + 60
    while os.path.exists(path) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return "released"


def publish(topic: str, flag: str, ledger: str) -> str:
    """Fails while ``flag`` exists; otherwise a side effect: one line in ``ledger``."""
    if os.path.exists(flag):
        raise RuntimeError(f"publishing [{topic}] failed: the CMS is down")
    with open(ledger, "a", encoding="utf-8") as file:
        file.write(topic + "\\n")
    return f"published {topic}"


@workflow(durable=True)
async def report(topic: str, hold_file: str, flag: str, ledger: str) -> str:
    plan = await outline(topic)
    intro, body = await asyncio.gather(section(topic, "intro"), section(topic, "body"))
    await kagura.step("hold", hold, hold_file)
    done = await kagura.step("publish", publish, topic, flag, ledger)
    return f"{done}: {plan} | {intro} | {body}"


@workflow(durable=True)
async def other(topic: str) -> str:
    return await outline(topic)


@workflow(durable=True)
async def brief(topic: str, flag: str, ledger: str) -> str:
    plan = await outline(topic)
    return await kagura.step("publish", publish, plan, flag, ledger)
'''


@dataclass
class Env:
    """This test's store, workflow module and the files that steer its workflows."""

    db: Path
    module: ModuleType
    hold_file: Path
    flag: Path
    ledger: Path
    server: FaultServer

    @property
    def journal(self) -> Journal:
        return journal_for(str(self.db))

    def start(self, topic: str, run_id: str) -> str:
        """Run ``report`` durably in this process; its result, or the error's text."""
        try:
            result: str = asyncio.run(
                self.module.report.run(
                    topic, str(self.hold_file), str(self.flag), str(self.ledger), run_id=run_id
                )
            )
        except RuntimeError as error:
            return str(error)
        return result

    def ledger_lines(self) -> list[str]:
        return self.ledger.read_text().splitlines() if self.ledger.exists() else []

    def sent(self) -> Counter[str]:
        """What reached the provider from any process: each prompt and how often."""
        return Counter(str(r.messages[-1]["content"]) for r in self.server.chat_requests)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    db = tmp_path / "events.db"
    monkeypatch.setenv("KAGURA_DB", str(db))
    monkeypatch.delenv("KAGURA_LEASE_SECONDS", raising=False)  # the default, 30 s
    monkeypatch.setenv("KAGURA_RECORD", "0")
    monkeypatch.setenv("COLUMNS", "220")  # every column of the tables fits
    monkeypatch.delenv("KAGURA_DURABLE", raising=False)
    name = f"kagura_cli_runs_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(WORKFLOWS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    with FaultServer.run_in_thread() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        yield Env(db, module, tmp_path / "hold", tmp_path / "flag", tmp_path / "ledger.txt", server)
    sys.modules.pop(name, None)
    engine_registry.forget(engine_registry.normalise_url(str(db)))


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def wait_until(condition: Callable[[], Any], what: str, timeout: float = WAIT_TIMEOUT) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def cli_command() -> list[str]:
    """The installed ``kagura`` script (whose sys.path does not hold the current directory)."""
    script = Path(sys.executable).with_name("kagura")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kagura.cli"]


def kagura_in(env: Env, cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """The installed ``kagura`` script, run in ``cwd`` (where the workflow module is: the
    current directory is searched) on this test's store."""
    return subprocess.run(
        [*cli_command(), *argv, "--db", str(env.db)],
        env=child_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def start_report(env: Env, cwd: Path, topic: str, run_id: str) -> subprocess.Popen[bytes]:
    """A process that runs ``report`` durably (it holds at the "hold" step while the hold file
    exists)."""
    script = (
        f"import asyncio, {env.module.__name__} as m\n"
        f"asyncio.run(m.report.run({topic!r}, {str(env.hold_file)!r}, {str(env.flag)!r}, "
        f"{str(env.ledger)!r}, run_id={run_id!r}))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", script],
        env=child_env(env, PYTHONPATH=str(cwd)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def child_env(env: Env, **extra: str) -> dict[str, str]:
    full = {**os.environ, "KAGURA_DB": str(env.db)}
    full["KAGURA_RECORD"] = "0"
    full.update(extra)
    return full


@pytest.fixture
def made(env: Env) -> Env:
    """Three runs: ``done-1`` completed, ``broken-1`` failed at publish, ``elsewhere-1`` of
    another workflow."""
    assert env.start("solar", "done-1").startswith("published solar")
    env.flag.touch()
    assert "CMS is down" in env.start("wind", "broken-1")
    asyncio.run(env.module.other.run("tides", run_id="elsewhere-1"))
    return env


# -- list -------------------------------------------------------------------------------------


def test_list_shows_every_run_with_status_steps_attempts_owner_and_error(
    made: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "runs", "list")
    assert code == 0
    for run_id in ("done-1", "broken-1", "elsewhere-1"):
        assert run_id in out
    for column in ("run id", "workflow", "status", "steps", "attempts", "started", "pid@host"):
        assert column in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "✓ completed" in lines["done-1"] and " 5 " in lines["done-1"]  # 3 agents, 2 steps
    assert "✗ failed" in lines["broken-1"] and " 4 " in lines["broken-1"]  # publish failed
    assert "RuntimeError: publishing [wind] failed" in lines["broken-1"]
    assert "other" in lines["elsewhere-1"]
    assert f"{os.getpid()}@" in lines["done-1"]
    # Most recently updated first.
    assert out.index("elsewhere-1") < out.index("broken-1") < out.index("done-1")
    assert "3 shown" in out and "its holder's KAGURA_LEASE_SECONDS" in " ".join(out.split())


def test_list_filters_by_status_workflow_and_limit(
    made: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    _, failed, _ = run_cli(capsys, "runs", "list", "--status", "failed")
    assert "broken-1" in failed and "done-1" not in failed and "elsewhere-1" not in failed

    _, completed, _ = run_cli(capsys, "runs", "list", "--status", "completed")
    assert "done-1" in completed and "elsewhere-1" in completed and "broken-1" not in completed

    _, mine, _ = run_cli(capsys, "runs", "list", "--workflow", "report")
    assert "done-1" in mine and "broken-1" in mine and "elsewhere-1" not in mine

    _, one, _ = run_cli(capsys, "runs", "list", "--limit", "1")
    assert "elsewhere-1" in one and "done-1" not in one and "1 shown" in one

    code, none, _ = run_cli(capsys, "runs", "list", "--status", "interrupted")
    assert code == 0 and "No interrupted durable runs in /" in none

    code, _, err = run_cli(capsys, "runs", "list", "--status", "lost")
    assert code == 2 and "invalid choice" in err


def test_list_marks_a_run_whose_lease_expired_as_interrupted(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    # A process of another host claimed the run and stopped renewing its lease: it is gone.
    outcome, _ = env.journal.start("ghost-1", "report", "nowhere:report", "{}", owner="ghost")
    assert outcome == "started"
    with env.journal.engine.begin() as connection:
        connection.execute(
            update(runs).where(runs.c.run_id == "ghost-1").values(host="elsewhere.example")
        )
    _, running, _ = run_cli(capsys, "runs", "list", "--status", "running")
    assert "ghost-1" in running and "… running" in running

    with env.journal.engine.begin() as connection:  # its last heartbeat, 31 s ago
        connection.execute(
            update(runs).where(runs.c.run_id == "ghost-1").values(heartbeat_at=time.time() - 31)
        )
    code, out, _ = run_cli(capsys, "runs", "list", "--status", "interrupted")
    assert code == 0 and "ghost-1" in out and "↯ interrupted" in out
    _, running, _ = run_cli(capsys, "runs", "list", "--status", "running")
    assert "ghost-1" not in running
    _, shown, _ = run_cli(capsys, "runs", "show", "ghost-1")
    assert "lease of 30s expired" in shown and "kagura runs resume ghost-1" in shown


def test_list_with_nothing_recorded_yet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAGURA_DB", str(tmp_path / "absent.db"))
    code, out, err = run_cli(capsys, "runs", "list")
    assert code == 0 and out == "" and "No durable runs yet" in err
    assert not (tmp_path / "absent.db").exists()  # listing does not create a store


def test_db_option_selects_the_store_for_the_command(
    made: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAGURA_DB", str(tmp_path / "elsewhere.db"))  # restored after the test
    code, out, _ = run_cli(capsys, "runs", "list", "--db", str(made.db))
    assert code == 0 and "done-1" in out
    assert os.environ["KAGURA_DB"] == str(made.db)  # set for the process: a resume journals there

    code, _, err = run_cli(capsys, "runs", "show", "done-1", "--db", str(tmp_path / "no.db"))
    assert code == 1 and "no event store at" in err


# -- show -------------------------------------------------------------------------------------


def test_show_prints_the_run_and_its_steps_in_journal_order(
    made: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "runs", "show", "done-1")
    assert code == 0
    record = made.journal.get_run("done-1")
    assert record is not None and record.target == f"{made.module.__name__}:report"
    assert "✓ completed" in out and record.target in out
    assert '"topic":"solar"' in out and "5 steps journaled" in out
    assert f"pid {os.getpid()} on" in out
    assert "published solar" in out  # the result
    steps = made.journal.load_steps("done-1")
    keys = [
        "report/outline#0",
        "report/section#0",
        "report/section#1",
        "report/hold#0",
        "report/publish#0",
    ]
    assert set(steps) == set(keys)
    positions = [
        out.index(key) for key in ("report/outline#0", "report/hold#0", "report/publish#0")
    ]
    assert positions == sorted(positions)
    for step in steps.values():
        assert step.input_hash[:10] in out
    assert '"Outline a report on solar."' in out  # the output excerpt (JSON)
    assert "agent" in out and "step" in out and "section" in out
    assert "Resume it with" not in out


def test_show_a_failed_run_says_how_to_resume_it_and_accepts_a_prefix(
    made: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "runs", "show", "brok")
    assert code == 0
    assert "✗ failed" in out and "RuntimeError: publishing [wind] failed" in out
    assert "kagura runs resume broken-1" in out
    assert "report/publish#0" not in out  # it failed: nothing journaled for it


def test_show_unknown_or_ambiguous_ids_are_errors(
    made: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "runs", "show", "nope")
    assert code == 1 and out == "" and "no durable run with id 'nope'" in err
    asyncio.run(made.module.other.run("sea", run_id="done-2"))
    code, _, err = run_cli(capsys, "runs", "show", "done")
    assert code == 1 and "matches several runs: done-1, done-2" in err


# -- resume -----------------------------------------------------------------------------------


def test_resume_finishes_a_failed_run_without_repeating_journaled_steps(
    made: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    made.flag.unlink()
    sent_before = made.sent()
    code, out, err = run_cli(capsys, "runs", "resume", "broken-1")
    assert code == 0, err
    assert "Resuming run broken-1 (failed, 4 steps journaled, attempt 2)" in err
    assert "4 steps came from the journal (not run again), 1 ran now" in err
    assert made.sent() == sent_before  # the journaled agent calls were not sent again
    assert out.startswith("published wind: Outline a report on wind.")
    assert out.count("\n") == 1  # the result alone
    record = made.journal.get_run("broken-1")
    assert record is not None and record.status == "completed" and record.attempts == 2
    assert made.ledger_lines() == ["solar", "wind"]  # published once each

    code, out, err = run_cli(capsys, "runs", "resume", "broken-1")
    assert code == 0 and "already completed" in err
    assert out.startswith("published wind: Outline a report on wind.")
    assert out.count("\n") == 1
    assert made.ledger_lines() == ["solar", "wind"]


def test_one_step_is_said_in_the_singular(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.flag.touch()
    with pytest.raises(RuntimeError, match="CMS is down"):
        asyncio.run(env.module.brief.run("tides", str(env.flag), str(env.ledger), run_id="brief-1"))
    code, out, err = run_cli(capsys, "runs", "show", "brief-1")
    assert code == 0, err
    assert "1 step journaled" in out

    env.flag.unlink()
    code, out, err = run_cli(capsys, "runs", "resume", "brief-1")
    assert code == 0, err
    assert "Resuming run brief-1 (failed, 1 step journaled, attempt 2)" in err
    assert "1 step came from the journal (not run again), 1 ran now" in err


def test_resume_errors_exit_with_1(made: Env, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "runs", "resume", "missing-run")
    assert code == 1 and "no durable run with id 'missing-run'" in err

    # Still failing: the error is reported, and the run stays resumable.
    code, _, err = run_cli(capsys, "runs", "resume", "broken-1")
    assert code == 1
    assert "run 'broken-1' failed again: RuntimeError: publishing [wind] failed" in err
    record = made.journal.get_run("broken-1")
    assert record is not None and record.status == "failed" and record.attempts == 2

    made.journal.start("lost-1", "report", "no_such_module_xyz:report", "{}", owner="x")
    code, _, err = run_cli(capsys, "runs", "resume", "lost-1")
    assert code == 1 and "cannot import the workflow of run 'lost-1'" in err


#: Write "echo pwned" to the clipboard (OSC 52), then clear the screen (CSI 2J).
ESCAPES = "\x1b]52;c;ZWNobyBwd25lZA==\x1b\\\x1b[2J"
SHOWN = r"\x1b]52;c;ZWNobyBwd25lZA==\x1b\\x1b[2J"


def test_escape_sequences_in_runs_are_shown_not_obeyed(
    env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's arguments, error, step outputs and result hold escape sequences (the topic, which
    the model echoes), and a workflow's name (stored by a version that took any name) one and a
    newline: the commands show them as escapes. The result of a resume goes to a pipe as it is
    (it is data), to a terminal with its escapes shown."""
    assert env.start("solar", "done-1").startswith("published solar")
    env.flag.touch()
    assert "CMS is down" in env.start("wind" + ESCAPES, "evil-1")
    with env.journal.engine.begin() as connection:
        connection.execute(
            update(runs).where(runs.c.run_id == "done-1").values(workflow="rep" + ESCAPES + "\nx")
        )
    for argv in (("runs", "list"), ("runs", "show", "evil-1"), ("runs", "show", "done-1")):
        code, out, err = run_cli(capsys, *argv)
        assert code == 0, err
        assert "\x1b" not in out + err, argv
        assert r"\x1b]52;c;" in out, argv
    _, out, _ = run_cli(capsys, "runs", "list")
    (row,) = [line for line in out.splitlines() if "done-1" in line]
    assert r"rep\x1b]52;c;" in row  # one row, on one line
    _, out, _ = run_cli(capsys, "runs", "show", "evil-1")
    assert f"RuntimeError: publishing [wind{SHOWN}] failed" in out

    env.flag.unlink()
    code, out, err = run_cli(capsys, "runs", "resume", "evil-1")
    assert code == 0, err
    assert f"published wind{ESCAPES}: Outline a report on wind{ESCAPES}." in out  # a pipe
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, err = run_cli(capsys, "runs", "resume", "evil-1")
    assert code == 0 and "already completed" in err, err
    assert "\x1b" not in out + err
    assert f"published wind{SHOWN}: Outline a report on wind{SHOWN}." in out


def test_a_killed_run_is_listed_as_interrupted_and_resumed_from_the_command_line(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env.hold_file.touch()  # the child stops at the "hold" step, three steps journaled
    child = start_report(env, tmp_path, "hydro", "killed-1")
    try:

        def three_steps() -> RunRecord | None:
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            record = env.journal.get_run("killed-1")
            return record if record is not None and record.steps >= 3 else None

        wait_until(three_steps, "the child to journal three steps")
        _, out, _ = run_cli(capsys, "runs", "list")
        assert "killed-1" in out and "… running" in out and f"{child.pid}@" in out

        # While its process lives, the run is not taken over.
        code, _, err = run_cli(capsys, "runs", "resume", "killed-1")
        assert code == 1 and "is being executed by process" in err
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        if child.stderr is not None:
            child.stderr.close()

    # At once: its process is gone, and this is its host (the lease is the default 30 s).
    assert getattr(env.journal.get_run("killed-1"), "status", None) == "interrupted"
    _, out, _ = run_cli(capsys, "runs", "list", "--status", "interrupted")
    assert "killed-1" in out and "↯ interrupted" in out

    env.hold_file.unlink()
    resumed = kagura_in(env, tmp_path, "runs", "resume", "killed-1")
    assert resumed.returncode == 0, resumed.stderr
    assert "3 steps came from the journal (not run again), 2 ran now" in resumed.stderr
    assert resumed.stdout.startswith("published hydro: Outline a report on hydro.")
    assert resumed.stdout.count("\n") == 1
    assert env.ledger_lines() == ["hydro"]
    # Each agent call reached the provider once: the killed process's, journaled, were not
    # sent again by the process that resumed the run.
    assert env.sent() == Counter(
        {
            "Outline a report on hydro.": 1,
            "Write the intro section of a report on hydro.": 1,
            "Write the body section of a report on hydro.": 1,
        }
    )

    record = env.journal.get_run("killed-1")
    assert record is not None and record.status == "completed" and record.attempts == 2
    assert record.pid not in (os.getpid(), child.pid)  # the resuming process finished it
    assert "report/publish#0" in env.journal.load_steps("killed-1")
    _, out, _ = run_cli(capsys, "runs", "list", "--status", "completed")
    assert "killed-1" in out


def test_recover_resumes_every_interrupted_run_of_this_host(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env.hold_file.touch()
    children = [start_report(env, tmp_path, t, f"crashed-{t}") for t in ("wind", "tide")]
    try:
        wait_until(
            lambda: all(
                getattr(env.journal.get_run(f"crashed-{t}"), "steps", 0) >= 3
                for t in ("wind", "tide")
            ),
            "both children to reach the hold step",
        )
    finally:
        for child in children:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            if child.stderr is not None:
                child.stderr.close()
    env.hold_file.unlink()

    recovered = kagura_in(env, tmp_path, "runs", "recover")
    assert recovered.returncode == 0, recovered.stderr
    rows = {line.split()[0]: line for line in recovered.stdout.splitlines() if line.strip()}
    for topic in ("wind", "tide"):
        assert "completed" in rows[f"crashed-{topic}"]
        assert rows[f"crashed-{topic}"].split()[3:5] == ["3", "2"]  # from journal, ran now
        record = env.journal.get_run(f"crashed-{topic}")
        assert record is not None and (record.status, record.attempts) == ("completed", 2)
    assert "2 completed" in recovered.stdout
    assert sorted(env.ledger_lines()) == ["tide", "wind"]
    assert max(env.sent().values()) == 1  # nothing journaled was sent again

    code, out, _ = run_cli(capsys, "runs", "recover")
    assert code == 0 and "No interrupted durable runs of this host" in out


# -- prune ------------------------------------------------------------------------------------


def test_prune_deletes_the_runs_that_ended_before_then_with_their_steps(
    made: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    ten_days = 10 * 86400
    with made.journal.engine.begin() as connection:
        connection.execute(
            update(runs)
            .where(runs.c.run_id.in_(["done-1", "broken-1"]))
            .values(updated_at=runs.c.updated_at - ten_days)
        )

    code, out, err = run_cli(capsys, "runs", "prune", "--older-than", "7d")
    assert (code, err) == (0, "")
    assert "Deleted 2 durable runs that ended (completed or failed) before" in out
    assert "Running and interrupted runs are kept." in " ".join(out.split())
    assert [r.run_id for r in made.journal.list_runs()] == ["elsewhere-1"]
    assert made.journal.load_steps("done-1") == made.journal.load_steps("broken-1") == {}

    code, out, _ = run_cli(capsys, "runs", "prune", "--older-than", "2000-01-01")
    assert code == 0 and "Deleted 0 durable runs" in out


def test_prune_refuses_a_time_it_cannot_read_and_deletes_nothing(
    made: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    for when in ("last spring", "99999999d"):
        code, out, err = run_cli(capsys, "runs", "prune", "--older-than", when)
        assert (code, out) == (1, "")
        assert err.startswith("kagura: error: --older-than: ") and repr(when) in err
    code, _, err = run_cli(capsys, "runs", "prune")
    assert code == 2 and "the following arguments are required: --older-than" in err
    assert len(made.journal.list_runs()) == 3


def test_prune_refuses_a_time_later_than_now_and_takes_0s_for_every_ended_run(
    made: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """A date in the future (2099 typed for 2009) deleted every run that had ended, unasked."""
    tomorrow = (datetime.now() + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    for when in ("2099-01-01", tomorrow, "2099-01-01T00:00+00:00"):
        code, out, err = run_cli(capsys, "runs", "prune", "--older-than", when)
        assert (code, out) == (1, "")
        assert err.startswith(f"kagura: error: --older-than: {when!r} is later than now")
        assert "0s: every run that has ended so far" in err
    assert len(made.journal.list_runs()) == 3

    made.journal.start("live-1", "report", "x:report", "{}", owner="x")  # running: kept
    code, out, err = run_cli(capsys, "runs", "prune", "--older-than", "0s")
    assert (code, err) == (0, "")
    assert "Deleted 3 durable runs" in out
    assert [r.run_id for r in made.journal.list_runs()] == ["live-1"]


# -- the parser and the renderers -------------------------------------------------------------


def test_runs_without_a_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "runs")
    assert code == 2 and "list" in err and "show" in err and "resume" in err
    assert "recover" in err
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "kagura runs --help" in out


def test_runs_table_keeps_the_error_on_a_narrow_terminal() -> None:
    from rich.console import Console

    now = time.time()
    record = RunRecord(
        "run-with-a-long-identifier",
        "write_report",
        "app:write_report",
        "failed",
        "{}",
        None,
        "the CMS is [down]",
        "RuntimeError",
        "owner",
        4242,
        "worker-7.example.internal",
        now,
        now,
        now,
        3,
        6,
    )
    console = Console(width=80, record=True, color_system=None)
    console.print(_views.runs_table([record], width=80))
    text = console.export_text()
    assert "RuntimeError: the CMS is [down]" in text  # recorded text, never markup
    assert "pid@host" not in text and "updated" not in text  # dropped first
    assert "run-with-a-long-identifier" in text and "✗ failed" in text

    wide = Console(width=200, record=True, color_system=None)
    wide.print(_views.runs_table([record], width=200))
    assert "4242@worker-7.example.internal" in wide.export_text()


@pytest.mark.parametrize("width", [64, 70, 79, 120])
@pytest.mark.parametrize("error", [None, "the CMS is down"], ids=["no-errors", "with-errors"])
def test_runs_table_at_any_width_shows_whole_ids_and_whole_headers(
    width: int, error: str | None
) -> None:
    """An empty error column took room every other column was cut to, and a narrow terminal
    forced the error's shortest excerpt all the same: run ids were cut short. Columns are
    left out instead."""
    from rich.console import Console

    now = time.time()
    run_id = str(uuid.UUID(int=7))
    records = [
        RunRecord(run_id, "write_report", None, "completed", "{}", "done", None, None, "owner",
                  4242, "worker-7.example.internal", now, now, now, 1, 3),
        RunRecord(run_id, "write_report", None, "failed" if error else "completed", "{}", None,
                  error, "RuntimeError" if error else None, "owner", 4242,
                  "worker-7.example.internal", now, now, now, 1, 3),
    ]  # fmt: skip
    console = Console(width=width, record=True, color_system=None)
    console.print(_views.runs_table(records, width=width))
    lines = console.export_text().splitlines()
    rule = next(i for i, line in enumerate(lines) if line.strip().startswith("─"))
    header, rows = lines[rule - 1], lines[rule + 1 : rule + 3]
    assert "…" not in header
    assert [row.split()[0] for row in rows] == [run_id, run_id]
    assert max(len(line) for line in lines) <= width
    if error is None:
        assert "error" not in header.split()
    if error is not None and width >= 120:
        assert "RuntimeError: the CMS" in rows[1]  # room enough for an excerpt


def test_a_cancelled_run_says_so_rather_than_that_its_process_is_gone() -> None:
    from kagura.durable._journal import RunRecord
    from kagura.durable._views import lease_text

    now = time.time()
    released = RunRecord(
        "cancelled-1", "report", None, "interrupted", "{}", None, None, None, "owner", 41,
        "host-a", 0.0, now - 60, now - 5, 1,
    )  # fmt: skip
    assert lease_text(released, 30, now=now).plain == (
        "pid 41 on host-a (cancelled: its lease was given up)"
    )


def test_a_workflow_name_that_looks_like_markup_is_quoted_as_it_is(
    made: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    # rich read "[/x]" in the "No durable runs of workflow ..." line as a closing tag: the
    # command failed with a MarkupError traceback.
    code, out, err = run_cli(capsys, "runs", "list", "--workflow", "[/x]")
    assert code == 0, err
    assert "No durable runs of workflow '[/x]'" in out
