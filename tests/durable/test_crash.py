"""The durable-run promise, end to end: a process killed (SIGKILL) in the middle of a workflow is
resumed by another process, which finishes it with the same result as an uninterrupted run and
without sending any call that completed before the kill to the provider again.

The provider is the fault server on loopback, in this process; the workflow runs in real
subprocesses (``tests/durable/runner.py``) on the test's store, SQLite or PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kagura.durable import Journal
from kagura.testing import replay
from kagura.testing.fault_server import FaultServer, RecordedRequest
from tests.observability.conftest import rows

from . import workflows
from .conftest import Child, await_until, lines

DONE_BEFORE_KILL = {"crash_pipeline/charge#0", "crash_pipeline/alpha#0", "crash_pipeline/beta#0"}
ALL_STEPS = DONE_BEFORE_KILL | {"crash_pipeline/gamma#0", "crash_pipeline/combine#0"}


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer.run_in_thread(hang_seconds=30) as running:
        yield running


def prompt_of(request: RecordedRequest) -> str:
    """Which crash agent sent it: the first word of its prompt (ALPHA, BETA, ...)."""
    return str(request.messages[-1]["content"]).split()[0]


def test_fault_server_rules_pick_a_fault_by_prompt() -> None:
    with FaultServer.run_in_thread(["500"], rules=[("slow", "503"), ("low", "429")]) as server:

        def ask(prompt: str) -> int:
            body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
            return httpx.post(
                f"{server.base_url}/chat/completions", json=body, timeout=10
            ).status_code

        assert ask("a slow one") == 503  # the first rule that matches
        assert ask("below") == 429
        assert ask("slow again") == 503  # rules are not used up
        assert ask("other") == 500  # the script serves what no rule matches
        server.set_rules()
        assert ask("slow") == 200
        assert [r.fault for r in server.chat_requests] == ["503", "429", "503", "500", "ok"]


async def test_a_killed_run_resumes_without_repeating_completed_calls(
    journal: Journal,
    db: str,
    server: FaultServer,
    spawn: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {"KAGURA_LEASE_SECONDS": "1", "OPENAI_BASE_URL": server.base_url}
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    # The same workflow, uninterrupted: the result the resumed run must reach.
    clean = await workflows.crash_pipeline.run("tides", str(tmp_path / "clean.txt"), run_id="clean")
    assert clean["final"].startswith("COMBINE these: ALPHA report on tides.")
    clean_requests = len(server.chat_requests)
    assert clean_requests == 4

    # Run it in a subprocess while the server hangs on the SLOW agent's prompt.
    server.set_rules(("SLOW", "hang"))
    ledger = tmp_path / "ledger.txt"
    child: Child = spawn(
        "run", "crash_pipeline", "crashed", json.dumps(["tides", str(ledger)]), env=env
    )

    def hanging() -> list[RecordedRequest]:
        return [
            r
            for r in server.chat_requests[clean_requests:]
            if r.fault == "hang" and not r.client_gone
        ]

    def mid_flight() -> bool:
        done = set(journal.load_steps("crashed"))
        return done == DONE_BEFORE_KILL and server.in_flight == 1 and len(hanging()) == 1

    await await_until(mid_flight, "the two quick agents journaled and the slow one hanging")
    # The hanging call in flight long enough to be on record as running (see the recorder's
    # _RUNNING_AFTER_NS), and the two quick ones' ends recorded: a SIGKILL loses what the
    # recorder had not sent yet (spans that ended in its last quarter of a second).
    await await_until(
        lambda: (
            {(r["name"], r["status"]) for r in rows(db) if r["run_id"] == "crashed"}
            >= {
                ("crash_pipeline", "running"),
                ("gamma", "running"),
                ("alpha", "completed"),
                ("beta", "completed"),
            }
        ),
        "the run and the hanging call recorded as running, the others as completed",
    )
    journaled_before = journal.load_steps("crashed")
    sent_before_kill = len(server.chat_requests)
    assert child.process.poll() is None

    os.kill(child.pid, signal.SIGKILL)
    await asyncio.to_thread(child.process.wait, 10)
    assert child.process.returncode == -signal.SIGKILL
    await server.wait_disconnects(1)  # the hanging call died with the process

    # Nobody renews the lease any more: once it expires the run is listed as interrupted.
    await await_until(
        lambda: [r.run_id for r in journal.list_runs(status="interrupted")] == ["crashed"],
        "the killed run to be reported interrupted",
    )

    # A new process resumes it; the server answers normally now.
    server.set_rules()
    resumed = spawn("resume", "crashed", env=env)
    outcome = await asyncio.to_thread(resumed.finish)
    assert outcome == {"ok": True, "result": clean, "pid": resumed.pid}, resumed.stderr

    # Nothing journaled before the kill went to the provider again: only the calls that had not
    # completed (the hung one, and the one after it) were sent after the kill.
    after_kill = Counter(prompt_of(r) for r in server.chat_requests[sent_before_kill:])
    assert after_kill == Counter({"GAMMA": 1, "COMBINE": 1})
    journaled_agents = {s.name for s in journaled_before.values() if s.kind == "agent"}
    assert journaled_agents == {"alpha", "beta"}
    assert not {workflows.CRASH_PROMPTS[name] for name in journaled_agents} & set(after_kill)
    # Over the whole crashed run: every call once, but the one that hung.
    crashed_run = server.chat_requests[clean_requests:]
    assert Counter(prompt_of(r) for r in crashed_run) == Counter(
        {"ALPHA": 1, "BETA": 1, "GAMMA": 2, "COMBINE": 1}
    )
    assert [r.fault for r in crashed_run if prompt_of(r) == "GAMMA"] == ["hang", "ok"]
    assert lines(ledger) == ["charged tides"]  # the paid side effect happened once

    record = journal.get_run("crashed")
    assert record is not None
    assert (record.status, record.attempts, record.pid, record.steps) == (
        "completed",
        2,
        resumed.pid,
        5,
    )
    steps = journal.load_steps("crashed")
    assert set(steps) == ALL_STEPS
    assert all(steps[key] == journaled_before[key] for key in DONE_BEFORE_KILL)
    listed = {r.run_id: r for r in journal.list_runs(status="completed")}
    assert set(listed) == {"crashed", "clean"}
    assert listed["crashed"].steps == 5
    assert journal.list_runs(status="interrupted") == []

    # The dead attempt's spans that said running were closed as interrupted when the run was
    # claimed (read here without a reader's own sweep); the resumed attempt completed.
    spans = {(r["run_id"], r["name"]): r["status"] for r in rows(db) if "crashed" in r["run_id"]}
    assert "running" not in spans.values()
    assert spans[("crashed", "crash_pipeline")] == "interrupted"
    assert spans[("crashed", "gamma")] == "interrupted"
    assert spans[("crashed", "alpha")] == spans[("crashed", "beta")] == "completed"
    assert spans[("crashed~2", "crash_pipeline")] == "completed"

    # And the run replays from its journal alone: no request reaches the server.
    sent = len(server.chat_requests)
    assert await replay("crashed") == clean
    assert len(server.chat_requests) == sent


# -- kills at the worst moment: right after the workflow saw a result ---------------------------


def provider_env(server: FaultServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Agents call ``server``, nothing is recorded: set here, and returned for children."""
    env = {"OPENAI_BASE_URL": server.base_url, "KAGURA_RECORD": "0"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def stopping_after(env: dict[str, str], results: int) -> dict[str, str]:
    """``env`` for a child that stops itself once its workflows have seen ``results`` results
    (see ``workflows.seen``)."""
    return {**env, "KAGURA_TEST_STOP_AFTER": str(results)}


async def kill_when_stopped(child: Child) -> list[str]:
    """Wait until the child has stopped itself (SIGSTOP, in ``workflows.seen``), SIGKILL it
    there; the labels of the results it saw, in order."""
    _, status = await asyncio.to_thread(os.waitpid, child.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"the child ended instead of stopping: {child.stderr}"
    os.kill(child.pid, signal.SIGKILL)
    await asyncio.to_thread(child.process.wait, 10)
    return [
        line.split(" ", 1)[1]
        for line in child.out.read_text().splitlines()
        if line.startswith("seen ")
    ]


# 21 processes one after the other: on a loaded machine, more than the suite's 120 s per test.
@pytest.mark.timeout(900)
async def test_kills_right_after_each_result_is_seen_never_send_a_finished_step_again(
    journal: Journal,
    server: FaultServer,
    spawn: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """20 kills, one at each step of a run: every process is killed at the instant its workflow
    saw the result of one more step (an agent call to the server, a tool call or a step), and
    the next process resumes the run. Every step reached the provider (or ran its side effect)
    exactly once in all."""
    tallies = tmp_path / "tallies.txt"
    env = {
        "OPENAI_BASE_URL": server.base_url,
        "KAGURA_TEST_LEDGER": str(tallies),
        "KAGURA_RECORD": "0",  # recording is not what is tested here; it costs each child time
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ledger = tmp_path / "ledger.txt"
    steps = workflows.CHAIN_STEPS
    for k in range(steps):
        args = ("run", "chain", "chained", json.dumps(["tides", str(ledger)]))
        child = spawn(
            *(args if k == 0 else ("resume", "chained")),
            env={
                **env,
                "KAGURA_TEST_STOP_AT": str(k),
            },
        )
        seen = await kill_when_stopped(child)
        assert seen == [str(i) for i in range(k + 1)], child.stderr
    last = spawn("resume", "chained", env=env)
    outcome = await asyncio.to_thread(last.finish)
    assert outcome["ok"], last.stderr

    # Every agent call went to the server once, every tool and step ran once.
    links = Counter(str(r.messages[-1]["content"]) for r in server.chat_requests)
    assert links == Counter({f"LINK tides {i}": 1 for i in range(0, steps, 3)})
    assert lines(tallies) == [f"tally tides-{i}" for i in range(1, steps, 3)]
    assert lines(ledger) == [f"stamp tides {i}" for i in range(2, steps, 3)]
    record = journal.get_run("chained")
    assert record is not None
    assert (record.status, record.attempts) == ("completed", steps + 1)

    # The same as a run that was never killed.
    sent = len(server.chat_requests)
    clean = await workflows.chain.run("tides", str(tmp_path / "clean.txt"), run_id="clean")
    assert outcome["result"] == clean
    assert len(server.chat_requests) == sent + len(links)


@pytest.mark.timeout(300)
async def test_a_kill_in_the_middle_of_a_burst_sends_no_seen_call_again(
    journal: Journal,
    server: FaultServer,
    spawn: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """24 agent calls at once; the process is killed at the instant its workflow has seen 12 of
    their results. The resumed run sends none of those 12 again; a call whose answer had not
    reached the workflow may be sent a second time, never a third."""
    calls = 24
    env = provider_env(server, monkeypatch)
    child = spawn(
        "run", "burst", "burst-1", json.dumps(["reef", calls]), env=stopping_after(env, 12)
    )
    seen = await kill_when_stopped(child)
    assert len(seen) == 12
    before = Counter(str(r.messages[-1]["content"]) for r in server.chat_requests)

    resumed = spawn("resume", "burst-1", env=env)
    outcome = await asyncio.to_thread(resumed.finish)
    assert outcome == {
        "ok": True,
        "result": [f"LINK reef b{i}" for i in range(calls)],
        "pid": resumed.pid,
    }, resumed.stderr
    sent = Counter(str(r.messages[-1]["content"]) for r in server.chat_requests)
    assert set(sent) == {f"LINK reef b{i}" for i in range(calls)}
    for label in seen:
        assert sent[f"LINK {label}"] == 1, label  # seen: journaled, never sent again
    assert max(sent.values()) <= 2
    # What the resumed process sent is exactly what the killed one had not seen.
    again = sent - before
    assert not {f"LINK {label}" for label in seen} & set(again)


async def test_a_kill_in_the_middle_of_many_runs_is_recovered_sending_no_seen_call_again(
    journal: Journal,
    server: FaultServer,
    spawn: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """30 runs of 4 agent calls each, all at once; the process is killed at the instant its
    workflows have seen 60 of the 120 results. ``recover()`` in a new process finishes all 30
    runs (it claims, reads and loads them in shared transactions), sending none of those 60
    again; a call whose answer no workflow had seen may be sent a second time, never a third."""
    runs, calls = 30, 4
    env = provider_env(server, monkeypatch)
    child = spawn(
        "many",
        "burst",
        "fleet",
        str(runs),
        json.dumps(["reef", calls]),
        env=stopping_after(env, 60),
    )
    seen = await kill_when_stopped(child)
    assert len(seen) == 60
    ids = {f"fleet-{n}" for n in range(runs)}
    assert {r.run_id for r in journal.list_runs(status="interrupted", limit=None)} <= ids

    recovering = spawn("recover", env=env)
    outcome = await asyncio.to_thread(recovering.finish)
    assert outcome["ok"], recovering.stderr
    recovered = dict(outcome["result"])
    # A run whose every result had been seen may have finished before the kill: not interrupted.
    finished = {r.run_id for r in journal.list_runs(status="completed", limit=None)}
    assert finished == ids
    assert set(recovered) <= ids and set(recovered.values()) == {"completed"}
    assert len(recovered) >= runs - 60 // calls
    sent = Counter(str(r.messages[-1]["content"]) for r in server.chat_requests)
    assert set(sent) == {f"LINK reef{n} b{i}" for n in range(runs) for i in range(calls)}
    for label in seen:
        assert sent[f"LINK {label}"] == 1, label  # seen: journaled, never sent again
    assert max(sent.values()) <= 2
    for run_id in ids:
        record = journal.get_run(run_id)
        assert record is not None and record.steps == calls, record


async def test_parallel_branches_killed_between_their_calls_resume_sending_no_answered_call(
    journal: Journal,
    server: FaultServer,
    spawn: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Steps of parallel branches take their places among their parent's in the order they
    start. Killed with one branch's second call journaled and the other's in flight, the run
    resumes with the second calls started the other way round: the one journaled is answered
    from the journal, the other runs (it failed the run, as a renamed step, before)."""
    env = provider_env(server, monkeypatch)
    gate = tmp_path / "gate"
    server.set_rules(("BETA report on ALPHA report on slow", "hang"))
    child = spawn(
        "run", "crash_two_stages", "two-stages", json.dumps([["slow", "fast"], str(gate)]), env=env
    )
    fast = {
        "crash_two_stages/alpha#0",
        "crash_two_stages/alpha#1",
        "crash_two_stages/beta fast#0",
        "crash_two_stages/beta fast#0/beta#0",
    }
    await await_until(
        lambda: set(journal.load_steps("two-stages")) == fast,
        "both first calls and the fast branch's second journaled",
    )
    gate.touch()
    await await_until(
        lambda: [r.fault for r in server.chat_requests if not r.client_gone][-1:] == ["hang"],
        "the slow branch's second call in flight",
    )
    os.kill(child.pid, signal.SIGKILL)
    await asyncio.to_thread(child.process.wait, 10)
    server.set_rules()
    sent_before = len(server.chat_requests)

    resumed = spawn("resume", "two-stages", env=env)
    outcome = await asyncio.to_thread(resumed.finish)
    answers = [f"BETA report on ALPHA report on {topic}.." for topic in ("slow", "fast")]
    assert outcome == {"ok": True, "result": answers, "pid": resumed.pid}, resumed.stderr
    assert [prompt_of(r) for r in server.chat_requests[sent_before:]] == ["BETA"]
    assert Counter(str(r.messages[-1]["content"]) for r in server.chat_requests) == Counter(
        {
            "ALPHA report on slow.": 1,
            "ALPHA report on fast.": 1,
            "BETA report on ALPHA report on fast..": 1,
            "BETA report on ALPHA report on slow..": 2,  # in flight at the kill, and again
        }
    )
    slow = {"crash_two_stages/beta slow#0", "crash_two_stages/beta slow#0/beta#0"}
    assert set(journal.load_steps("two-stages")) == fast | slow
    sent = len(server.chat_requests)
    assert await replay("two-stages") == answers
    assert len(server.chat_requests) == sent
