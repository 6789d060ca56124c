"""Leases: a run whose process is gone is resumable at once on its own host (other hosts wait for
the lease); a process that lost its lease commits nothing more of the run; ``recover`` resumes
every interrupted run exactly once, however many processes recover at the same moment.

No test here depends on a heartbeat arriving on time: leases are made stale by writing the
store, and heartbeats are switched off where a test needs a lease to stay stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

import kagura
from kagura import _process, workflow
from kagura._storage import runs
from kagura.durable import Journal, journal_for, recover
from kagura.durable._journal import _heartbeat_interval
from kagura.errors import RunInProgressError, RunTakenOverError, UsageError
from kagura.testing.fault_server import FaultServer
from tests.observability.conftest import wait_for_lock_waits

from . import workflows
from .conftest import Child, await_until, sent


def set_run(journal: Journal, run_id: str, **values: Any) -> None:
    with journal.engine.begin() as connection:
        connection.execute(update(runs).where(runs.c.run_id == run_id).values(**values))


# -- a dead process's run is interrupted at once on its host --------------------------------------


async def test_a_killed_process_run_is_resumable_at_once(
    journal: Journal, server: FaultServer, spawn: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    child: Child = spawn("run", "relay", "relay-1", json.dumps(["tea", str(gate)]))
    await await_until(lambda: "relay/alpha#0" in journal.load_steps("relay-1"), "the first call")
    with pytest.raises(RunInProgressError, match=f"process {child.pid} on this host"):
        await workflows.relay.resume("relay-1")
    assert [r.run_id for r in journal.list_runs(status="running")] == ["relay-1"]

    os.kill(child.pid, signal.SIGKILL)
    await asyncio.to_thread(child.process.wait, 10)
    # No waiting: its process is gone, and this is its host. (The lease is the default 30 s.)
    record = journal.get_run("relay-1")
    assert record is not None and record.status == "interrupted"
    assert time.time() - (record.heartbeat_at or 0) < 30
    assert [r.run_id for r in journal.list_runs(status="interrupted")] == ["relay-1"]
    assert journal.list_runs(status="running") == []

    gate.touch()
    assert await workflows.relay.resume("relay-1") == "BETA report on ALPHA report on tea.."
    assert sent(server) == Counter(
        {"ALPHA report on tea.": 1, "BETA report on ALPHA report on tea..": 1}
    )
    record = journal.get_run("relay-1")
    assert record is not None
    assert (record.status, record.attempts, record.pid) == ("completed", 2, os.getpid())


def test_a_reused_pid_or_a_restarted_host_holds_no_run(journal: Journal) -> None:
    """The pid alone is not the process: a live process that got the dead one's pid, or any
    process after the machine restarted, does not hold the run."""
    journal.start("held-1", "wf", None, "{}", owner="me")
    record = journal.get_run("held-1")
    assert record is not None and record.status == "running"
    assert record.pid == os.getpid() and record.host == _process.HOST
    boot = (record.pid_start or "").partition(":")[0]
    if not boot:
        pytest.skip("no /proc here: a reused pid cannot be told apart")

    set_run(journal, "held-1", pid_start=f"{boot}:1")  # this pid, another process's start
    assert getattr(journal.get_run("held-1"), "status", None) == "interrupted"
    set_run(journal, "held-1", pid_start=f"another-boot:{record.pid_start}")
    assert getattr(journal.get_run("held-1"), "status", None) == "interrupted"

    # Another host's run: nothing can be known of its process from here; its lease decides.
    set_run(journal, "held-1", host="elsewhere.example", pid_start="x:1")
    assert getattr(journal.get_run("held-1"), "status", None) == "running"
    set_run(journal, "held-1", heartbeat_at=time.time() - 31)
    assert getattr(journal.get_run("held-1"), "status", None) == "interrupted"


def test_a_run_is_held_for_its_holders_lease_or_the_readers_if_longer(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process with a shorter ``KAGURA_LEASE_SECONDS`` than the run's holder took the run
    over while the holder still ran it. A run is free once both its holder's lease and the
    reader's own have run out."""
    monkeypatch.setenv("KAGURA_LEASE_SECONDS", "120")
    journal.start("long-1", "wf", None, "{}", owner="holder")
    monkeypatch.setenv("KAGURA_LEASE_SECONDS", "10")
    journal.start("short-1", "wf", None, "{}", owner="holder")

    def heard_from(seconds_ago: float) -> None:
        for run_id in ("long-1", "short-1"):  # another host's: the leases alone tell
            set_run(
                journal, run_id, host="elsewhere.example", heartbeat_at=time.time() - seconds_ago
            )

    monkeypatch.setenv("KAGURA_LEASE_SECONDS", "30")
    heard_from(20)  # past the short holder's lease, not past this reader's
    assert [r.run_id for r in journal.list_runs(status="running")] == ["short-1", "long-1"]
    assert not journal.claim("short-1", "heir")

    heard_from(40)
    long_run, short_run = journal.get_run("long-1"), journal.get_run("short-1")
    assert long_run is not None and short_run is not None
    assert (long_run.status, long_run.lease_seconds) == ("running", 120)
    assert (short_run.status, short_run.lease_seconds) == ("interrupted", 10)
    assert [r.run_id for r in journal.list_runs(status="interrupted")] == ["short-1"]
    assert not journal.claim("long-1", "thief")
    assert journal.claim("short-1", "heir")
    claimed = journal.get_run("short-1")
    assert claimed is not None and claimed.lease_seconds == 30  # the new holder's

    set_run(journal, "long-1", heartbeat_at=time.time() - 121)
    assert getattr(journal.get_run("long-1"), "status", None) == "interrupted"
    assert journal.claim("long-1", "heir")

    # A run journaled before leases were kept with runs: the reader's setting decides.
    journal.start("old-1", "wf", None, "{}", owner="holder")
    set_run(journal, "old-1", host="elsewhere.example", lease_seconds=None)
    set_run(journal, "old-1", heartbeat_at=time.time() - 20)
    assert not journal.claim("old-1", "heir")
    monkeypatch.setenv("KAGURA_LEASE_SECONDS", "15")
    assert getattr(journal.get_run("old-1"), "status", None) == "interrupted"
    assert journal.claim("old-1", "heir")


def test_a_lease_left_by_an_earlier_holder_frees_no_run_sooner(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version of Kagura that keeps no lease with its runs claims one and leaves the lease of
    the holder before it (5 s here) in the row: the reader's own lease still holds it."""
    monkeypatch.setenv("KAGURA_LEASE_SECONDS", "5")
    journal.start("mixed-1", "wf", None, "{}", owner="first")
    # The older version's claim: another owner, a fresh heartbeat, the lease column untouched.
    set_run(
        journal, "mixed-1", owner="older", host="elsewhere.example", heartbeat_at=time.time() - 8
    )
    monkeypatch.setenv("KAGURA_LEASE_SECONDS", "60")
    assert getattr(journal.get_run("mixed-1"), "status", None) == "running"
    assert not journal.claim("mixed-1", "thief")


def test_a_gone_process_run_is_claimed_whatever_its_heartbeat(journal: Journal) -> None:
    journal.start("held-2", "wf", None, "{}", owner="me")
    record = journal.get_run("held-2")
    assert record is not None and record.pid_start
    assert not journal.claim("held-2", "you")  # its process (this one) is alive
    set_run(journal, "held-2", pid_start=record.pid_start.partition(":")[0] + ":1")
    assert journal.claim("held-2", "you")
    assert not journal.claim("held-2", "them")  # once: the new owner holds it now
    assert not journal.heartbeat("held-2", "me") and journal.heartbeat("held-2", "you")


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
async def test_a_claim_that_loses_the_race_reports_the_run_as_the_winner_left_it(
    journal: Journal,
) -> None:
    """Two processes resume one run at once on PostgreSQL: the loser read the run before the
    winner committed its claim, and waited for the row. It is refused, and its refusal names the
    winner (not the process the run was interrupted in, as it read it)."""
    journal.start("tea", "wf", None, "{}", owner="first")
    journal.release("tea", "first")
    winner = journal.engine.connect()
    try:
        winner.exec_driver_sql(
            "UPDATE kagura_runs SET owner = 'winner', heartbeat_at = %s WHERE run_id = 'tea'",
            (time.time(),),
        )
        claim = journal.claim_soon("tea", "loser", "wf")
        await asyncio.to_thread(wait_for_lock_waits, journal.engine, 1)  # the loser, for "tea"
        winner.commit()
        record, steps = await claim
    finally:
        winner.close()
    assert steps is None
    assert record is not None
    assert (record.status, record.owner) == ("running", "winner")


# -- fencing: a process that lost its lease commits nothing more ---------------------------------


async def test_a_process_that_lost_its_lease_commits_nothing_more(
    journal: Journal,
    server: FaultServer,
    spawn: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """This process runs ``relay`` and stalls at its gate (as a loaded machine stalls) long
    enough for its lease to run out; another process takes the run over. When this one goes
    on, its next commit is refused: it ends with RunTakenOverError, and the other finishes."""
    monkeypatch.setattr(Journal, "_renew_held", lambda self: None)  # no heartbeats from here
    gate = tmp_path / "gate"
    here = asyncio.create_task(workflows.relay.run("tea", str(gate), run_id="fenced"))
    await await_until(lambda: "relay/alpha#0" in journal.load_steps("fenced"), "the first call")
    set_run(journal, "fenced", heartbeat_at=1.0)  # the lease ran out while this process stalled

    taker: Child = spawn("resume", "fenced")
    await await_until(
        lambda: getattr(journal.get_run("fenced"), "pid", None) == taker.pid, "the takeover"
    )
    gate.touch()  # both go on past the gate: only the new owner's commit is taken
    with pytest.raises(RunTakenOverError, match="'fenced' was taken over by another process"):
        await here
    outcome = await asyncio.to_thread(taker.finish)
    assert outcome == {
        "ok": True,
        "result": "BETA report on ALPHA report on tea..",
        "pid": taker.pid,
    }, taker.stderr
    record = journal.get_run("fenced")
    assert record is not None
    assert (record.status, record.attempts, record.pid) == ("completed", 2, taker.pid)
    # This process never went past its refused commit: the second call was sent once, by the
    # process that took the run over.
    assert sent(server) == Counter(
        {"ALPHA report on tea.": 1, "BETA report on ALPHA report on tea..": 1}
    )


async def test_no_step_is_committed_after_a_takeover(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run committing steps as fast as it can is taken over at an arbitrary moment. Every
    step its process was told is committed is among those the new owner loads right after its
    claim (none lands after it), and the old process ends with RunTakenOverError."""
    monkeypatch.setattr(Journal, "_renew_held", lambda self: None)
    acknowledged: list[int] = []

    @workflow(durable=True, name="busy")
    async def busy() -> int:
        for n in range(100_000):
            await kagura.step("tick", int, n)
            acknowledged.append(n)
        return -1

    loaded: dict[str, Any] = {}

    def take_over() -> None:
        record = journal.get_run("busy-1")
        assert record is not None and record.pid_start
        # Its process is alive, but looks gone (a pid start of another process): the claim
        # does not depend on any heartbeat, and lands whenever this thread gets to it.
        set_run(journal, "busy-1", pid_start=record.pid_start.partition(":")[0] + ":1")
        assert journal.claim("busy-1", "taker", allow_failed=False)
        loaded.update(journal.load_steps("busy-1"))

    run = asyncio.create_task(busy.run(run_id="busy-1"))
    await await_until(lambda: len(journal.load_steps("busy-1")) >= 50, "fifty steps")
    thread = threading.Thread(target=take_over)
    thread.start()
    with pytest.raises(RunTakenOverError):
        async with asyncio.timeout(60):
            await run
    await asyncio.to_thread(thread.join, 30)
    assert acknowledged, "no step was committed before the takeover"
    committed = {int(key.rsplit("#", 1)[1]) for key in loaded}
    assert set(acknowledged) <= committed
    record = journal.get_run("busy-1")
    assert record is not None and record.owner == "taker" and record.status == "running"


async def test_a_workflow_that_goes_on_past_a_refused_commit_begins_no_other_step(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A workflow that catches the RunTakenOverError of a refused commit (around a step it
    thinks optional, say) is stopped at its next step, before the step runs: the run is another
    process's, which runs that step itself."""
    monkeypatch.setattr(Journal, "_renew_held", lambda self: None)
    ran: list[str] = []

    def effect(name: str) -> str:
        ran.append(name)
        return name

    def take_over() -> None:
        record = journal.get_run("careless-1")
        assert record is not None and record.pid_start
        set_run(journal, "careless-1", pid_start=record.pid_start.partition(":")[0] + ":1")
        assert journal.claim("careless-1", "taker", allow_failed=False)

    @workflow(durable=True, name="careless")
    async def careless() -> str:
        await kagura.step("charge", effect, "charge")
        take_over()  # another process claims the run while this one goes on
        with contextlib.suppress(RunTakenOverError):
            await kagura.step("notify", effect, "notify")  # ran; its commit is refused
        await kagura.step("ship", effect, "ship")
        return "shipped"

    with pytest.raises(RunTakenOverError, match="'careless-1' was taken over"):
        await careless.run(run_id="careless-1")
    assert ran == ["charge", "notify"]
    assert list(journal.load_steps("careless-1")) == ["careless/charge#0"]


# -- recover: every interrupted run, once --------------------------------------------------------


async def test_processes_recovering_at_once_resume_each_run_exactly_once(
    journal: Journal, server: FaultServer, spawn: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    topics = [f"topic{n}" for n in range(6)]
    tasks = [asyncio.create_task(workflows.relay.run(t, str(gate), run_id=t)) for t in topics]
    await await_until(
        lambda: all("relay/alpha#0" in journal.load_steps(t) for t in topics), "the first calls"
    )
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert {r.run_id for r in journal.list_runs(status="interrupted")} == set(topics)
    gate.touch()

    recoverers = [spawn("recover") for _ in range(3)]
    outcomes = [await asyncio.to_thread(child.finish) for child in recoverers]
    assert all(o["ok"] for o in outcomes), [c.stderr for c in recoverers]
    completed = Counter(run for o in outcomes for run, what in o["result"] if what == "completed")
    assert completed == Counter({t: 1 for t in topics})
    assert {what for o in outcomes for _, what in o["result"]} <= {"completed", "taken"}
    for topic in topics:
        record = journal.get_run(topic)
        assert record is not None and (record.status, record.attempts) == ("completed", 2)
    # Each run's second call went to the provider once, from whichever process resumed it.
    assert sent(server) == Counter(
        {
            **{f"ALPHA report on {t}.": 1 for t in topics},
            **{f"BETA report on ALPHA report on {t}..": 1 for t in topics},
        }
    )


async def test_recover_takes_other_hosts_runs_only_when_asked(
    journal: Journal, model: Any, tmp_path: Path
) -> None:
    """Another host's run is interrupted once its lease has run out; ``recover()`` leaves it to
    that host's own recovery unless ``all_hosts``."""
    gate = tmp_path / "gate"
    gate.touch()
    arguments = json.dumps({"topic": "tea", "gate": str(gate)})
    journal.start("elsewhere-1", "gated", "tests.durable.workflows:gated", arguments, "them")
    set_run(journal, "elsewhere-1", host="elsewhere.example", heartbeat_at=time.time() - 31)
    assert [r.run_id for r in journal.list_runs(status="interrupted")] == ["elsewhere-1"]

    assert await recover() == []  # this host's runs only
    (recovered,) = await recover(all_hosts=True)
    assert (recovered.run_id, recovered.outcome) == ("elsewhere-1", "completed")
    assert recovered.result == "Review this: Draft a note about tea."
    record = journal.get_run("elsewhere-1")
    assert record is not None
    assert (record.status, record.attempts, record.host) == ("completed", 2, _process.HOST)


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf"])
async def test_a_lease_that_is_no_positive_number_fails_where_the_run_starts(
    db: str, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    # Read by the journal's thread, it stopped the thread, and the run waited for ever.
    monkeypatch.setenv("KAGURA_LEASE_SECONDS", value)
    with pytest.raises(UsageError, match="KAGURA_LEASE_SECONDS must be a positive number"):
        journal_for(db)
    async with asyncio.timeout(30):
        with pytest.raises(UsageError, match="KAGURA_LEASE_SECONDS"):
            await workflows.describes.run(1, run_id="leased")
    # Set wrong after a journal's thread started, it keeps the thread going.
    assert _heartbeat_interval() == 10.0
